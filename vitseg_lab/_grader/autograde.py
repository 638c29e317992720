"""nbgrader preprocessors that grade the hidden checks in nbgrader's own process.

``nbgrader_config.py`` puts them around nbgrader's ``Execute``::

    WriteGraderInputs, Execute, ApplyVerdicts, IgnorePattern, ..., SaveAutoGrades, ...

- ``WriteGraderInputs`` (before the kernel starts): removes any ``.vitseg_grading/`` the learner
  submitted, draws a fresh seed that only this process knows, builds each exercise's hidden cases
  and writes them as data for the kernel's ``record(tag, fn)``.
- ``ApplyVerdicts`` (after the kernel is gone): compares each record with the naive reference on
  this process's own copy of the cases; a failed, missing or malformed record becomes an error
  output on that test cell, so nbgrader's ``SaveAutoGrades`` scores it 0 and the feedback says why in
  one line. The records are then deleted.

The grader modules are imported when nbgrader loads its config, before any learner kernel runs.
"""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from nbconvert.preprocessors import Preprocessor

from vitseg_lab.recorder import GRADING_DIR, load, save

from . import common

RECORD_CALL = re.compile(r"""^record\(\s*['"](\d+\.\d+)['"]\s*,\s*\w+\s*\)\s*$""", re.M)
_CHECKS = common.all_checks()       # imported now: before any learner code has run


def _is_test_cell(cell: Any) -> bool:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return cell.get("cell_type") == "code" and bool(meta.get("grade")) and not meta.get("solution")


def tags_of(nb: Any) -> list[tuple[int, str]]:
    """(cell index, exercise tag) of every test cell whose hidden block records an exercise."""
    out = []
    for i, cell in enumerate(nb.cells):
        if _is_test_cell(cell):
            src = cell.source if isinstance(cell.source, str) else "".join(cell.source)
            m = RECORD_CALL.search(src)
            if m:
                out.append((i, m.group(1)))
    return out


def _workdir(resources: dict) -> Path:
    return Path(resources.get("metadata", {}).get("path") or ".").resolve()


class WriteGraderInputs(Preprocessor):
    """Fresh hidden cases for every exercise of this notebook, written as data for the kernel."""

    def preprocess(self, nb, resources):
        root = _workdir(resources) / GRADING_DIR
        if root.exists() or root.is_symlink():          # never trust what was submitted
            if root.is_symlink() or root.is_file():
                root.unlink()
            else:
                shutil.rmtree(root)
        seed = secrets.randbits(62)
        resources["vitseg_grading_seed"] = seed
        for _, tag in tags_of(nb):
            check = _CHECKS.get(tag)
            if check is None:
                continue
            save(root / "inputs" / tag, {"cases": check.cases(common.gen(seed)),
                                         "substitutes": dict(check.substitutes)})
        (root / "records").mkdir(parents=True, exist_ok=True)
        return nb, resources


def _error_output(message: str) -> dict:
    from nbformat.v4 import new_output

    return new_output("error", ename="HiddenCheckFailed", evalue=message,
                      traceback=[f"HiddenCheckFailed: {message}"])


def _has_error(cell: Any) -> bool:
    return any(o.get("output_type") == "error" for o in cell.get("outputs", []))


class ApplyVerdicts(Preprocessor):
    """Verdicts on the kernel's records, computed here; a failure becomes the cell's error."""

    def preprocess(self, nb, resources):
        root = _workdir(resources) / GRADING_DIR
        seed = resources.get("vitseg_grading_seed")
        verdicts: dict[str, str | None] = {}
        for i, tag in tags_of(nb):
            cell = nb.cells[i]
            check = _CHECKS.get(tag)
            if check is None:
                msg: str | None = (f"Exercise {tag} has no hidden check in this grader; tell "
                                   "your instructor.")
            elif seed is None:
                msg = "the grader's inputs were not prepared; tell your instructor."
            else:
                msg = self.verdict(check, tag, root, seed)
            verdicts[tag] = msg
            if msg and not _has_error(cell):
                cell.setdefault("outputs", []).append(_error_output(f"Exercise {tag}: {msg}"))
        resources["vitseg_verdicts"] = verdicts
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        return nb, resources

    @staticmethod
    def verdict(check: common.Check, tag: str, root: Path, seed: int) -> str | None:
        try:
            rec = load(root / "records" / tag)
        except FileNotFoundError:
            return ("the hidden check recorded nothing: the test cell did not reach its end, or "
                    "something in the notebook stopped it.")
        except ValueError as e:
            return f"the hidden check's record is malformed ({e})."
        if not isinstance(rec, dict) or rec.get("tag") != tag or "rows" not in rec:
            return "the hidden check's record is malformed."
        try:
            return common.verdict(check, check.cases(common.gen(seed)), rec["rows"])
        except Exception as e:  # noqa: BLE001 - a record that breaks the comparison scores 0
            return f"the hidden check could not compare your outputs ({type(e).__name__})."
