"""The grading demo (``make grade-demo``) and the autograding benchmark.

Four learners per chapter go through the real nbgrader: ``demo-reference`` (every solution cell
filled in with the reference), ``demo-empty`` (the release as is), ``demo-buggy`` (the first
planted bug of each exercise in the grader's ``DEMO``: mistakes the visible tests catch) and
``demo-hidden`` (``tools.submissions.HIDDEN_ONLY``: mistakes only the hidden checks catch, so
its lost points come from the verdicts nbgrader's process computes after the kernel is gone).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from tools.autograding import WORKERS, autograde
from tools.course import DEMO_COURSE, build_course, chapter_notebooks, nbgrader
from tools.feedback import feedback
from tools.results import exercise_points, gradebook_scores, score_table
from tools.submissions import (
    HIDDEN_ONLY,
    buggy_submission,
    empty_submission,
    hidden_only_submission,
    reference_submission,
    submit,
)

DEMO_STUDENTS = ("demo-reference", "demo-empty", "demo-buggy", "demo-hidden")


def expected_demo(course: Path) -> dict[tuple[str, str], float]:
    """Expected scores: reference = max, empty = 0, buggy / hidden = max - points of the mutated
    exercises."""
    out = {}
    for a in chapter_notebooks():
        pts = exercise_points(course, a)
        total = sum(sum(v.values()) for v in pts.values())
        out[("demo-reference", a)] = total
        out[("demo-empty", a)] = 0.0
        for sid, make in (("demo-buggy", buggy_submission), ("demo-hidden", hidden_only_submission)):
            if sid == "demo-hidden" and a not in HIDDEN_ONLY:
                continue
            _, planted = make(course, a)
            out[(sid, a)] = total - sum(sum(pts.get(m.exercise, {}).values()) for m in planted)
    return out


def submit_demo(course: Path, a: str) -> None:
    submit(course, "demo-reference", a, reference_submission(course, a))
    submit(course, "demo-empty", a, empty_submission(course, a))
    submit(course, "demo-buggy", a, buggy_submission(course, a)[0])
    if a in HIDDEN_ONLY:                    # the chapters with hidden-only mistakes written down
        submit(course, "demo-hidden", a, hidden_only_submission(course, a)[0])


def demo(course: Path = DEMO_COURSE, *, fresh: bool = True,
         jobs: int | None = None) -> tuple[str, bool, dict]:
    """Build the course, submit the demo learners for every chapter, autograde, compare."""
    if fresh and course.exists():
        shutil.rmtree(course)
    t0 = time.perf_counter()
    assignments = build_course(course)
    timings: dict[str, float] = {}
    for a in assignments:
        submit_demo(course, a)
        timings[a] = autograde(course, a, "demo-*", jobs=jobs)
    for a in assignments:
        feedback(course, a, "demo-*")
    want = expected_demo(course)
    got = {k: v["score"] for k, v in gradebook_scores(course).items() if k in want}
    ok = all(abs(got.get(k, -1) - v) < 1e-9 for k, v in want.items())
    lines = [score_table(course, list(DEMO_STUDENTS)), ""]
    for a in assignments:
        for sid, make in (("demo-buggy", buggy_submission), ("demo-hidden", hidden_only_submission)):
            if sid == "demo-hidden" and a not in HIDDEN_ONLY:
                continue
            for m in make(course, a)[1]:
                lines.append(f"  {sid} {a}: {m.exercise}: {m.mistake}")
    lines.append("")
    lines.append("expected: " + ", ".join(f"{s} {a} = {v:g}" for (s, a), v in sorted(want.items())))
    lines.append("result: " + ("OK, every score as expected" if ok else "MISMATCH: " + ", ".join(
        f"{s} {a}: got {got.get((s, a))}, want {v:g}" for (s, a), v in sorted(want.items())
        if abs(got.get((s, a), -1) - v) > 1e-9)))
    per = sum(timings.values()) / len(DEMO_STUDENTS)
    lines.append(f"autograde time: {sum(timings.values()):.0f} s for {len(DEMO_STUDENTS)} "
                 f"learners x {len(assignments)} chapters (about {per:.0f} s per learner's course); "
                 f"total with build and feedback {time.perf_counter() - t0:.0f} s")
    return "\n".join(lines), ok, {"got": got, "want": want, "timings": timings}


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
        results[sid] = {"per_chapter": per, "total": round(sum(per.values()), 1)}
    return {"cpus": os.cpu_count(), "load": os.getloadavg()[0], "runs": results}


def bench_parallel(course: Path, a: str, learners: int, jobs_list: tuple[int, ...] = (1, 2)
                   ) -> dict:
    """Learners per minute for each worker count: ``learners`` reference submissions of ``a``
    autograded with ``jobs`` workers (``python -m tools.grading bench --parallel``)."""
    if course.exists():
        shutil.rmtree(course)
    build_course(course)
    out = {"cpus": os.cpu_count(), "assignment": a, "learners": learners, "runs": {}}
    for jobs in jobs_list:
        prefix = f"bench-j{jobs}-"
        for i in range(learners):
            submit(course, f"{prefix}{i:03d}", a, reference_submission(course, a))
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        autograde(course, a, f"{prefix}*", jobs=jobs)
        dt = time.perf_counter() - t0
        out["runs"][jobs] = {"seconds": round(dt, 1), "per_minute": round(60 * learners / dt, 2),
                             "load_before": round(load, 1)}
    if 1 in out["runs"] and 2 in out["runs"]:
        out["ratio_2_over_1"] = round(out["runs"][2]["per_minute"] / out["runs"][1]["per_minute"],
                                      2)
    return out


# ============================================================ a reference learner in a real course

REFERENCE_LEARNER = "reference-check"


def add_reference_learner(course: Path, assignments: list[str], student: str = REFERENCE_LEARNER,
                          *, jobs: int | None = None, env: dict | None = None,
                          with_feedback: bool = True, remove: bool = False
                          ) -> tuple[str, bool, dict]:
    """The instructors' check on a real course: submit the reference solutions of each chapter
    in ``assignments`` as learner ``student``, autograde them in the course (its gradebook, its
    sandbox, its config), generate the feedback, and require full marks in every chapter (no
    cell left to grade by hand).

    ``python -m tools.grading add-reference-learner [ch01 ...]`` (exit 1 unless full marks).
    The learner stays in the gradebook, the grade export and ``feedback/`` unless ``remove``:
    then, if the check passed, it is taken out again (``nbgrader db student remove --force`` and
    its folders). Returns (report text, ok, {assignment: (score, max_score, expected)}).
    """
    course = course.resolve()
    if not (course / "gradebook.db").exists() or not (course / "source").is_dir():
        raise SystemExit(f"{course} is not a built course: run `python -m tools.grading build` "
                         "first (or pass --course)")
    results: dict[str, tuple[float, float, float]] = {}
    for a in assignments:
        submit(course, student, a, reference_submission(course, a))
        autograde(course, a, student, env=env, jobs=jobs)
        if with_feedback:
            feedback(course, a, student)
        pts = exercise_points(course, a)
        expected = sum(sum(v.values()) for v in pts.values())
        got = gradebook_scores(course).get((student, a))
        if got is None:
            results[a] = (float("nan"), float("nan"), expected)
            continue
        manual = got["needs_manual_grade"]
        results[a] = (got["score"], got["max_score"] if not manual else float("nan"), expected)
    ok = all(s == m == e and e > 0 for s, m, e in results.values())
    lines = [f"reference learner '{student}' in {course}:"]
    for a, (s, m, e) in results.items():
        verdict = "OK" if s == m == e and e > 0 else "NOT FULL MARKS"
        lines.append(f"  {a}: {s:g}/{m:g} (the notebook's test cells hold {e:g}) {verdict}")
        if verdict != "OK":
            lines.append(f"    see {course / 'autograded' / student / a} and "
                         f"{course / 'reports' / a}")
    if with_feedback:
        lines.append(f"  feedback: {course / 'feedback' / student}/<chapter>/*.html")
    if remove and ok:
        remove_learner(course, student)
        lines.append(f"  removed '{student}' again (gradebook, submitted/, autograded/, "
                     "feedback/)")
    else:                           # a failed check keeps its graded notebooks to look at
        lines.append(f"  '{student}' stays in the gradebook and the grade export; take it out "
                     f"with: cd {course} && nbgrader db student remove {student} --force")
    return "\n".join(lines), ok, {"scores": results}


def remove_learner(course: Path, student: str) -> None:
    """Take ``student`` out of the course: gradebook (with its grades) and its folders."""
    nbgrader(course, "db", "student", "remove", student, "--force", capture=True)
    for part in ("submitted", "autograded", "feedback", "preflight/originals"):
        folder = course / part / student
        if folder.exists():
            shutil.rmtree(folder)
    for rep in (course / "reports").glob(f"*/preflight/{student}.json"):
        rep.unlink()
    for w in (course / WORKERS).glob(f"*/{student}"):
        shutil.rmtree(w)
