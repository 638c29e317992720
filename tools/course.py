"""The course folder: which chapters it has, how nbgrader is run in it, and how it is built.

``build_course`` creates or refreshes ``<course>/``: the nbgrader configuration and its helper
modules (from ``grading/``), ``source/chNN/`` = the instructor notebook + the *student-edition*
library (reference regions stubbed, no ``_grader/``), then ``nbgrader generate_assignment`` for
``release/chNN/``. The gradebook, submissions, autograded and feedback folders are kept.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from tools import edition

ROOT = Path(__file__).resolve().parents[1]
GRADING = ROOT / "grading"
LIBRARY = ROOT / "vitseg_lab"
# The chapters of the course: every NN_name.ipynb in this folder (VITSEG_NOTEBOOKS_DIR selects
# another folder, e.g. a term that teaches only some chapters).
NOTEBOOKS = Path(os.environ.get("VITSEG_NOTEBOOKS_DIR", ROOT / "notebooks")).resolve()
DEFAULT_COURSE = GRADING / "course"
DEMO_COURSE = ROOT / "dist" / "grade-demo"
BENCH_COURSE = ROOT / "dist" / "grade-bench"
# course folder file <- repository file
COURSE_FILES = {
    "nbgrader_config.py": GRADING / "nbgrader_config.py",
    "vitseg_nbgrader.py": GRADING / "vitseg_nbgrader.py",
    "vitseg_sandbox.py": GRADING / "vitseg_sandbox.py",
    "kernel_guard.py": GRADING / "kernel_guard.py",
    "vitseg_edition.py": ROOT / "tools" / "edition.py",
    **{f"templates/vitseg_feedback/{f.name}": f
       for f in sorted((GRADING / "templates" / "vitseg_feedback").iterdir()) if f.is_file()},
}
_CHAPTER = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")


def hooks():
    """grading/vitseg_nbgrader.py (the module the course config imports), loaded from the repo."""
    if str(GRADING) not in sys.path:
        sys.path.insert(0, str(GRADING))
    import vitseg_nbgrader

    return vitseg_nbgrader


def sandbox():
    """grading/vitseg_sandbox.py (the grading kernel's launcher), loaded from the repo."""
    if str(GRADING) not in sys.path:
        sys.path.insert(0, str(GRADING))
    import vitseg_sandbox

    return vitseg_sandbox


def cell_budgets() -> tuple[int, int]:
    """(seconds per cell, seconds per long-running cell) as the course config sets them."""
    text = (GRADING / "nbgrader_config.py").read_text()
    cell = re.search(r'VITSEG_CELL_TIMEOUT", "(\d+)"', text)
    long = re.search(r'VITSEG_LONG_CELL_TIMEOUT", "(\d+)"', text)
    return int(cell.group(1)), int(long.group(1))


def chapter_notebooks(folder: Path | None = None) -> dict[str, Path]:
    """{assignment id: notebook} for every chapter notebook present (never a fixed list)."""
    folder = folder or NOTEBOOKS
    out = {}
    for nb in sorted(folder.glob("*.ipynb")):
        m = _CHAPTER.match(nb.name)
        if m:
            out[f"ch{m.group(1)}"] = nb
    return out


def assignments(names: list[str]) -> list[str]:
    """``names`` checked against the chapters present (all of them when empty)."""
    known = chapter_notebooks()
    for a in names:
        if a not in known:
            raise SystemExit(f"unknown assignment {a!r}; chapters present: {', '.join(known)}")
    return names or list(known)


def nbgrader(course: Path, *args: str, env: dict | None = None, check: bool = True,
             capture: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``nbgrader <args>`` in the course folder with this interpreter's nbgrader."""
    e = dict(os.environ, **(env or {}))
    e.pop("NBGRADER_EXECUTION", None)
    # nbgrader runs `alembic` (and the kernel's python) by name: this interpreter's bin/ first.
    e["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), e.get("PATH", "")])
    cmd = [sys.executable, "-m", "nbgrader", *args]
    p = subprocess.run(cmd, check=False, cwd=course, env=e, text=True, timeout=timeout,
                       stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.STDOUT if capture else None)
    if check and p.returncode != 0:
        tail = (p.stdout or "")[-4000:] if capture else ""
        raise SystemExit(f"nbgrader {' '.join(args)} failed (exit {p.returncode})\n{tail}")
    return p


_IPYTHON_NAMES = {"get_ipython", "display", "In", "Out", "exit", "quit", "__name__", "__file__"}


def undefined_names(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """(solution grade id, name) for every global name a solution cell uses that no earlier cell
    (nor the cell itself, nor Python) defines.

    Solution cells are copies of library functions; the library module imports ``F`` or
    ``Tensor``, the notebook may not. Without ``from __future__ import annotations`` even an
    annotation is evaluated when the cell runs, so such a cell fails with a NameError for every
    learner, reference included.
    """
    import builtins
    import symtable

    def global_uses(table) -> set[str]:
        out = {s.get_name() for s in table.get_symbols()
               if s.is_referenced() and (s.is_global() or table.get_type() == "module")
               and not (table.get_type() == "module" and (s.is_assigned() or s.is_imported()))}
        for child in table.get_children():
            out |= global_uses(child)
        return out

    defined = set(dir(builtins)) | _IPYTHON_NAMES
    problems = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        src = "\n".join("pass" if ln.lstrip().startswith(("%", "!")) else ln
                        for ln in cell.source.splitlines())
        try:
            table = symtable.symtable(src, "<cell>", "exec")
        except SyntaxError:
            continue
        binds = {s.get_name() for s in table.get_symbols()
                 if s.is_assigned() or s.is_imported() or s.is_namespace()}
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            for name in sorted(global_uses(table) - defined - binds):
                problems.append((meta.get("grade_id", "?"), name))
        defined |= binds
    return problems


def build_course(course: Path = DEFAULT_COURSE, *, quiet: bool = True) -> dict[str, Path]:
    """Create or refresh the course folder: config, source/<a>/ for every chapter, release/<a>/.

    Keeps the gradebook, submitted/, autograded/ and feedback/ of an existing course.
    """
    course = course.resolve()
    course.mkdir(parents=True, exist_ok=True)
    for name, src in COURSE_FILES.items():
        (course / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, course / name)
    found = chapter_notebooks()
    if not found:
        raise SystemExit(f"no chapter notebooks (NN_name.ipynb) in {NOTEBOOKS}")
    stub = course / ".build" / "vitseg_lab"
    edition.strip_library(LIBRARY, stub)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for a, nb in found.items():
        src = course / "source" / a
        if src.exists():
            shutil.rmtree(src)
        src.mkdir(parents=True)
        master = nbformat.read(nb, as_version=4)
        for gid, name in undefined_names(master):
            print(f"warning: {nb.name}: solution cell '{gid}' uses '{name}', which no earlier "
                  "cell defines (NameError for every learner): import it in the set-up cell")
        nbformat.write(master, src / nb.name)
        shutil.copytree(stub, src / "vitseg_lab", ignore=ignore)
    shutil.rmtree(course / ".build")
    for a in found:
        nbgrader(course, "generate_assignment", a, "--force", capture=quiet)
        leftover = course / "release" / a / "vitseg_lab" / "_grader"
        if leftover.exists():       # the hook failed (nbgrader logs hook errors at INFO only)
            raise SystemExit(f"{leftover} survived generate_assignment: check vitseg_nbgrader.py")
    return found
