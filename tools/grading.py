"""The nbgrader course of vitseg-lab, from the command line (see grading/README.md).

    python -m tools.grading build                  # course folder: source/ from notebooks/, release/
    python -m tools.grading collect ch01 DIR       # a folder of notebooks -> submitted/<id>/ch01/
    python -m tools.grading autograde [ch01 ...]   # preflight (fixes + scan) + nbgrader autograde
    python -m tools.grading feedback [ch01 ...]    # nbgrader generate_feedback + leak check
    python -m tools.grading scores [--csv F]       # per-exercise table from the gradebook
    python -m tools.grading export [--to F]        # nbgrader's grades.csv (+ per-exercise CSV)
    python -m tools.grading review                 # submissions flagged by the monkeypatch scan
    python -m tools.grading demo                   # reference / empty / buggy for every chapter
    python -m tools.grading bench                  # seconds to autograde one learner's course

Every chapter notebook present in ``notebooks/`` (``NN_name.ipynb``) is one assignment ``chNN``.
``source/chNN/`` holds the instructor notebook, the student-edition library (reference regions
stubbed by ``tools.student``) and ``vitseg_lab/_grader/``; nbgrader copies that library over every
submission when it autogrades, so grades always come from the learner's notebook cells.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
GRADING = ROOT / "grading"
# The chapters of the course: every NN_name.ipynb in this folder (VITSEG_NOTEBOOKS_DIR selects
# another folder, e.g. a term that teaches only some chapters).
NOTEBOOKS = Path(os.environ.get("VITSEG_NOTEBOOKS_DIR", ROOT / "notebooks")).resolve()
DEFAULT_COURSE = GRADING / "course"
DEMO_COURSE = ROOT / "dist" / "grade-demo"
BENCH_COURSE = ROOT / "dist" / "grade-bench"
COURSE_FILES = ("nbgrader_config.py", "vitseg_nbgrader.py", "kernel_guard.py")
_CHAPTER = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")


def _hooks():
    """grading/vitseg_nbgrader.py (the module the course config imports), loaded from the repo."""
    if str(GRADING) not in sys.path:
        sys.path.insert(0, str(GRADING))
    import vitseg_nbgrader

    return vitseg_nbgrader


def cell_budgets() -> tuple[int, int]:
    """(seconds per cell, seconds per long-running cell) as the course config sets them."""
    text = (GRADING / "nbgrader_config.py").read_text()
    cell = re.search(r'VITSEG_CELL_TIMEOUT", "(\d+)"', text)
    long = re.search(r'VITSEG_LONG_CELL_TIMEOUT", "(\d+)"', text)
    return int(cell.group(1)), int(long.group(1))


# ======================================================================================= course

def chapter_notebooks(folder: Path | None = None) -> dict[str, Path]:
    """{assignment id: notebook} for every chapter notebook present (never a fixed list)."""
    folder = folder or NOTEBOOKS
    out = {}
    for nb in sorted(folder.glob("*.ipynb")):
        m = _CHAPTER.match(nb.name)
        if m:
            out[f"ch{m.group(1)}"] = nb
    return out


def nbgrader(course: Path, *args: str, env: dict | None = None, check: bool = True,
             capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``nbgrader <args>`` in the course folder with this interpreter's nbgrader."""
    e = dict(os.environ, **(env or {}))
    e.pop("NBGRADER_EXECUTION", None)
    # nbgrader runs `alembic` (and the kernel's python) by name: this interpreter's bin/ first.
    e["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), e.get("PATH", "")])
    cmd = [sys.executable, "-m", "nbgrader", *args]
    p = subprocess.run(cmd, cwd=course, env=e, text=True,
                       stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.STDOUT if capture else None)
    if check and p.returncode != 0:
        tail = (p.stdout or "")[-4000:] if capture else ""
        raise SystemExit(f"nbgrader {' '.join(args)} failed (exit {p.returncode})\n{tail}")
    return p


def close_solution_regions(nb: nbformat.NotebookNode) -> list[str]:
    """Add a missing ``### END SOLUTION`` after the function a solution cell opens it in.

    nbgrader refuses a notebook with an unclosed region ("no end solution statement found").
    The notebook builder copies each function up to its last statement (``ast`` end_lineno), which
    leaves out the library's closing marker; until it copies it, the course build closes the
    region right after the function. Returns the grade ids repaired (printed as a warning).
    """
    import ast

    fixed = []
    for cell in nb.cells:
        if cell.cell_type != "code" or "BEGIN SOLUTION" not in cell.source:
            continue
        if cell.source.count("BEGIN SOLUTION") == cell.source.count("END SOLUTION"):
            continue
        lines = cell.source.split("\n")
        begin = next(i for i, ln in enumerate(lines) if "### BEGIN SOLUTION" in ln)
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        end = len(lines)
        try:
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.FunctionDef) and node.lineno <= begin + 1 <= node.end_lineno:
                    end = node.end_lineno
        except SyntaxError:
            pass
        lines.insert(end, f"{indent}### END SOLUTION")
        cell.source = "\n".join(lines)
        fixed.append(cell.metadata.get("nbgrader", {}).get("grade_id", "?"))
    return fixed


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
    from tools.student import LIBRARY, strip_library

    course = course.resolve()
    course.mkdir(parents=True, exist_ok=True)
    for name in COURSE_FILES:
        shutil.copy(GRADING / name, course / name)
    assignments = chapter_notebooks()
    if not assignments:
        raise SystemExit(f"no chapter notebooks (NN_name.ipynb) in {NOTEBOOKS}")
    stub = course / ".build" / "vitseg_lab"
    strip_library(LIBRARY, stub)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for a, nb in assignments.items():
        src = course / "source" / a
        if src.exists():
            shutil.rmtree(src)
        src.mkdir(parents=True)
        master = nbformat.read(nb, as_version=4)
        fixed = close_solution_regions(master)
        if fixed:
            print(f"warning: {nb.name}: solution cells without '### END SOLUTION' "
                  f"({', '.join(fixed)}); closed after the function for the course build")
        for gid, name in undefined_names(master):
            print(f"warning: {nb.name}: solution cell '{gid}' uses '{name}', which no earlier "
                  "cell defines (NameError for every learner): import it in the set-up cell")
        nbformat.write(master, src / nb.name)
        shutil.copytree(stub, src / "vitseg_lab", ignore=ignore)
    shutil.rmtree(course / ".build")
    for a in assignments:
        nbgrader(course, "generate_assignment", a, "--force", capture=quiet)
        leftover = course / "release" / a / "vitseg_lab" / "_grader"
        if leftover.exists():       # the hook failed (nbgrader logs hook errors at INFO only)
            raise SystemExit(f"{leftover} survived generate_assignment: check vitseg_nbgrader.py")
    return assignments


