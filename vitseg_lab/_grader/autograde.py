"""nbgrader preprocessors that grade the hidden checks in nbgrader's own process.

``nbgrader_config.py`` puts them around nbgrader's ``Execute``::

    WriteGraderInputs, Execute, SanitizeWorkdir, ApplyVerdicts, CapOutputs, IgnorePattern, ...,
    SaveAutoGrades, ...

- ``WriteGraderInputs`` (before the kernel starts): removes any ``.vitseg_grading/`` the learner
  submitted, draws a fresh seed that only this process knows, builds each exercise's hidden cases
  and writes them as data for the kernel's ``record(tag, fn)``.
- ``SanitizeWorkdir`` (right after the kernel is gone): the kernel ran as another user in a sandbox
  that could write its assignment copy; every symbolic link it left there is removed (nbgrader
  would otherwise follow one when it writes the graded notebook, e.g. onto ``gradebook.db``) and
  every file is given back to this process's user.
- ``ApplyVerdicts`` (after the kernel is gone): compares each record with the naive reference on
  this process's own copy of the cases; a failed, missing or malformed record becomes an error
  output on that test cell, so nbgrader's ``SaveAutoGrades`` scores it 0 and the feedback says why in
  one line. The records are then deleted.

- ``CapOutputs``: no output of the graded notebook (so of the feedback) is larger than
  ``VITSEG_MAX_OUTPUT_KB`` (default 256 KB); the rest is replaced by one line saying so.

The grader modules are imported when nbgrader loads its config, before any learner kernel runs.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

from nbconvert.preprocessors import Preprocessor as _NbconvertPreprocessor
from traitlets import Bool

from vitseg_lab.recorder import GRADING_DIR, load, save

from . import common

RECORD_CALL = re.compile(r"""^record\(\s*['"](\d+\.\d+)['"]\s*,\s*\w+\s*\)\s*$""", re.MULTILINE)
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


class Preprocessor(_NbconvertPreprocessor):
    """nbconvert's base class is *disabled* by default (``enabled = False``: registered with
    nbgrader's ``autograde_preprocessors`` it would silently do nothing); ours always run."""

    enabled = Bool(True)


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


def _error_output(message: str, ename: str = "HiddenCheckFailed") -> dict:
    from nbformat.v4 import new_output

    return new_output("error", ename=ename, evalue=message, traceback=[f"{ename}: {message}"])


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


class SanitizeWorkdir(Preprocessor):
    """No symbolic link (nor FIFO, nor socket) survives the kernel; every file belongs to this
    process's user again."""

    def preprocess(self, nb, resources):
        root = _workdir(resources)
        removed = sanitize_tree(root)
        if removed:
            self.log.warning("removed %d symbolic link(s) the kernel left in %s: %s", len(removed),
                             root, ", ".join(removed[:5]))
        resources["vitseg_removed_links"] = removed
        return nb, resources


def sanitize_tree(root: Path) -> list[str]:
    """Remove every symbolic link under ``root`` (never followed) and chown the rest back to this
    process's user; returns the links removed (relative paths)."""
    removed: list[str] = []
    uid, gid = os.geteuid(), os.getegid()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                os.unlink(p)                     # links, FIFOs, sockets: nothing to grade
                removed.append(os.path.relpath(p, root))
                continue
            if st.st_uid != uid:
                try:
                    os.lchown(p, uid, gid)
                except OSError:
                    pass
        dirnames[:] = [d for d in dirnames if os.path.isdir(os.path.join(dirpath, d))
                       and not os.path.islink(os.path.join(dirpath, d))]
    try:
        if os.lstat(root).st_uid != uid:
            os.lchown(root, uid, gid)
    except OSError:
        pass
    return removed


def _cap_text(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return (text[:limit] + f"\n... [{len(text) - limit} more characters of output removed by the "
            "grader]\n")


class CapOutputs(Preprocessor):
    """Every output of the graded notebook is cut to ``VITSEG_MAX_OUTPUT_KB`` (default 256)."""

    def preprocess(self, nb, resources):
        limit = int(os.environ.get("VITSEG_MAX_OUTPUT_KB", "256")) * 1024
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if "text" in out:
                    text = out["text"] if isinstance(out["text"], str) else "".join(out["text"])
                    out["text"] = _cap_text(text, limit)
                if out.get("output_type") == "error":
                    out["evalue"] = _cap_text(str(out.get("evalue", "")), limit)
                    tb = [str(t) for t in out.get("traceback", [])]
                    out["traceback"] = [_cap_text("\n".join(tb), limit)] if sum(
                        len(t) for t in tb) > limit else tb
                data = out.get("data")
                if isinstance(data, dict):
                    for mime in list(data):
                        val = data[mime] if isinstance(data[mime], str) else (
                            "".join(data[mime]) if isinstance(data[mime], list) else None)
                        if val is not None and len(val) > limit:
                            if mime.startswith("text/"):
                                data[mime] = _cap_text(val, limit)
                            else:
                                data.pop(mime)
                                data.setdefault("text/plain", f"[{mime} output over {limit} bytes "
                                                "removed by the grader]")
        return nb, resources


try:
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from nbgrader.preprocessors import Execute as _Execute
except Exception:  # noqa: BLE001 - importable without nbgrader (the pure helpers)
    _Execute = None   # type: ignore[assignment,misc]


if _Execute is not None:
    class GradingExecute(_Execute):  # type: ignore[misc,valid-type]
        """nbgrader's ``Execute`` that survives the kernel's death (``os._exit``, ``exit()``, the
        memory limit, a crash) or its silence (no IOPub output: e.g. a fork bomb left no thread
        for it): the cell gets an error, every later code cell gets "not run", and grading goes
        on — the exercises recorded before the death keep their scores, the later ones score 0
        (nbgrader would fail the whole notebook instead)."""

        _vitseg_dead: int | None = None

        def preprocess(self, nb, resources=None, km=None):
            self._vitseg_dead = None              # one instance grades many notebooks
            return super().preprocess(nb, resources, km=km)

        def preprocess_cell(self, cell, resources, index):
            # nbconvert's ExecutePreprocessor runs each cell through here (its execute_cell is
            # bound to nbclient's own coroutine, so this is the place to catch a dead kernel)
            if self._vitseg_dead is not None:
                if cell.get("cell_type") == "code":
                    cell.outputs = [_error_output(
                        f"not run: the kernel died in cell {self._vitseg_dead}", "KernelDied")]
                return cell, resources
            try:
                return super().preprocess_cell(cell, resources, index)
            except (DeadKernelError, CellTimeoutError) as e:
                # CellTimeoutError reaches here only when the kernel stopped answering on IOPub
                # (cell timeouts are interrupts, handled by nbgrader): it is as good as dead.
                self._vitseg_dead = index
                self.log.warning("the kernel died or stopped answering in cell %d (%s); the "
                                 "rest of the notebook is marked as not run", index,
                                 type(e).__name__)
                cell.setdefault("outputs", []).append(_error_output(
                    "the kernel died or stopped answering while this cell ran (exit, crash, "
                    "the memory or process limit)", "KernelDied"))
                return cell, resources
