"""nbgrader end to end, with the real nbgrader: demo scores, tamper and fault cases, leaks.

The course is built and autograded once per session (conftest.py); every test reads its results.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tests.grading.tamper_cases import ATTACKS
from tools import grading as g

DEMO = g.DEMO_STUDENTS
TAMPER = "tamper"              # the learner conftest.py builds from the tamper and fault cases

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _autograded(course, student, a):
    return nbformat.read(course.root / "autograded" / student / a / course.assignments[a].name,
                         as_version=4)


def _feedback_html(course, student, a) -> str:
    path = course.root / "feedback" / student / a / (course.assignments[a].stem + ".html")
    return path.read_text()


# ------------------------------------------------------------------------------------- demo scores

def test_demo_scores_reference_full_empty_zero_buggy_exact(graded):
    """`make grade-demo` asserts the same numbers (tools.grading.demo)."""
    want = {k: v for k, v in g.expected_demo(graded.root).items() if k[1] in graded.assignments}
    got = g.gradebook_scores(graded.root)
    for (student, a), score in want.items():
        assert got[(student, a)]["score"] == pytest.approx(score), (student, a, got[(student, a)])
        assert not got[(student, a)]["needs_manual_grade"]
    for a in graded.assignments:
        assert want[("demo-reference", a)] == got[("demo-reference", a)]["max_score"] > 0
        assert want[("demo-buggy", a)] < want[("demo-reference", a)]
        if a in g.HIDDEN_ONLY:
            assert want[("demo-hidden", a)] < want[("demo-reference", a)]
    print("\n" + g.score_table(graded.root, [*DEMO, TAMPER]))
    print({a: f"{t:.0f} s" for a, t in graded.timings.items()})


def test_buggy_learner_loses_exactly_the_mutated_exercises(graded):
    got = g.gradebook_scores(graded.root)
    for a in graded.assignments:
        pts = g.exercise_points(graded.root, a)
        _, planted = g.buggy_submission(graded.root, a)
        mutated = {m.exercise for m in planted}
        for sol, tests in pts.items():
            for test, p in tests.items():
                score = got[("demo-buggy", a)]["grades"][test][0]
                assert score == (0 if sol in mutated else p), (a, sol, test, score)


# ------------------------------------------------------------------------------------------ leaks

def test_release_carries_no_reference_hidden_test_or_grader(graded, secrets):
    for a in graded.assignments:
        rel = graded.root / "release" / a
        assert not (rel / "vitseg_lab" / "_grader").exists()
        assert (rel / "vitseg_lab" / "attention.py").exists()     # the stub library is there
        assert g.find_leaks(rel, secrets=secrets) == []
        for p in rel.rglob("*"):
            if p.is_file():
                text = p.read_text(errors="ignore")
                assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text, p


def test_feedback_carries_no_hidden_test_or_grader(graded, secrets):
    folders = sorted((graded.root / "feedback").glob("*/*"))
    n_hidden = sum(1 for a in graded.assignments if a in g.HIDDEN_ONLY)
    n_tamper = 1 + len(ATTACKS) if "ch01" in graded.assignments else 0
    assert len(folders) == (len(DEMO) - 1) * len(graded.assignments) + n_hidden + n_tamper
    for folder in folders:
        assert not (folder / "vitseg_lab" / "_grader").exists(), folder
        assert g.find_leaks(folder, ("hidden", "grader"), secrets) == [], folder
    for a in graded.assignments:                  # the empty learner's feedback: nothing of ours
        assert g.find_leaks(graded.root / "feedback" / "demo-empty" / a, secrets=secrets) == []


def test_feedback_tells_the_learner_what_failed(graded):
    html = _feedback_html(graded, TAMPER, "ch01")
    # The hidden check's verdict reaches the learner; its code does not.
    assert "softmax gave wrong values on hidden case" in html
    assert "check_softmax" not in html and "_grader" not in html
    assert "Traceback truncated" in html
    empty = _feedback_html(graded, "demo-empty", "ch01")
    assert re.search(r"Exercise 1\.1 \(notebooks/01_vit_attention\.ipynb\) is not done yet", empty)


# ----------------------------------------------------------------------------- tamper and faults

@pytest.fixture(scope="module")
def tamper(graded):
    if "ch01" not in graded.assignments:
        pytest.skip("chapter 01 is not in this course")
    scores = g.gradebook_scores(graded.root)[(TAMPER, "ch01")]
    return graded, scores


def test_tamper_learner_scores_exactly_the_honest_exercises(tamper):
    graded, scores = tamper
    got = {k: v[0] for k, v in scores["grades"].items()}
    assert got == graded.expected_tamper
    assert scores["score"] == sum(graded.expected_tamper.values())
    assert not scores["needs_manual_grade"]


def test_undone_exercise_cannot_fall_back_on_the_installed_reference(tamper):
    """1.2 reverted to the stub and 1.3 calling "the library's own" function both score 0, though
    the instructor's library (reference solutions) is installed and on PYTHONPATH."""
    graded, scores = tamper
    import vitseg_lab.attention as instructor

    assert "### BEGIN SOLUTION" in Path(instructor.__file__).read_text()
    assert scores["grades"]["embed_tokens_test"][0] == 0
    assert scores["grades"]["resize_pos_embed_test"][0] == 0
    nb = _autograded(graded, TAMPER, "ch01")
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    (lib,) = re.findall(r"LIBRARY (\S+)", out)
    # the kernel's own assignment copy (in a worker course when graded in parallel)
    assert Path(lib).parent.as_posix().endswith(f"autograded/{TAMPER}/ch01/vitseg_lab"), lib


