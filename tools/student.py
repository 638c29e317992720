"""Build the student edition of the course into ``dist/student/`` (``make student``).

Two kinds of reference material are removed:

* **Library** (``vitseg_lab/**.py``, ``tools.edition.strip_library``): every
  ``### BEGIN SOLUTION`` … ``### END SOLUTION`` region is replaced by ``raise ExerciseNotDone("N.M")``. The exercise number comes from the first
  docstring line of the enclosing function (``Exercise N.M · …``, read with ``ast``), the notebook
  from the chapter registry; indentation, signature and docstring are kept. The
  instructor-only package ``vitseg_lab/_grader/`` is left out.
* **Notebooks**: each chapter notebook goes through ``nbgrader generate_assignment`` in the
  course folder (``tools.course``), which strips solution cells and hidden tests; the student
  edition takes its notebooks from ``release/``.

The result installs with one command (``make lab`` or ``pip install -e '.[dev]'`` inside it) and
opens in JupyterLab; its ``nbgrader_config.py`` gives the Validate button the grader's cell
budgets.

    python -m tools.student [--out dist/student] [--course grading/course]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from tools.course import LIBRARY, ROOT, build_course, cell_budgets, chapter_notebooks
from tools.edition import INSTRUCTOR_ONLY, StripError, strip_library, strip_source

__all__ = ["INSTRUCTOR_ONLY", "LIBRARY", "StripError", "build_student", "main", "strip_library",
           "strip_source"]


# -------------------------------------------------------------------------------- student edition

_README = """\
# vitseg-lab — student edition

Transformer-based image segmentation, by building it. Each chapter notebook asks you to write the
functions of a small PyTorch library, `vitseg_lab`, one idea at a time; the visible test after
each exercise checks it at once, and then *your* code drives the chapter's widgets and a real
training run.

## Install and open (one command)

```bash
make lab        # creates .venv with the course's pinned packages, then opens JupyterLab
```

Needs Python 3.11 (3.10+ works) and `make`. Without `make`:
`python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/jupyter lab notebooks/`.
Conda: `conda env create -f environment.yml && conda activate vitseg-lab && jupyter lab notebooks/`.

## The notebooks

{table}

## How an exercise works

Write the body of the function where it says `YOUR CODE HERE` and run the cell: `@plug(...)` puts
your function into the library, so the chapter's model, widgets and training run on your code.
An exercise you have not done yet fails with its number and notebook, e.g.
`ExerciseNotDone: Exercise 1.1 (notebooks/01_vit_attention.ipynb) is not done yet`.

Before you submit, press **Validate** in the notebook toolbar (or run `make validate`): it runs
the notebook top to bottom the way the grader will (training cells run a seconds-long smoke
configuration) and lists the tests that still fail. The grader also runs hidden tests (other
shapes, dtypes and edge cases), so passing the visible tests is necessary, not sufficient.

Rules of the graded notebooks: do not delete, copy or split the grey (locked) test cells; keep
each solution in its own cell; do not change the notebook's file name; and do not patch torch,
numpy, Python builtins or the library from your cells (submissions that do are reviewed by hand).
"""

_MAKEFILE = """\
# Student edition: `make lab` is the one command you need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: lab validate venv

$(STAMP):
\t$(PYTHON) -m venv $(VENV)
\t$(PY) -m pip install -q --upgrade pip
\t$(PY) -m pip install -q -e '.[dev]'
\t# learners need nbgrader's Validate button, not the instructor's panels
\t$(VENV)/bin/jupyter labextension disable --level=sys_prefix @jupyter/nbgrader:formgrader \\
\t    @jupyter/nbgrader:create-assignment @jupyter/nbgrader:course-list
\ttouch $(STAMP)

venv: $(STAMP)

lab: venv                       ## open the course in JupyterLab
\t$(VENV)/bin/jupyter lab notebooks/

validate: venv                  ## what the Validate button does, for every notebook
\t$(VENV)/bin/nbgrader validate notebooks/*.ipynb
"""

_NBGRADER_CONFIG = """\
# nbgrader settings for the learner's Validate button (JupyterLab reads this file from the folder
# it was started in; `make lab` starts it here). They mirror the grader's per-cell time budgets.
c = get_config()  # noqa: F821

CELL_TIMEOUT = {cell}        # seconds per cell
LONG_TIMEOUT = {long}        # seconds for cells tagged long-running (training, smoke scale)

c.Execute.timeout = CELL_TIMEOUT
c.Execute.timeout_func = (
    lambda cell: LONG_TIMEOUT if "long-running" in cell.get("metadata", {{}}).get("tags", [])
    else CELL_TIMEOUT)
# nbgrader gives a test cell 0 for any stderr output (a warning, a tqdm bar): the kernel it starts
# sends them to stdout, as the grader's kernel does, so Validate and the grade agree.
STDERR_TO_STDOUT = "import sys; sys.stderr = sys.stdout"
c.Execute.extra_arguments = [f"--IPKernelApp.exec_lines={{STDERR_TO_STDOUT}}"]
"""


def _title(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return nb_path.stem


def build_student(out: Path, course: Path, *, rebuild: bool = True) -> Path:
    """Assemble ``out`` from the course's ``release/`` notebooks and a stripped library.

    ``rebuild``: regenerate the course (source/ and release/) first; False reuses a course that
    ``tools.course.build_course`` has just built.
    """
    assignments = build_course(course) if rebuild else chapter_notebooks()
    if out.exists():
        shutil.rmtree(out)
    (out / "notebooks").mkdir(parents=True)
    rows = ["| # | notebook | chapter |", "|---|---|---|"]
    for a, nb in assignments.items():
        rel = course / "release" / a / nb.name
        if not rel.exists():
            raise SystemExit(f"nbgrader did not release {rel}; see the generate_assignment log")
        shutil.copy(rel, out / "notebooks" / nb.name)
        rows.append(f"| {a[2:]} | `notebooks/{nb.name}` | {_title(rel)} |")
    strip_library(LIBRARY, out / "vitseg_lab")
    for name in ("pyproject.toml", "environment.yml"):
        shutil.copy(ROOT / name, out / name)
    (out / "data").mkdir()
    if (ROOT / "data" / "README.md").exists():
        shutil.copy(ROOT / "data" / "README.md", out / "data" / "README.md")
    (out / "README.md").write_text(_README.format(table="\n".join(rows)))
    (out / "Makefile").write_text(_MAKEFILE)
    (out / ".gitignore").write_text(".venv/\n__pycache__/\n*.pyc\n.ipynb_checkpoints/\n"
                                    "data/*\n!data/README.md\nruns/\n*.egg-info/\n")
    cell, long = cell_budgets()
    (out / "nbgrader_config.py").write_text(_NBGRADER_CONFIG.format(cell=cell, long=long))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist" / "student")
    ap.add_argument("--course", type=Path, default=ROOT / "grading" / "course",
                    help="nbgrader course folder to build the notebooks in")
    a = ap.parse_args(argv)
    out = build_student(a.out.resolve(), a.course.resolve())
    nbs = sorted(p.name for p in (out / "notebooks").glob("*.ipynb"))
    print(f"student edition: {out} ({len(nbs)} notebooks: {', '.join(nbs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
