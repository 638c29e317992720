"""Build the student edition of the course into ``dist/student/`` (``make student``).

Two kinds of reference material are removed:

* **Library** (``vitseg_lab/**.py``): every ``### BEGIN SOLUTION`` … ``### END SOLUTION`` region is
  replaced by ``raise ExerciseNotDone("N.M")``. The exercise number comes from the first
  docstring line of the enclosing function (``Exercise N.M · …``, read with ``ast``), the notebook
  from the chapter registry; indentation, signature and docstring are kept. The
  instructor-only package ``vitseg_lab/_grader/`` is left out.
* **Notebooks**: each chapter notebook goes through ``nbgrader generate_assignment`` in the
  course folder (``tools.grading``), which strips solution cells and hidden tests; the student
  edition takes its notebooks from ``release/``.

The result installs with one command (``make lab`` or ``pip install -e '.[dev]'`` inside it) and
opens in JupyterLab; its ``nbgrader_config.py`` gives the Validate button the grader's cell
budgets.

    python -m tools.student [--out dist/student] [--course grading/course]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import sys
from pathlib import Path

from vitseg_lab.exercises import notebook_of

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "vitseg_lab"
INSTRUCTOR_ONLY = ("_grader",)               # sub-packages never shipped to learners
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")

_BEGIN = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION[ \t]*$")
_END = re.compile(r"^[ \t]*### END SOLUTION[ \t]*$")
_TAG = re.compile(r"Exercise\s+(\d+\.\d+)")
_IMPORT = "from vitseg_lab.exercises import ExerciseNotDone  # student edition: exercise stubs raise it"


class StripError(SystemExit):
    """A reference region the stripper cannot turn into a stub (the build stops, saying where)."""


# ------------------------------------------------------------------------------------- library

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
    if "### BEGIN SOLUTION" not in text:
        return text, []
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
                raise StripError(f"{where}:{j + 1}: nested ### BEGIN SOLUTION")
            j += 1
        if j == len(lines):
            raise StripError(f"{where}:{begin}: ### BEGIN SOLUTION without ### END SOLUTION")
        fn = _enclosing_function(tree, begin)
        if fn is None:
            raise StripError(f"{where}:{begin}: solution region outside a function")
        doc = (ast.get_docstring(fn) or "").strip().splitlines()
        tag = _TAG.match(doc[0]) if doc else None
        if tag is None:
            raise StripError(
                f"{where}:{fn.lineno}: {fn.name} holds a solution region but its docstring does "
                "not start with 'Exercise N.M · …'"
            )
        notebook = notebook_of(tag.group(1))
        ind = m.group("indent")
        out.append(f"{ind}# Written by the learner in {notebook}; @plug puts it here.\n")
        out.append(f'{ind}raise ExerciseNotDone("{tag.group(1)}")\n')
        tags.append(tag.group(1))
        i = j + 1
    new = "".join(out)
    if not _imports_exercise_not_done(tree):
        new = _add_import(new, where)
    ast.parse(new)                                # the stub must still compile
    return new, tags


def _add_import(text: str, where: str) -> str:
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


def strip_library(src: Path = LIBRARY, dst: Path | None = None) -> dict[str, list[str]]:
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
        text = py.read_text()
        new, tags = strip_source(text, f"vitseg_lab/{rel}")
        if tags:
            py.write_text(new)
            stubbed[rel] = tags
    leftovers = [p for p in dst.rglob("*") if p.is_file()
                 and ("### BEGIN SOLUTION" in _read(p) or "### END SOLUTION" in _read(p))]
    if leftovers:
        raise StripError(f"solution markers left in {leftovers}")
    return stubbed


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except UnicodeDecodeError:
        return ""


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
    ``tools.grading.build_course`` has just built.
    """
    from tools import grading

    assignments = grading.build_course(course) if rebuild else grading.chapter_notebooks()
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
    cell, long = grading.cell_budgets()
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
