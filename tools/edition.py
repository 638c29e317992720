"""The edition grammar: how the instructor edition marks what learners must not get, in one place.

Imported by the notebook builder (``tools.nbbuild``), the course build (``tools.course``), the
student edition (``tools.student``) and the course's nbgrader hooks (``grading/vitseg_nbgrader.py``,
which gets a copy of this file as ``vitseg_edition.py`` in the course folder). Standard library
only at import time.

- **Solution regions**: ``### BEGIN SOLUTION`` … ``### END SOLUTION``, in library functions whose
  docstring starts with ``Exercise N.M · …`` (the exercise *tag*). The student edition replaces a
  region by ``raise ExerciseNotDone("N.M")`` (``strip_source``); nbgrader replaces it in notebook
  solution cells.
- **Hidden tests**: ``### BEGIN HIDDEN TESTS`` … ``### END HIDDEN TESTS`` in notebook test cells;
  the block only records the learner's outputs (``hidden_block``, ``vitseg_lab.recorder``).
- **Leak search**: ``secret_lines`` (every line that must never reach a learner, by kind) and
  ``find_leaks`` (those lines, verbatim, in any file of a folder: release, feedback, student
  edition).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

SOLUTION_BEGIN, SOLUTION_END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
TAG = re.compile(r"Exercise\s+(\d+\.\d+)")               # the tag at the start of a docstring
INSTRUCTOR_ONLY = ("_grader",)                           # sub-packages never shipped to learners

_BEGIN = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION[ \t]*$")
_END = re.compile(r"^[ \t]*### END SOLUTION[ \t]*$")
_IMPORT = "from vitseg_lab.exercises import ExerciseNotDone  # student edition: exercise stubs raise it"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class StripError(SystemExit):
    """A reference region the stripper cannot turn into a stub (the build stops, saying where)."""


# ============================================================================= tags and blocks

def tag_of_docstring(doc: str | None) -> str | None:
    """``"1.4"`` for a docstring starting with ``Exercise 1.4 · …``, else None."""
    m = TAG.match((doc or "").strip())
    return m.group(1) if m else None


def hidden_block(tag: str, name: str) -> str:
    """The hidden-test block of exercise ``tag`` whose learner function is ``name``: it records
    the function's outputs on the grader's inputs (``vitseg_lab._grader.autograde.RECORD_CALL``
    finds the tag in it)."""
    return (f"{HIDDEN_BEGIN}\nfrom vitseg_lab.recorder import record\nrecord({tag!r}, {name})\n"
            f"{HIDDEN_END}")


def hidden_lines(source: str) -> list[str]:
    """The stripped, non-empty lines between the hidden-test markers of one cell."""
    out, inside = [], False
    for line in source.splitlines():
        s = line.strip()
        if s.startswith(HIDDEN_BEGIN):
            inside = True
        elif s.startswith(HIDDEN_END):
            inside = False
        elif inside and s:
            out.append(s)
    return out


def unmark(source: str) -> str:
    """A learner's cell has no markers: drop the solution marker lines, keep the code."""
    return "\n".join(ln for ln in source.splitlines()
                     if ln.strip() not in (SOLUTION_BEGIN, SOLUTION_END))


def solution_regions(text: str) -> list[str]:
    """The stripped lines inside every solution region of ``text``."""
    out, inside = [], False
    for ln in text.splitlines():
        s = ln.strip()
        if s == SOLUTION_BEGIN:
            inside = True
        elif s == SOLUTION_END:
            inside = False
        elif inside:
            out.append(s)
    return out


# =============================================================================== library stubs

def _enclosing_function(tree: ast.Module, lineno: int) -> ast.FunctionDef | None:
    best = None
    for node in ast.walk(tree):
        if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.lineno <= lineno <= (node.end_lineno or node.lineno)
                and (best is None or node.lineno > best.lineno)):
            best = node                           # innermost
    return best


