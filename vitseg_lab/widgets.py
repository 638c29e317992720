"""ipywidgets explorers. Each runs the learner's plugged functions (looked up at call time), so
what a learner sees is what their own code computes.

One explorer per chapter; each returns the top-level widget (display it as the cell's value) and
keeps its state on that widget (``explorer.state``) so tests and follow-up cells can read it.
"""

from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
