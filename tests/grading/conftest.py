"""Session fixtures: one nbgrader course (built once, in a temporary folder), the demo learners
(reference / empty / buggy for every chapter present, hidden-only where written down) and the
chapter-01 tamper learners (the existing "tamper" plus one per group of attacks in tamper_cases.py),
autograded once — two learners at a time, each in its own worker course and sandbox, the course
gradebook written by this process only — and shared by every test of this folder.

The autograde run is made hostile on purpose: PYTHONPATH names the repository, so the instructor's
library (reference solutions and the grader included) is importable ahead of the assignment folder
outside the sandbox, on top of the editable install. Grades must still come from the notebooks'
cells alone.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

from tests.grading import tamper_cases as tm
from tools import grading as g
from tools import student as st

ROOT = Path(__file__).resolve().parents[2]
DEMO = g.DEMO_STUDENTS
TAMPER = "tamper"
TAMPER_CELL_TIMEOUT = 60           # seconds per cell (the infinite loop costs one; imports need ~20 s under load)
JOBS = 2                           # learners graded at once (tools.autograding.autograde_parallel)
ATTACKS = tm.ATTACKS


@dataclass
class Course:
    root: Path
    assignments: dict[str, Path]
    timings: dict[str, float] = field(default_factory=dict)
    expected_tamper: dict[str, float] = field(default_factory=dict)
    expected_attacks: dict[str, dict[str, float]] = field(default_factory=dict)
    protected: dict[str, bytes] = field(default_factory=dict)
    sandbox: dict = field(default_factory=dict)
    leftover_processes: list[str] = field(default_factory=list)


def _cells_by_id(nb):
    return {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("grade_id")}


def _with_body(source: str, body: list[str]) -> str:
    """Keep the decorator, signature and docstring of a solution cell; replace the body."""
    lines = source.splitlines()
    return "\n".join(lines[: g.docstring_end(lines)] + body)


def expected_points(course: Path, attacked: set[str]) -> dict[str, float]:
    """Per test cell: 0 for the exercises in ``attacked``, full points for the others."""
    return {test: (0.0 if sol in attacked else p)
            for sol, tests in g.exercise_points(course, "ch01").items() for test, p in tests.items()}


def tamper_ch01(course: Path) -> tuple[nbformat.NotebookNode, dict[str, float]]:
    """Chapter 01 submission combining the tamper and fault cases; returns it and the expected
    points per test cell."""
    nb = g.reference_submission(course, "ch01")
    cells = _cells_by_id(nb)
    stub = g.solution_cells(g.empty_submission(course, "ch01"))
    # 1.2 reverted to the release stub: 0, although the installed library holds the reference.
    cells["embed_tokens"].source = stub["embed_tokens"].source
    # 1.3 falls back on "the library's own version": in the grader that is the stub, so 0.
    cells["resize_pos_embed"].source = _with_body(cells["resize_pos_embed"].source, [
        "    from vitseg_lab.exercises import _ORIGINALS",
        ('    return _ORIGINALS[("vitseg_lab.attention", "resize_pos_embed")]('
         "pos_embed, old_grid, new_grid)"),
    ])
    # 1.4 wrong (overflows) and every comparison the visible tests use patched to pass: the hidden
    # check compares in a fresh process, so 0.
    cells["softmax"].source = _with_body(cells["softmax"].source, [
        "    e = torch.exp(logits)",
        "    return e / e.sum(dim=dim, keepdim=True)",
        "",
        "",
        "import numpy as np",
        "torch.allclose = lambda *a, **k: True",
        "torch.testing.assert_close = lambda *a, **k: None",
        "torch.equal = lambda *a, **k: True",
        "torch.isfinite = lambda x: torch.ones_like(x, dtype=torch.bool)",
        "np.allclose = lambda *a, **k: True",
    ])
    # 1.1's test cell deleted: put back and graded (10).
    nb.cells.remove(cells["patchify_test"])
    # 1.5's solution and test cells copy-pasted (new cell ids, as JupyterLab does): graded once.
    for gid in ("multi_head_attention", "multi_head_attention_test"):
        dup = copy.deepcopy(cells[gid])
        dup["id"] = f"copy-{gid}".replace("_", "-")
        nb.cells.insert(nb.cells.index(cells[gid]) + 1, dup)
    # A forgotten infinite loop in a scratch cell: times out, the rest is graded.
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(first_code + 1, nbformat.v4.new_code_cell("while True:\n    pass"))
    # Which library does the grading kernel import?
    nb.cells.append(nbformat.v4.new_code_cell(
        'import vitseg_lab\nprint("LIBRARY", vitseg_lab.__file__)'))
    pts = g.exercise_points(course, "ch01")
    expected = {}
    for sol, tests in pts.items():
        for test, p in tests.items():
            expected[test] = 0.0 if sol in ("embed_tokens", "resize_pos_embed", "softmax") else p
    return nb, expected


@pytest.fixture(scope="session")
def course(tmp_path_factory) -> Course:
    root = tmp_path_factory.mktemp("grading") / "course"
    assignments = g.build_course(root)
    return Course(root=root, assignments=assignments)


@pytest.fixture(scope="session")
def graded(course: Course) -> Course:
    """Every demo learner in every chapter, plus the tamper learner in chapter 01, autograded;
    feedback generated.

    Chapters graded: $VITSEG_GRADING_CHAPTERS (comma-separated, or "all"; default ch01,ch03 —
    the whole course is `make grade-demo`'s job, this suite has a few minutes)."""
    import os

    only = os.environ.get("VITSEG_GRADING_CHAPTERS", "ch01,ch03")
    chosen = {a: p for a, p in course.assignments.items()
              if only == "all" or a in only.split(",")}
    course = Course(root=course.root, assignments=chosen or course.assignments)
    root = course.root
    for a in course.assignments:
        g.submit(root, "demo-reference", a, g.reference_submission(root, a))
        g.submit(root, "demo-empty", a, g.empty_submission(root, a))
        g.submit(root, "demo-buggy", a, g.buggy_submission(root, a)[0])
        if a in g.HIDDEN_ONLY:
            g.submit(root, "demo-hidden", a, g.hidden_only_submission(root, a)[0])
    if "ch01" in course.assignments:
        nb, course.expected_tamper = tamper_ch01(root)
        g.submit(root, TAMPER, "ch01", nb)
        for sid, build in ATTACKS.items():
            nb, attacked = build(root)
            path = g.submit(root, sid, "ch01", nb)
            course.expected_attacks[sid] = expected_points(root, attacked)
            if sid == "tamper-proc":
                tm.forged_grading_dir(path.parent)
    for name in ("gradebook.db", "nbgrader_config.py", "vitseg_nbgrader.py", "kernel_guard.py",
                 "vitseg_sandbox.py", "source/ch01/01_vit_attention.ipynb"):
        if (root / name).exists() and name != "gradebook.db":
            course.protected[name] = (root / name).read_bytes()
    course.sandbox = g.sandbox_report(root, "ch01")
    env = {"PYTHONPATH": str(ROOT), "VITSEG_CELL_TIMEOUT": str(TAMPER_CELL_TIMEOUT)}
    for a in course.assignments:
        t0 = time.perf_counter()
        try:
            g.autograde(root, a, "*", env=env, jobs=JOBS)
        except SystemExit as e:          # a learner that could not be graded: tests say which
            print(e)
        course.timings[a] = time.perf_counter() - t0
        g.nbgrader(root, "generate_feedback", a, "--force", capture=True)
    course.leftover_processes = sandbox_processes()
    return course


def sandbox_processes() -> list[str]:
    """Processes still running as a sandbox user (the kernels' users), as 'pid cmdline'."""
    base = g.sandbox_module().BASE_UID
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            uid = int(next(ln for ln in (d / "status").read_text().splitlines()
                           if ln.startswith("Uid:")).split()[1])
            if base <= uid < base + 1000:
                out.append(f"{d.name} {(d / 'cmdline').read_bytes()[:200]!r}")
        except (OSError, StopIteration, ValueError):
            continue
    return out


@pytest.fixture(scope="session")
def student_edition(course: Course, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "student"
    st.build_student(out, course.root, rebuild=False)
    return out


@pytest.fixture(scope="session")
def secrets():
    return g.secret_lines()

