"""Autograding: preflight + nbgrader autograde, one learner after another or N at once.

``autograde(course, a, student)`` runs one ``nbgrader autograde`` over every learner matching the
glob, in the course folder (nbgrader grades them one at a time).

``autograde(..., jobs=N)`` grades N learners at once. Each learner is graded by its own
``nbgrader autograde`` in a private *worker course* (``<course>/.workers/<a>/<learner>/``: the
configuration, ``source/`` and ``release/`` of the assignment, a copy of the gradebook and the
submission), with its own sandbox user (``VITSEG_SANDBOX_SLOT``) and a wall-clock limit
(``VITSEG_LEARNER_TIMEOUT``, default 1800 s); a crash or a timeout fails that learner only. The
main process is the **only writer of the course gradebook**: it copies each worker's scores,
comments and late penalty into it (``merge``) and the graded notebook into ``autograded/``.

On a cluster the same two steps run as a SLURM job array (``slurm_script``: one array task per
learner runs ``python -m tools.grading grade-one``, a dependent job runs ``merge``), or through
``submitit`` (``submitit_autograde``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tools.course import COURSE_FILES, ROOT, hooks, nbgrader, sandbox

WORKERS = ".workers"


def learner_timeout() -> float:
    return float(os.environ.get("VITSEG_LEARNER_TIMEOUT", "1800"))


def submissions(course: Path, a: str, student: str = "*") -> list[str]:
    return sorted(p.parent.name for p in (course / "submitted").glob(f"{student}/{a}")
                  if p.is_dir())


def preflight(course: Path, a: str, students: list[str] | None = None) -> dict[str, dict]:
    h = hooks()
    out = {}
    for folder in sorted((course / "submitted").glob(f"*/{a}")):
        sid = folder.parent.name
        if students is None or sid in students:
            out[sid] = h.preflight_submission(str(course), a, sid, rename=True)
    return out


def sandbox_report(course: Path, a: str) -> dict:
    """The sandbox mode and limits the grading kernels get here; written next to the log. A
    fallback is printed as a warning (and stays in reports/<a>/sandbox.json)."""
    info = sandbox().describe()
    out = course / "reports" / a
    out.mkdir(parents=True, exist_ok=True)
    (out / "sandbox.json").write_text(json.dumps(info, indent=1))
    if info["warning"]:
        print(info["warning"], file=sys.stderr)
    return info


@dataclass
class Outcome:
    """What happened to one learner in a parallel run."""

    student: str
    ok: bool
    seconds: float
    message: str = ""
    log: str = ""
    extra: dict = field(default_factory=dict)


def autograde(course: Path, a: str, student: str = "*", env: dict | None = None,
              force: bool = True, jobs: int | None = None) -> float:
    """Preflight + ``nbgrader autograde``; returns the seconds grading took.

    ``jobs=None``: one nbgrader run over the glob. ``jobs=N``: N learners at once (see the module
    docstring). Raises ``SystemExit`` naming every learner that could not be graded (the others
    are graded and in the gradebook either way).
    """
    subs = submissions(course, a, student)
    preflight(course, a, subs)
    sandbox_report(course, a)
    (course / "reports" / a).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if jobs is None:
        args = ["autograde", a, "--student", student] + (["--force"] if force else [])
        p = nbgrader(course, *args, env=env, check=False, capture=True)
        dt = time.perf_counter() - t0
        (course / "reports" / a / "autograde.log").write_text(p.stdout or "")
        failed = [s for s in subs if not (course / "autograded" / s / a).exists()]
        if p.returncode != 0 or failed:
            raise SystemExit(f"nbgrader autograde {a} failed for {failed or '?'} (exit "
                             f"{p.returncode}); log: {course / 'reports' / a / 'autograde.log'}")
        return dt
    outcomes = autograde_parallel(course, a, subs, jobs=jobs, env=env)
    dt = time.perf_counter() - t0
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise SystemExit(f"autograde {a}: {len(failed)} of {len(outcomes)} learners failed: "
                         + "; ".join(f"{o.student}: {o.message}" for o in failed))
    return dt


# ======================================================================== one learner, privately

def worker_course(course: Path, a: str, student: str, where: Path | None = None) -> Path:
    """A private course folder to grade ``student``'s ``a`` in (config, source/, release/, a copy
    of the gradebook, the submission)."""
    w = (where or course / WORKERS / a / student).resolve()
    if w.exists():
        shutil.rmtree(w)
    w.mkdir(parents=True)
    for name in COURSE_FILES:
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(course / name, w / name)
    for part in ("source", "release"):
        shutil.copytree(course / part / a, w / part / a, symlinks=True)
    shutil.copy(course / "gradebook.db", w / "gradebook.db")
    shutil.copytree(course / "submitted" / student / a, w / "submitted" / student / a,
                    symlinks=True)
    return w


def grade_one(course: Path, a: str, student: str, *, slot: int = 0, env: dict | None = None,
              where: Path | None = None, timeout: float | None = None) -> Outcome:
    """Autograde one learner in a worker course; the course's gradebook is not touched."""
    t0 = time.perf_counter()
    try:
        w = worker_course(course, a, student, where)
    except OSError as e:
        return Outcome(student, False, 0.0, f"could not prepare the worker course ({e})")
    e = dict(os.environ, **(env or {}))
    e.pop("NBGRADER_EXECUTION", None)
    e["VITSEG_SANDBOX_SLOT"] = str(slot)
    e["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), e.get("PATH", "")])
    cmd = [sys.executable, "-m", "nbgrader", "autograde", a, "--student", student, "--force"]
    log = w / "autograde.log"
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=w, env=e, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout or learner_timeout())
            msg = "" if rc == 0 else f"nbgrader exited with {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc, msg = -9, f"timed out after {timeout or learner_timeout():.0f} s"
    graded = (w / "autograded" / student / a).is_dir()
    if rc == 0 and not graded:
        msg = "nbgrader did not write autograded/ (see the log)"
    (w / "outcome.json").write_text(json.dumps({"student": student, "ok": rc == 0 and graded,
                                                "message": msg}))
    return Outcome(student, rc == 0 and graded, time.perf_counter() - t0, msg, str(log))


