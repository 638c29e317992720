"""The nbgrader course of vitseg-lab, from the command line (see grading/README.md).

    python -m tools.grading build                  # course folder: source/ from notebooks/, release/
    python -m tools.grading collect ch01 DIR       # a folder of notebooks -> submitted/<id>/ch01/
    python -m tools.grading autograde [ch01 ...]   # preflight (fixes + scan) + nbgrader autograde
           [--jobs N]                              #   N learners at once, one gradebook writer
    python -m tools.grading feedback [ch01 ...]    # nbgrader generate_feedback + leak check
    python -m tools.grading scores [--csv F]       # per-exercise table from the gradebook
    python -m tools.grading export [--to F]        # <course>/reports/grades.csv (+ per-cell CSV)
    python -m tools.grading review                 # submissions flagged by the monkeypatch scan
    python -m tools.grading sandbox                # the grading kernel's sandbox mode and limits
    python -m tools.grading slurm ch01             # SLURM job-array scripts for a whole class
    python -m tools.grading demo                   # reference / empty / buggy / hidden-only learners
    python -m tools.grading add-reference-learner [ch01 ...]  # check a real course: full marks?
    python -m tools.grading bench [--parallel N]   # seconds per learner; learners/min, 1 vs 2 jobs

The work is done by one module per job: ``tools.course`` (the course folder and its build),
``tools.submissions`` (collecting, synthetic learners), ``tools.autograding`` (preflight, nbgrader
autograde, parallel and cluster grading), ``tools.feedback`` (feedback + leak check),
``tools.results`` (the gradebook), ``tools.demo`` (demo and benchmarks), ``tools.edition`` (the
marker grammar). This module is the command line; it re-exports their names for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tools.autograding import (
    autograde,
    autograde_parallel,
    grade_one,
    merge,
    merge_all,
    preflight,
    sandbox_report,
    slurm_script,
    submissions,
)
from tools.course import (
    BENCH_COURSE,
    DEFAULT_COURSE,
    DEMO_COURSE,
    ROOT,
    assignments,
    build_course,
    cell_budgets,
    chapter_notebooks,
    hooks,
    nbgrader,
    undefined_names,
)
from tools.course import sandbox as sandbox_module
from tools.demo import (
    DEMO_STUDENTS,
    REFERENCE_LEARNER,
    add_reference_learner,
    bench,
    bench_parallel,
    demo,
    expected_demo,
    remove_learner,
)
from tools.feedback import feedback, feedback_problems, find_leaks, secret_lines
from tools.results import (
    exercise_points,
    export_grades,
    exports_dir,
    gradebook_scores,
    review_rows,
    score_table,
    write_review_csv,
    write_scores_csv,
)
from tools.submissions import (
    HIDDEN_ONLY,
    Mutation,
    buggy_submission,
    collect,
    demo_mutations,
    docstring_end,
    empty_submission,
    hidden_only_submission,
    reference_submission,
    solution_cells,
    submit,
)

__all__ = [
    "BENCH_COURSE",
    "DEFAULT_COURSE",
    "DEMO_COURSE",
    "DEMO_STUDENTS",
    "HIDDEN_ONLY",
    "REFERENCE_LEARNER",
    "Mutation",
    "add_reference_learner",
    "autograde",
    "autograde_parallel",
    "bench",
    "bench_parallel",
    "buggy_submission",
    "build_course",
    "cell_budgets",
    "chapter_notebooks",
    "collect",
    "demo",
    "demo_mutations",
    "docstring_end",
    "empty_submission",
    "exercise_points",
    "expected_demo",
    "export_grades",
    "feedback",
    "feedback_problems",
    "find_leaks",
    "grade_one",
    "gradebook_scores",
    "hidden_only_submission",
    "hooks",
    "main",
    "merge",
    "merge_all",
    "nbgrader",
    "preflight",
    "reference_submission",
    "remove_learner",
    "review_rows",
    "sandbox_module",
    "sandbox_report",
    "score_table",
    "secret_lines",
    "slurm_script",
    "solution_cells",
    "submissions",
    "submit",
    "undefined_names",
    "write_review_csv",
    "write_scores_csv",
]


# ========================================================================== one function per command

def cmd_build(course: Path, a: argparse.Namespace) -> int:
    for aid, nb in build_course(course).items():
        print(f"{aid}: source/{aid}/{nb.name} -> release/{aid}/")
    return 0


def cmd_collect(course: Path, a: argparse.Namespace) -> int:
    ids = collect(course, a.assignment, a.folder.resolve(), a.id_regex)
    print(f"collected {len(ids)} submissions of {a.assignment}: {', '.join(ids)}")
    return 0


def cmd_preflight(course: Path, a: argparse.Namespace) -> int:
    for aid in assignments(a.assignments):
        subs = None if a.student == "*" else [a.student]
        for sid, rep in preflight(course, aid, subs).items():
            n_i = sum(len(e["issues"]) for e in rep["notebooks"].values())
            n_f = sum(len(e["findings"]) for e in rep["notebooks"].values())
            print(f"{aid} {sid}: {n_i} repairs, {n_f} scan findings")
    print(f"review list: {write_review_csv(course)}")
    return 0


def cmd_autograde(course: Path, a: argparse.Namespace) -> int:
    for aid in assignments(a.assignments):
        dt = autograde(course, aid, a.student, jobs=a.jobs)
        info = json.loads((course / "reports" / aid / "sandbox.json").read_text())
        print(f"{aid}: autograded in {dt:.0f} s (grading kernels: sandbox mode {info['mode']})")
    print(f"review list: {write_review_csv(course)}")
    return 0


def cmd_grade_one(course: Path, a: argparse.Namespace) -> int:
    """One learner in its worker course (a SLURM array task); ``merge`` brings it in."""
    o = grade_one(course, a.assignment, a.student)
    print(f"{a.assignment} {a.student}: {'graded' if o.ok else 'FAILED: ' + o.message}")
    return 0 if o.ok else 1


def cmd_merge(course: Path, a: argparse.Namespace) -> int:
    done = merge_all(course, a.assignment)
    print(f"{a.assignment}: merged {len(done)} learners into the gradebook")
    return 0


def cmd_slurm(course: Path, a: argparse.Namespace) -> int:
    studs = submissions(course, a.assignment)
    preflight(course, a.assignment, studs)
    arr, mrg = slurm_script(course, a.assignment, studs, a.out or course / "slurm",
                            parallel=a.parallel)
    print(f"{len(studs)} learners. Submit:\n  jid=$(sbatch --parsable {arr})\n"
          f"  sbatch --dependency=afterany:$jid {mrg}")
    return 0


def cmd_feedback(course: Path, a: argparse.Namespace) -> int:
    for aid in assignments(a.assignments):
        feedback(course, aid, a.student)
        print(f"{aid}: feedback/<student>/{aid}/*.html (no hidden test, no grader file)")
    return 0


def cmd_scores(course: Path, a: argparse.Namespace) -> int:
    print(score_table(course))
    if a.csv:
        path = a.csv if a.csv.is_absolute() else exports_dir(course) / a.csv
        path.parent.mkdir(parents=True, exist_ok=True)
        write_scores_csv(course, path)
        print(f"per-cell scores: {path}")
    return 0


def cmd_export(course: Path, a: argparse.Namespace) -> int:
    to, cells = export_grades(course, a.to)
    print(f"grades: {to}\nper-cell scores: {cells}")
    return 0


def cmd_review(course: Path, a: argparse.Namespace) -> int:
    path = write_review_csv(course)
    rows = review_rows(course)
    for r in rows:
        print(f"{r['kind']:17} {r['student']:16} {r['assignment']} cell {r['cell']!s:>3} "
              f"{r['line'] or r['reason']}")
    print(f"{len(rows)} rows -> {path}")
    return 0


def cmd_sandbox(course: Path, a: argparse.Namespace) -> int:
    from tools.course import sandbox

    print(json.dumps(sandbox().describe(), indent=1))
    return 0


def cmd_demo(course: Path, a: argparse.Namespace) -> int:
    text, ok, _ = demo(course, jobs=a.jobs)
    print(text)
    return 0 if ok else 1


def cmd_add_reference_learner(course: Path, a: argparse.Namespace) -> int:
    text, ok, _ = add_reference_learner(course, assignments(a.assignments), a.student,
                                        jobs=a.jobs, remove=a.remove)
    print(text)
    return 0 if ok else 1


def cmd_bench(course: Path, a: argparse.Namespace) -> int:
    if a.parallel:
        res = bench_parallel(course, a.assignment or next(iter(chapter_notebooks())), a.parallel)
        print(json.dumps(res, indent=1))
        return 0
    res = bench(course, a.repeats)
    print(json.dumps(res, indent=1))
    totals = [r["total"] for r in res["runs"].values()]
    print(f"autograding one learner's course ({len(chapter_notebooks())} chapters): "
          f"{min(totals):.0f} s (best of {len(totals)}; budget 180 s; "
          f"{res['cpus']} CPUs, load {res['load']:.1f})")
    return 0


COMMANDS = {
    "build": cmd_build, "collect": cmd_collect, "preflight": cmd_preflight,
    "autograde": cmd_autograde, "grade-one": cmd_grade_one, "merge": cmd_merge,
    "slurm": cmd_slurm, "feedback": cmd_feedback, "scores": cmd_scores, "export": cmd_export,
    "review": cmd_review, "sandbox": cmd_sandbox, "demo": cmd_demo, "bench": cmd_bench,
    "add-reference-learner": cmd_add_reference_learner,
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.grading",
                                 description=__doc__.splitlines()[0])
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
        if name == "autograde":
            p.add_argument("--jobs", type=int, default=None,
                           help="grade N learners at once (each in its own worker course and "
                                "sandbox; one writer to the gradebook)")
    for name in ("grade-one", "merge", "slurm"):
        p = sub.add_parser(name)
        p.add_argument("assignment")
        if name == "grade-one":
            p.add_argument("--student", required=True)
        if name == "slurm":
            p.add_argument("--out", type=Path, default=None)
            p.add_argument("--parallel", type=int, default=64, help="array tasks at once")
    p = sub.add_parser("scores", help="score table from the gradebook")
    p.add_argument("--csv", type=Path, default=None,
                   help="also write per-cell scores to this file (relative: inside "
                        "<course>/reports/)")
    p = sub.add_parser("export", help="nbgrader export (grades.csv) + per-cell CSV, into "
                                      "<course>/reports/")
    p.add_argument("--to", type=Path, default=None,
                   help="file name (default grades.csv); a relative path is taken inside "
                        "<course>/reports/, never the current directory")
    sub.add_parser("review", help="write reports/review.csv (scan findings + repairs)")
    sub.add_parser("sandbox", help="the grading kernel's sandbox mode and limits on this machine")
    p = sub.add_parser("demo", help="reference / empty / buggy / hidden-only, autograded, table")
    p.add_argument("--jobs", type=int, default=None)
    p = sub.add_parser("add-reference-learner",
                       help="a real course's check: the reference solutions as one more learner, "
                            "autograded and given feedback there; exit 1 unless full marks")
    p.add_argument("assignments", nargs="*", help="chapters (default: all)")
    p.add_argument("--student", default=REFERENCE_LEARNER,
                   help=f"the learner id (default {REFERENCE_LEARNER})")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--remove", action="store_true",
                   help="take the learner out of the gradebook and the folders after the check")
    p = sub.add_parser("bench", help="time to autograde one learner's course")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--parallel", type=int, default=0, metavar="LEARNERS",
                   help="instead: learners per minute with 1 and 2 workers on LEARNERS copies")
    p.add_argument("--assignment", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    default = {"demo": DEMO_COURSE, "bench": BENCH_COURSE}.get(a.cmd, DEFAULT_COURSE)
    course = (a.course or default).resolve()
    return COMMANDS[a.cmd](course, a)


if __name__ == "__main__":
    sys.exit(main())