def _imports_exercise_not_done(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(
            a.name == "ExerciseNotDone" and a.asname is None for a in node.names
        ):
            return True
    return False


def strip_source(text: str, where: str = "<module>") -> tuple[str, list[str]]:
    """Replace every solution region of one module by an ``ExerciseNotDone`` stub.

    Returns the new text and the exercise numbers stubbed. Raises ``StripError`` on an unclosed
    region, a region outside a function, a function without an ``Exercise N.M`` tag or a module
    whose chapter is not in the registry (the notebook named in the stub comes from the tag).
    """
    if SOLUTION_BEGIN not in text:
        return text, []
    from vitseg_lab.exercises import notebook_of

    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    tags: list[str] = []
    i = 0
    while i < len(lines):
        m = _BEGIN.match(lines[i].rstrip("\n"))
        if not m:
            out.append(lines[i])
            i += 1
            continue
        begin = i + 1                             # 1-based line number of the marker
        j = i + 1
        while j < len(lines) and not _END.match(lines[j].rstrip("\n")):
            if _BEGIN.match(lines[j].rstrip("\n")):
                raise StripError(f"{where}:{j + 1}: nested {SOLUTION_BEGIN}")
            j += 1
        if j == len(lines):
            raise StripError(f"{where}:{begin}: {SOLUTION_BEGIN} without {SOLUTION_END}")
        fn = _enclosing_function(tree, begin)
        if fn is None:
            raise StripError(f"{where}:{begin}: solution region outside a function")
        tag = tag_of_docstring(ast.get_docstring(fn))
        if tag is None:
            raise StripError(
                f"{where}:{fn.lineno}: {fn.name} holds a solution region but its docstring does "
                "not start with 'Exercise N.M · …'"
            )
        notebook = notebook_of(tag)
        ind = m.group("indent")
        out.append(f"{ind}# Written by the learner in {notebook}; @plug puts it here.\n")
        out.append(f'{ind}raise ExerciseNotDone("{tag}")\n')
        tags.append(tag)
        i = j + 1
    new = "".join(out)
    if not _imports_exercise_not_done(tree):
        new = _add_import(new)
    ast.parse(new)                                # the stub must still compile
    return new, tags


def _add_import(text: str) -> str:
    """Insert the ExerciseNotDone import after the module's last top-level import."""
    tree = ast.parse(text)
    last = None
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            last = node
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            break
    lines = text.splitlines(keepends=True)
    if last is None:                              # after the docstring / __future__ import
        at = 0
        if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(
            getattr(tree.body[0], "value", None), ast.Constant
        ):
            at = tree.body[0].end_lineno or 0
    else:
        at = last.end_lineno or last.lineno
    return "".join(lines[:at]) + _IMPORT + "\n" + "".join(lines[at:])


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except UnicodeDecodeError:
        return ""


def strip_library(src: Path, dst: Path | None = None) -> dict[str, list[str]]:
    """Copy the library to ``dst`` as the student edition; returns {relative path: exercises}."""
    if dst is None:
        raise ValueError("strip_library needs a destination folder")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
        "__pycache__", "*.pyc", *INSTRUCTOR_ONLY))
    stubbed: dict[str, list[str]] = {}
    for py in sorted(dst.rglob("*.py")):
        rel = py.relative_to(dst).as_posix()
        new, tags = strip_source(py.read_text(), f"vitseg_lab/{rel}")
        if tags:
            py.write_text(new)
            stubbed[rel] = tags
    leftovers = [p for p in dst.rglob("*") if p.is_file()
                 and (SOLUTION_BEGIN in _read(p) or SOLUTION_END in _read(p))]
    if leftovers:
        raise StripError(f"solution markers left in {leftovers}")
    return stubbed


# ================================================================================= leak search

def secret_lines(library: Path, notebooks: list[Path]) -> dict[str, set[str]]:
    """Lines that must never reach a learner, by kind (for the leak checks).

    ``solution``: reference regions of the library; ``hidden``: hidden-test blocks of the
    notebooks; ``grader``: the instructor-only ``vitseg_lab/_grader`` sources. Lines that also
    occur in material learners legitimately get (the library outside reference regions, the
    notebooks outside solutions and hidden tests) and very short lines are left out.
    """
    sol, hid, grd, public = set(), set(), set(), set()
    for py in library.rglob("*.py"):
        text = py.read_text()
        if any(part in INSTRUCTOR_ONLY for part in py.relative_to(library).parts):
            grd |= {ln.strip() for ln in text.splitlines()}
            continue
        inside = set(solution_regions(text))
        sol |= inside
        public |= {ln.strip() for ln in text.splitlines()} - inside - {SOLUTION_BEGIN,
                                                                        SOLUTION_END}
    for nb_path in notebooks:
        nb = json.loads(Path(nb_path).read_text())
        for cell in nb.get("cells", []):
            src = "".join(cell.get("source", ""))
            hidden = set(hidden_lines(src))
            hid |= hidden
            if cell.get("metadata", {}).get("nbgrader", {}).get("solution"):
                continue
            public |= {ln.strip() for ln in src.splitlines()} - hidden

    def keep(lines: set[str]) -> set[str]:
        return {s for s in lines - public
                if len(s) >= 12 and not s.startswith(("#", '"""', "'''")) and re.search(r"\w", s)}

    # A learner's own code may coincide with a grader line ("d = C // num_heads"): only lines that
    # are not in any reference solution count as the grader's, and imports are no secret.
    grd = {s for s in grd if not s.startswith(("import ", "from "))}
    return {"solution": keep(sol), "hidden": keep(hid - sol), "grader": keep(grd - sol - hid)}


def text_of(path: Path) -> str:
    """What a person reading ``path`` sees: HTML without tags, a notebook's sources and outputs."""
    text = path.read_bytes().decode("utf-8", errors="ignore")
    if path.suffix == ".html":
        import html as _html

        text = _html.unescape(re.sub(r"<[^>]+>", "", text))
    elif path.suffix == ".ipynb":
        try:
            nb = json.loads(text)
            parts = []
            for c in nb.get("cells", []):
                parts.append("".join(c.get("source", "")))
                for o in c.get("outputs", []):
                    parts.append("".join(o.get("text", "")))
                    parts += [_ANSI.sub("", t) for t in o.get("traceback", [])]
                    for v in o.get("data", {}).values():
                        parts.append("".join(v) if isinstance(v, list) else str(v))
            text += "\n" + "\n".join(parts)
        except ValueError:
            pass
    return text


def find_leaks(folder: Path, secrets: dict[str, set[str]],
               kinds: tuple[str, ...] = ("solution", "hidden", "grader")) -> list[str]:
    """Every file under ``folder`` (text of every file, HTML tags removed) vs the secret lines."""
    lines = {(k, s) for k in kinds for s in secrets[k]}
    hits = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        if any(part in INSTRUCTOR_ONLY for part in p.parts):
            hits.append(f"{p}: instructor-only grader file")
            continue
        have = {ln.strip() for ln in text_of(p).splitlines()}
        for kind, s in sorted(lines):
            if s in have:
                hits.append(f"{p}: {kind} line {s!r}")
    return hits