def merge(course: Path, a: str, student: str, w: Path) -> None:
    """Copy one worker course's result into the course: the graded folder and, as the gradebook's
    single writer, the learner's scores, comments, late penalty and timestamp."""
    from nbgrader.api import Gradebook

    cid = os.environ.get("VITSEG_COURSE_ID", "vitseg-lab")
    src = w / "autograded" / student / a
    dst = course / "autograded" / student / a
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, symlinks=True)
    with Gradebook(f"sqlite:///{w / 'gradebook.db'}", course_id=cid) as wgb, \
            Gradebook(f"sqlite:///{course / 'gradebook.db'}", course_id=cid) as gb:
        ws = wgb.find_submission(a, student)
        st = wgb.find_student(student)
        gb.update_or_create_student(student, first_name=st.first_name, last_name=st.last_name,
                                    email=st.email, lms_user_id=st.lms_user_id)
        sub = gb.update_or_create_submission(a, student, timestamp=ws.timestamp)
        for wnb in ws.notebooks:
            nb = gb.find_submission_notebook(wnb.name, a, student)
            nb.late_submission_penalty = wnb.late_submission_penalty
            nb.flagged = wnb.flagged
            for wg in wnb.grades:
                g = gb.find_grade(wg.name, wnb.name, a, student)
                g.auto_score, g.needs_manual_grade = wg.auto_score, wg.needs_manual_grade
            for wc in wnb.comments:
                c = gb.find_comment(wc.name, wnb.name, a, student)
                c.auto_comment = wc.auto_comment
        gb.db.commit()
        del sub
    for rep in (w / "reports").glob(f"{a}/preflight/{student}.json"):
        out = course / "reports" / a / "preflight"
        out.mkdir(parents=True, exist_ok=True)
        if not (out / rep.name).exists():
            shutil.copy(rep, out / rep.name)
    logs = course / "reports" / a / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if (w / "autograde.log").exists():
        shutil.copy(w / "autograde.log", logs / f"{student}.log")


def autograde_parallel(course: Path, a: str, students: list[str], jobs: int = 2,
                       env: dict | None = None, keep: bool = False) -> list[Outcome]:
    """Grade ``students`` with ``jobs`` workers; merge each result as it comes (one writer)."""
    course = course.resolve()
    slots = list(range(jobs))
    outcomes: list[Outcome] = []

    def run(sid: str) -> Outcome:
        slot = slots.pop()
        try:
            return grade_one(course, a, sid, slot=slot, env=env)
        finally:
            slots.append(slot)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run, sid): sid for sid in students}
        for fut in as_completed(futures):
            sid = futures[fut]
            try:
                o = fut.result()
            except Exception as ex:  # noqa: BLE001 - one learner never stops the others
                o = Outcome(sid, False, 0.0, f"{type(ex).__name__}: {ex}")
            if o.ok:
                try:
                    merge(course, a, sid, course / WORKERS / a / sid)
                except Exception as ex:  # noqa: BLE001
                    o.ok, o.message = False, f"merge failed: {type(ex).__name__}: {ex}"
            outcomes.append(o)
            print(f"{a} {sid}: {'graded' if o.ok else 'FAILED'} in {o.seconds:.0f} s"
                  + (f" ({o.message}; log {o.log})" if o.message else ""), flush=True)
    summary = {o.student: {"ok": o.ok, "seconds": round(o.seconds, 1), "message": o.message}
               for o in outcomes}
    (course / "reports" / a).mkdir(parents=True, exist_ok=True)
    (course / "reports" / a / "parallel.json").write_text(json.dumps(
        {"jobs": jobs, "learners": summary}, indent=1))
    if not keep:
        for o in outcomes:
            if o.ok:
                shutil.rmtree(course / WORKERS / a / o.student, ignore_errors=True)
    return outcomes