# ================================================================================== submissions

def solution_cells(nb: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    return {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution")}


def _unmark(source: str) -> str:
    """A learner's cell has no nbgrader markers: drop the marker lines, keep the code."""
    return "\n".join(ln for ln in source.splitlines()
                     if ln.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION"))


def reference_submission(course: Path, a: str) -> nbformat.NotebookNode:
    """The released notebook with every solution cell filled in with the reference code: what a
    learner who solved everything submits (hidden tests absent, as in the release)."""
    name = chapter_notebooks()[a].name
    rel = nbformat.read(course / "release" / a / name, as_version=4)
    src = solution_cells(nbformat.read(course / "source" / a / name, as_version=4))
    for gid, cell in solution_cells(rel).items():
        cell.source = _unmark(src[gid].source)
    return rel


def empty_submission(course: Path, a: str) -> nbformat.NotebookNode:
    name = chapter_notebooks()[a].name
    return nbformat.read(course / "release" / a / name, as_version=4)


@dataclass(frozen=True)
class Mutation:
    exercise: str       # solution cell grade id = function name
    old: str            # text in the reference function, replaced once
    new: str
    mistake: str        # what the planted bug is, for the demo's table


def demo_mutations(a: str) -> list[Mutation]:
    """The planted bugs of the "buggy" demo learner: for each exercise listed in the chapter
    grader's ``DEMO``, its first ``BUGS`` entry (every bug is also unit-tested against its check,
    tests/unit/test_chapters.py; the demo proves the whole nbgrader pipeline on a few)."""
    import importlib

    grader = importlib.import_module(f"vitseg_lab._grader.{a}")
    out = []
    for tag in getattr(grader, "DEMO", ()):
        bug = grader.BUGS[tag][0]
        out.append(Mutation(grader.CHECKS[tag].name, bug.old, bug.new, bug.mistake))
    return out


def buggy_submission(course: Path, a: str) -> tuple[nbformat.NotebookNode, list[Mutation]]:
    nb = reference_submission(course, a)
    cells = solution_cells(nb)
    planted = []
    for m in demo_mutations(a):
        if m.exercise not in cells:
            continue
        src = cells[m.exercise].source
        if src.count(m.old) != 1:
            raise SystemExit(f"mutation for {a}:{m.exercise} no longer applies: {m.old!r} "
                             "is not in the reference solution exactly once (update BUGS in vitseg_lab/_grader)")
        cells[m.exercise].source = src.replace(m.old, m.new)
        planted.append(m)
    if not planted:
        # A chapter without a table still gets one planted mistake: its first exercise undone.
        gid = next(iter(cells))
        body = cells[gid].source.splitlines()
        doc_end = _docstring_end(body)
        cells[gid].source = "\n".join(body[:doc_end] + [
            "    raise NotImplementedError()  # planted: exercise left undone"])
        planted.append(Mutation(gid, "", "", "left undone"))
    return nb, planted


def _docstring_end(lines: list[str]) -> int:
    quotes = 0
    for i, ln in enumerate(lines):
        quotes += ln.count('"""')
        if quotes >= 2:
            return i + 1
    return 2


def submit(course: Path, student: str, a: str, nb: nbformat.NotebookNode,
           name: str | None = None, timestamp: str | None = None) -> Path:
    """Place ``nb`` as ``submitted/<student>/<a>/<name>`` (what `collect` does for real files)."""
    name = name or chapter_notebooks()[a].name
    folder = course / "submitted" / student / a
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    path = folder / name
    nbformat.write(nb, path)
    if timestamp:
        (folder / "timestamp.txt").write_text(timestamp)
    return path


# ================================================================================ collect & grade

def collect(course: Path, a: str, folder: Path, id_regex: str | None = None) -> list[str]:
    """Copy a folder of learner notebooks into ``submitted/<id>/<a>/``.

    Accepted layouts: ``DIR/<id>/<anything>.ipynb`` or ``DIR/<id>.ipynb``; with ``--id-regex``,
    the ``id`` group of the regex applied to each file name (e.g. an LMS download
    ``(?P<id>[a-z0-9]+)_\\d+_.*\\.ipynb``). The file's modification time becomes timestamp.txt.
    """
    expected = chapter_notebooks()[a].name
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in p.parts:
            continue
        if id_regex:
            m = re.search(id_regex, p.name)
            if not m:
                continue
            sid = m.group("id")
        elif p.parent != folder:
            sid = p.relative_to(folder).parts[0]
        else:
            sid = p.stem
        sid = re.sub(r"[^A-Za-z0-9_.@-]", "_", sid)
        if sid in found:
            print(f"warning: two notebooks for {sid}: {found[sid].name}, {p.name} (kept the newer)")
            if p.stat().st_mtime < found[sid].stat().st_mtime:
                continue
        found[sid] = p
    for sid, p in found.items():
        ts = _dt.datetime.fromtimestamp(p.stat().st_mtime, _dt.timezone.utc)
        dest = course / "submitted" / sid / a
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.ipynb"):
            old.unlink()
        shutil.copy(p, dest / expected)
        (dest / "timestamp.txt").write_text(ts.strftime("%Y-%m-%d %H:%M:%S.%f %Z"))
    return sorted(found)


def preflight(course: Path, a: str, students: list[str] | None = None) -> dict[str, dict]:
    hooks = _hooks()
    out = {}
    for folder in sorted((course / "submitted").glob(f"*/{a}")):
        sid = folder.parent.name
        if students is None or sid in students:
            out[sid] = hooks.preflight_submission(str(course), a, sid, rename=True)
    return out


def autograde(course: Path, a: str, student: str = "*", env: dict | None = None,
              force: bool = True) -> float:
    """Preflight + ``nbgrader autograde``; returns the seconds nbgrader took."""
    subs = sorted(p.parent.name for p in (course / "submitted").glob(f"{student}/{a}"))
    preflight(course, a, subs)
    t0 = time.perf_counter()
    args = ["autograde", a, "--student", student] + (["--force"] if force else [])
    p = nbgrader(course, *args, env=env, check=False, capture=True)
    dt = time.perf_counter() - t0
    (course / "reports" / a).mkdir(parents=True, exist_ok=True)
    (course / "reports" / a / "autograde.log").write_text(p.stdout or "")
    failed = [s for s in subs if not (course / "autograded" / s / a).exists()]
    if p.returncode != 0 or failed:
        raise SystemExit(f"nbgrader autograde {a} failed for {failed or '?'} (exit {p.returncode}); "
                         f"log: {course / 'reports' / a / 'autograde.log'}")
    return dt


def secret_lines(course: Path | None = None) -> dict[str, set[str]]:
    """Lines that must never reach a learner, by kind (for the leak checks).

    ``solution``: reference regions of the library; ``hidden``: hidden-test blocks of the
    notebooks; ``grader``: the instructor-only ``vitseg_lab/_grader`` sources. Lines that also
    occur in material learners legitimately get (the library outside reference regions, the
    notebooks outside solutions and hidden tests) and very short lines are left out.
    """
    from tools.student import LIBRARY

    hooks = _hooks()
    sol, hid, grd, public = set(), set(), set(), set()
    for py in LIBRARY.rglob("*.py"):
        text = py.read_text()
        if "_grader" in py.parts:
            grd |= {ln.strip() for ln in text.splitlines()}
            continue
        inside = False
        for ln in text.splitlines():
            s = ln.strip()
            if s == "### BEGIN SOLUTION":
                inside = True
            elif s == "### END SOLUTION":
                inside = False
            elif inside:
                sol.add(s)
            else:
                public.add(s)
    for nb_path in chapter_notebooks().values():
        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            src = cell.source
            hidden = set(hooks.hidden_lines(src))
            hid |= hidden
            if cell.metadata.get("nbgrader", {}).get("solution"):
                continue
            public |= {ln.strip() for ln in src.splitlines()} - hidden

    def keep(lines: set[str]) -> set[str]:
        return {s for s in lines - public
                if len(s) >= 12 and not s.startswith(("#", '"""', "'''")) and re.search(r"\w", s)}

    # A learner's own code may coincide with a grader line ("d = C // num_heads"): only lines that
    # are not in any reference solution count as the grader's.
    return {"solution": keep(sol), "hidden": keep(hid - sol), "grader": keep(grd - sol - hid)}


def _text_of(path: Path) -> str:
    data = path.read_bytes()
    text = data.decode("utf-8", errors="ignore")
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


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def find_leaks(folder: Path, kinds: tuple[str, ...] = ("solution", "hidden", "grader"),
               secrets: dict[str, set[str]] | None = None) -> list[str]:
    """Every file under ``folder`` (text of every file, HTML tags removed) vs the secret lines."""
    secrets = secrets or secret_lines()
    lines = {(k, s) for k in kinds for s in secrets[k]}
    hits = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if "_grader" in p.parts:
            hits.append(f"{p}: instructor-only grader file")
            continue
        have = {ln.strip() for ln in _text_of(p).splitlines()}
        for kind, s in sorted(lines):
            if s in have:
                hits.append(f"{p}: {kind} line {s!r}")
    return hits


def feedback(course: Path, a: str, student: str = "*") -> list[str]:
    """``nbgrader generate_feedback`` + check that no hidden test or grader file reached it."""
    nbgrader(course, "generate_feedback", a, "--student", student, "--force", capture=True)
    leaks = []
    for folder in sorted((course / "feedback").glob(f"{student}/{a}")):
        leaks += find_leaks(folder, ("hidden", "grader"))
    if leaks:
        raise SystemExit("feedback leaks instructor material:\n" + "\n".join(leaks[:20]))
    return leaks


# ====================================================================================== results

def gradebook_scores(course: Path) -> dict[tuple[str, str], dict]:
    """{(student, assignment): {score, max_score, needs_manual_grade, grades: {id: (s, max)}}}."""
    from nbgrader.api import Gradebook, MissingEntry

    course = course.resolve()
    out = {}
    cid = os.environ.get("VITSEG_COURSE_ID", "vitseg-lab")
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", course_id=cid) as gb:
        for s in gb.students:
            for a in gb.assignments:
                try:
                    sub = gb.find_submission(a.name, s.id)
                except MissingEntry:
                    continue
                grades = {g.name: (g.score, g.max_score) for nb in sub.notebooks
                          for g in nb.grades}
                out[(s.id, a.name)] = dict(score=sub.score, max_score=sub.max_score,
                                           needs_manual_grade=sub.needs_manual_grade,
                                           grades=grades)
    return out


def exercise_points(course: Path, a: str) -> dict[str, dict[str, float]]:
    """{solution grade id: {test grade id: points}} — the test cells after each solution cell."""
    name = chapter_notebooks()[a].name
    nb = nbformat.read(course / "source" / a / name, as_version=4)
    out: dict[str, dict[str, float]] = {}
    current = None
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            current = meta["grade_id"]
            out.setdefault(current, {})
        elif meta.get("grade") and current is not None:
            out[current][meta["grade_id"]] = float(meta.get("points", 0))
    return out


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def score_table(course: Path, students: list[str] | None = None) -> str:
    scores = gradebook_scores(course)
    assignments = sorted({a for _, a in scores})
    studs = students or sorted({s for s, _ in scores})
    rows = [["student"] + assignments + ["total"]]
    for s in studs:
        row, tot, mx = [s], 0.0, 0.0
        for a in assignments:
            r = scores.get((s, a))
            if r is None:
                row.append("-")
                continue
            row.append(f"{r['score']:g}/{r['max_score']:g}" + (" *" if r["needs_manual_grade"] else ""))
            tot, mx = tot + r["score"], mx + r["max_score"]
        row.append(f"{tot:g}/{mx:g}")
        rows.append(row)
    return format_table(rows)


def write_scores_csv(course: Path, path: Path) -> None:
    scores = gradebook_scores(course)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "assignment", "cell", "score", "max_score", "needs_manual_grade"])
        for (s, a), r in sorted(scores.items()):
            for cell, (sc, mx) in sorted(r["grades"].items()):
                w.writerow([s, a, cell, sc, mx, r["needs_manual_grade"]])
            w.writerow([s, a, "TOTAL", r["score"], r["max_score"], r["needs_manual_grade"]])


def review_rows(course: Path) -> list[dict]:
    """Flagged lines of every preflight report (the monkeypatch scan) and structural repairs."""
    rows = []
    for rep in sorted((course / "reports").glob("*/preflight/*.json")):
        data = json.loads(rep.read_text())
        for nb, entry in data["notebooks"].items():
            for f in entry.get("findings", []):
                rows.append(dict(kind="patch", student=data["student"], assignment=data["assignment"],
                                 notebook=nb, cell=f["cell"], grade_id=f["grade_id"],
                                 line_no=f["line_no"], line=f["line"], reason=f["reason"]))
            for i in entry.get("issues", []):
                rows.append(dict(kind=i["kind"], student=data["student"],
                                 assignment=data["assignment"], notebook=nb, cell="",
                                 grade_id=i["grade_id"], line_no="", line="", reason=i["message"]))
    return rows


def write_review_csv(course: Path, path: Path | None = None) -> Path:
    path = path or course / "reports" / "review.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = review_rows(course)
    fields = ["kind", "student", "assignment", "notebook", "cell", "grade_id", "line_no", "line",
              "reason"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


# ========================================================================================= demo

DEMO_STUDENTS = ("demo-reference", "demo-empty", "demo-buggy")


def expected_demo(course: Path) -> dict[tuple[str, str], float]:
    """Expected scores: reference = max, empty = 0, buggy = max - points of mutated exercises."""
    out = {}
    for a in chapter_notebooks():
        pts = exercise_points(course, a)
        total = sum(sum(v.values()) for v in pts.values())
        _, planted = buggy_submission(course, a)
        lost = sum(sum(pts.get(m.exercise, {}).values()) for m in planted)
        out[("demo-reference", a)] = total
        out[("demo-empty", a)] = 0.0
        out[("demo-buggy", a)] = total - lost
    return out


def demo(course: Path = DEMO_COURSE, *, fresh: bool = True) -> tuple[str, bool, dict]:
    """Build the course, submit reference / empty / buggy for every chapter, autograde, compare."""
    if fresh and course.exists():
        shutil.rmtree(course)
    t0 = time.perf_counter()
    assignments = build_course(course)
    timings: dict[str, float] = {}
    for a in assignments:
        submit(course, "demo-reference", a, reference_submission(course, a))
        submit(course, "demo-empty", a, empty_submission(course, a))
        submit(course, "demo-buggy", a, buggy_submission(course, a)[0])
        timings[a] = autograde(course, a, "demo-*")
    for a in assignments:
        feedback(course, a, "demo-*")
    want = expected_demo(course)
    got = {k: v["score"] for k, v in gradebook_scores(course).items() if k in want}
    ok = all(abs(got.get(k, -1) - v) < 1e-9 for k, v in want.items())
    lines = [score_table(course, list(DEMO_STUDENTS)), ""]
    for a in assignments:
        for m in buggy_submission(course, a)[1]:
            lines.append(f"  demo-buggy {a}: {m.exercise}: {m.mistake}")
    lines.append("")
    lines.append("expected: " + ", ".join(f"{s} {a} = {v:g}" for (s, a), v in sorted(want.items())))
    lines.append("result: " + ("OK, every score as expected" if ok else "MISMATCH: " + ", ".join(
        f"{s} {a}: got {got.get((s, a))}, want {v:g}" for (s, a), v in sorted(want.items())
        if abs(got.get((s, a), -1) - v) > 1e-9)))
    per = sum(timings.values()) / len(DEMO_STUDENTS)
    lines.append(f"autograde time: {sum(timings.values()):.0f} s for {len(DEMO_STUDENTS)} "
                 f"learners x {len(assignments)} chapters (about {per:.0f} s per learner's course); "
                 f"total with build and feedback {time.perf_counter() - t0:.0f} s")
    return "\n".join(lines), ok, dict(got=got, want=want, timings=timings)


def bench(course: Path, repeats: int = 1) -> dict:
    """Seconds nbgrader takes to autograde one learner's whole course (reference submission)."""
    if course.exists():
        shutil.rmtree(course)
    assignments = build_course(course)
    results = {}
    for r in range(repeats):
        sid = f"bench-{r}"
        per = {}
        for a in assignments:
            submit(course, sid, a, reference_submission(course, a))
            per[a] = round(autograde(course, a, sid), 1)
        results[sid] = dict(per_chapter=per, total=round(sum(per.values()), 1))
    return dict(cpus=os.cpu_count(), load=os.getloadavg()[0], runs=results)


# ========================================================================================== CLI

def _assignments(names: list[str]) -> list[str]:
    known = chapter_notebooks()
    for a in names:
        if a not in known:
            raise SystemExit(f"unknown assignment {a!r}; chapters present: {', '.join(known)}")
    return names or list(known)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.grading", description=__doc__.splitlines()[0])
    ap.add_argument("--course", type=Path, default=None,
                    help=f"course folder (default {DEFAULT_COURSE.relative_to(ROOT)}; "
                         f"demo: {DEMO_COURSE.relative_to(ROOT)}; bench: "
                         f"{BENCH_COURSE.relative_to(ROOT)})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="generate source/ and release/ for every chapter notebook")
    p = sub.add_parser("collect", help="copy a folder of learner notebooks into submitted/")
    p.add_argument("assignment")
    p.add_argument("folder", type=Path)
    p.add_argument("--id-regex", default=None, help="regex with a group 'id' for the learner id")
    for name in ("preflight", "autograde", "feedback"):
        p = sub.add_parser(name)
        p.add_argument("assignments", nargs="*")
        p.add_argument("--student", default="*", help="learner id or glob (default: all)")
    p = sub.add_parser("scores", help="score table from the gradebook")
    p.add_argument("--csv", type=Path, default=None, help="also write per-cell scores here")
    p = sub.add_parser("export", help="nbgrader export (grades.csv) + per-cell CSV")
    p.add_argument("--to", type=Path, default=Path("grades.csv"))
    sub.add_parser("review", help="write reports/review.csv (scan findings + repairs)")
    sub.add_parser("demo", help="reference / empty / buggy submissions, autograded, table")
    p = sub.add_parser("bench", help="time to autograde one learner's course")
    p.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args(argv)

    default = {"demo": DEMO_COURSE, "bench": BENCH_COURSE}.get(a.cmd, DEFAULT_COURSE)
    course = (a.course or default).resolve()
    if a.cmd == "build":
        for aid, nb in build_course(course).items():
            print(f"{aid}: source/{aid}/{nb.name} -> release/{aid}/")
    elif a.cmd == "collect":
        ids = collect(course, a.assignment, a.folder.resolve(), a.id_regex)
        print(f"collected {len(ids)} submissions of {a.assignment}: {', '.join(ids)}")
    elif a.cmd == "preflight":
        for aid in _assignments(a.assignments):
            subs = None if a.student == "*" else [a.student]
            for sid, rep in preflight(course, aid, subs).items():
                n_i = sum(len(e["issues"]) for e in rep["notebooks"].values())
                n_f = sum(len(e["findings"]) for e in rep["notebooks"].values())
                print(f"{aid} {sid}: {n_i} repairs, {n_f} scan findings")
        print(f"review list: {write_review_csv(course)}")
    elif a.cmd == "autograde":
        for aid in _assignments(a.assignments):
            dt = autograde(course, aid, a.student)
            print(f"{aid}: autograded in {dt:.0f} s")
        print(f"review list: {write_review_csv(course)}")
    elif a.cmd == "feedback":
        for aid in _assignments(a.assignments):
            feedback(course, aid, a.student)
            print(f"{aid}: feedback/<student>/{aid}/*.html (no hidden test, no grader file)")
    elif a.cmd == "scores":
        print(score_table(course))
        if a.csv:
            write_scores_csv(course, a.csv)
            print(f"per-cell scores: {a.csv}")
    elif a.cmd == "export":
        to = a.to.resolve()
        nbgrader(course, "export", "--to", str(to))
        cells = to.with_name(to.stem + "-cells.csv")
        write_scores_csv(course, cells)
        print(f"grades: {to}\nper-cell scores: {cells}")
    elif a.cmd == "review":
        path = write_review_csv(course)
        rows = review_rows(course)
        for r in rows:
            print(f"{r['kind']:17} {r['student']:16} {r['assignment']} cell {r['cell']!s:>3} "
                  f"{r['line'] or r['reason']}")
        print(f"{len(rows)} rows -> {path}")
    elif a.cmd == "demo":
        text, ok, _ = demo(course)
        print(text)
        return 0 if ok else 1
    elif a.cmd == "bench":
        res = bench(course, a.repeats)
        print(json.dumps(res, indent=1))
        totals = [r["total"] for r in res["runs"].values()]
        print(f"autograding one learner's course ({len(chapter_notebooks())} chapters): "
              f"{min(totals):.0f} s (best of {len(totals)}; budget 180 s; "
              f"{res['cpus']} CPUs, load {res['load']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