def test_monkeypatching_torch_and_numpy_does_not_buy_points_and_is_flagged(tamper):
    graded, scores = tamper
    assert scores["grades"]["softmax_test"][0] == 0
    rows = g.review_rows(graded.root)
    flagged = {r["line"] for r in rows if r["kind"] == "patch" and r["student"] == TAMPER}
    for line in ("torch.allclose = lambda *a, **k: True", "np.allclose = lambda *a, **k: True",
                 "torch.testing.assert_close = lambda *a, **k: None"):
        assert line in flagged
    assert any("_ORIGINALS" in line for line in flagged)
    honest = [r for r in rows if r["kind"] == "patch" and r["student"] in DEMO]
    assert honest == [], honest                   # no false alarm on the demo learners
    path = g.write_review_csv(graded.root)
    assert "torch.allclose = lambda" in path.read_text()


def test_deleted_test_cell_is_restored_and_graded(tamper):
    graded, scores = tamper
    assert scores["grades"]["patchify_test"] == (10.0, 10.0)
    nb = _autograded(graded, TAMPER, "ch01")
    ids = [c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells]
    assert ids.index("patchify") < ids.index("patchify_test") < ids.index("embed_tokens")


def test_duplicated_graded_cell_is_graded_once_with_a_clear_message(tamper):
    graded, scores = tamper
    assert scores["grades"]["multi_head_attention_test"] == (20.0, 20.0)
    html = _feedback_html(graded, TAMPER, "ch01")
    assert "Note from the grader" in html
    assert "multi_head_attention_test" in html and "appears 2 times" in html
    assert "Validate" in html
    logs = graded.root / "reports" / "ch01"
    log = ((logs / "logs" / f"{TAMPER}.log") if (logs / "logs" / f"{TAMPER}.log").exists()
           else logs / "autograde.log").read_text()
    assert "old version" not in log and "exists multiple times" not in log


def test_infinite_loop_times_out_and_the_rest_is_graded(tamper):
    graded, scores = tamper
    nb = _autograded(graded, TAMPER, "ch01")
    loop = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("while True"))
    names = {o.get("ename") for o in loop.outputs if o.output_type == "error"}
    assert names & {"CellTimeoutError", "KeyboardInterrupt"}, loop.outputs
    assert scores["grades"]["attention_rollout_test"] == (15.0, 15.0)   # the last exercise


def test_kernel_guard_refuses_a_library_outside_the_assignment(tmp_path, graded):
    """kernel_guard.py: the assignment copy is put first; without one, the kernel exits (86)."""
    guard = graded.root / "kernel_guard.py"
    env = dict(os.environ, NBGRADER_EXECUTION="autograde", PYTHONPATH=str(ROOT))
    code = f"exec(open({str(guard)!r}).read()); import vitseg_lab; print(vitseg_lab.__file__)"
    src = graded.root / "source" / next(iter(graded.assignments))
    ok = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, text=True,
                        capture_output=True)
    assert ok.returncode == 0 and ok.stdout.strip().startswith(str(src)), ok.stderr
    bad = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                         capture_output=True)
    assert bad.returncode == 86 and "refusing to grade" in bad.stderr


# ----------------------------------------------------------------------------------- grade export

def test_scores_csv_and_nbgrader_export(graded, tmp_path):
    cells = tmp_path / "cells.csv"
    g.write_scores_csv(graded.root, cells)
    rows = list(csv.DictReader(cells.open()))
    assert {r["student"] for r in rows} >= set(DEMO)
    total = [r for r in rows if r["student"] == "demo-reference" and r["cell"] == "TOTAL"]
    assert len(total) == len(graded.assignments)
    grades = tmp_path / "grades.csv"
    g.nbgrader(graded.root, "export", "--to", str(grades), capture=True)
    exported = list(csv.DictReader(grades.open()))
    # the course holds every chapter; this suite grades some of them ($VITSEG_GRADING_CHAPTERS)
    ref = [r for r in exported if r["student_id"] == "demo-reference"
           and r["assignment"] in graded.assignments]
    assert len(ref) == len(graded.assignments)
    assert all(float(r["score"]) == float(r["max_score"]) > 0 for r in ref)


def test_hidden_only_mistakes_are_caught_by_the_verdict_outside_the_kernel(graded):
    """demo-hidden passes every visible test; the exercises it loses carry the verdict that
    nbgrader's process computed after the kernel was gone (HiddenCheckFailed), and only them."""
    for a in graded.assignments:
        if a not in g.HIDDEN_ONLY:
            continue
        nb = _autograded(graded, "demo-hidden", a)
        planted = {m.exercise for m in g.hidden_only_submission(graded.root, a)[1]}
        tests = {t: sol for sol, ts in g.exercise_points(graded.root, a).items() for t in ts}
        for cell in nb.cells:
            gid = cell.metadata.get("nbgrader", {}).get("grade_id")
            if gid not in tests:
                continue
            errors = [o for o in cell.outputs if o.output_type == "error"]
            if tests[gid] in planted:
                assert [o.ename for o in errors] == ["HiddenCheckFailed"], (a, gid, errors)
            else:
                assert errors == [], (a, gid, errors)