def merge_all(course: Path, a: str) -> list[str]:
    """Merge every finished worker course of ``a`` (after a SLURM array); returns the merged."""
    done = []
    for w in sorted((course / WORKERS / a).glob("*/outcome.json")):
        info = json.loads(w.read_text())
        if info.get("ok"):
            merge(course, a, info["student"], w.parent)
            done.append(info["student"])
        else:
            print(f"{a} {info['student']}: not graded ({info.get('message')})", file=sys.stderr)
    return done


# ========================================================================== cluster: SLURM, submitit

SLURM_TEMPLATE = """\
#!/bin/bash
# Autograde {a} of {n} learners as a SLURM job array (one task per learner), then merge the
# results into the gradebook (one writer). Submit with:  sbatch {script}
#SBATCH --job-name=grade-{a}
#SBATCH --array=0-{last}%{parallel}
#SBATCH --cpus-per-task={cpus}
#SBATCH --mem={mem_gb}G
#SBATCH --time={minutes}
#SBATCH --output={course}/reports/{a}/slurm/%A_%a.out
set -euo pipefail
cd {root}
STUDENTS=({students})
SID=${{STUDENTS[$SLURM_ARRAY_TASK_ID]}}
# Each task grades in its own worker course; the sandbox user is per task (slot = task id % 1000).
VITSEG_SANDBOX_SLOT=$((SLURM_ARRAY_TASK_ID % 1000)) \\
  {python} -m tools.grading --course {course} grade-one {a} --student "$SID"
"""

SLURM_MERGE = """\
#!/bin/bash
# Runs after the array (sbatch --dependency=afterany:<array job id> {script}).
#SBATCH --job-name=merge-{a}
#SBATCH --time=60
#SBATCH --output={course}/reports/{a}/slurm/merge_%j.out
set -euo pipefail
cd {root}
{python} -m tools.grading --course {course} merge {a}
"""


def slurm_script(course: Path, a: str, students: list[str], out: Path, parallel: int = 64,
                 cpus: int = 1, mem_gb: int = 8, minutes: int = 45) -> tuple[Path, Path]:
    """Write the array script and the merge script; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (course / "reports" / a / "slurm").mkdir(parents=True, exist_ok=True)
    arr, mrg = out / f"grade_{a}.sbatch", out / f"merge_{a}.sbatch"
    common = {"a": a, "course": course.resolve(), "root": ROOT, "python": sys.executable}
    arr.write_text(SLURM_TEMPLATE.format(
        **common, n=len(students), last=max(len(students) - 1, 0), parallel=parallel, cpus=cpus,
        mem_gb=mem_gb, minutes=minutes, script=arr,
        students=" ".join(f'"{s}"' for s in students)))
    mrg.write_text(SLURM_MERGE.format(**common, script=mrg))
    return arr, mrg


def submitit_autograde(course: Path, a: str, students: list[str], folder: Path,
                       **slurm: object) -> list[Outcome]:
    """The job array through ``submitit`` (``pip install submitit``; SLURM parameters as
    ``slurm_partition=…``): one job per learner, then merge here. Not run in CI (no cluster)."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder))
    ex.update_parameters(timeout_min=int(learner_timeout() // 60) + 5, cpus_per_task=1,
                         **slurm)
    jobs = ex.map_array(lambda sid, slot: grade_one(course, a, sid, slot=slot % 1000),
                        students, list(range(len(students))))
    outcomes = []
    for sid, job in zip(students, jobs):
        try:
            o = job.result()
        except Exception as e:  # noqa: BLE001 - one learner never stops the others
            o = Outcome(sid, False, 0.0, f"{type(e).__name__}: {e}")
        if o.ok:
            merge(course, a, sid, course / WORKERS / a / sid)
        outcomes.append(o)
    return outcomes
