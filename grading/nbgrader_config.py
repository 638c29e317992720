# nbgrader configuration of the vitseg-lab course.
#
# `python -m tools.grading build` copies this file and its helper modules (vitseg_nbgrader.py,
# vitseg_sandbox.py, vitseg_edition.py, kernel_guard.py) into the
# course folder (default grading/course/) and generates source/ there; run every nbgrader command
# from that folder (or through `python -m tools.grading ...`). The course root is the folder this
# file sits in, found at run time: the course can be moved (e.g. to a JupyterHub server).
# Every setting below was checked on this stack (see /work/shared/GRADING.md and grading/README.md).
import os
import sys

from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import (
    AssignLatePenalties,
    CheckCellMetadata,
    ClearHiddenTests,
    GetGrades,
    IgnorePattern,
    LimitOutput,
    SaveAutoGrades,
)

c = get_config()  # noqa: F821

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vitseg_nbgrader as hooks  # course-local module, copied next to this file

c.CourseDirectory.root = HERE
c.CourseDirectory.course_id = os.environ.get("VITSEG_COURSE_ID", "vitseg-lab")

# ---- time budgets ------------------------------------------------------------------------------
# `Execute.timeout` is the setting nbgrader honours (not ExecutePreprocessor.timeout). On timeout the
# kernel is interrupted and the next cell runs, so an infinite loop costs one exercise, not the
# notebook. Cells tagged `long-running` (training: a smoke configuration under nbgrader) get more.
CELL_TIMEOUT = int(os.environ.get("VITSEG_CELL_TIMEOUT", "60"))
LONG_TIMEOUT = int(os.environ.get("VITSEG_LONG_CELL_TIMEOUT", "300"))
c.Execute.timeout = CELL_TIMEOUT
c.Execute.timeout_func = (
    lambda cell: LONG_TIMEOUT if "long-running" in cell.get("metadata", {}).get("tags", [])
    else CELL_TIMEOUT)
c.Execute.interrupt_on_timeout = True
# Output that arrives after the execute reply: nbclient waits 4 s by default, then nbgrader fails
# the whole notebook. On a loaded grading machine (several kernels per core) 4 s is too short.
c.Execute.iopub_timeout = int(os.environ.get("VITSEG_IOPUB_TIMEOUT", "60"))
# Every grading kernel first checks that `vitseg_lab` is the assignment folder's copy (the student
# edition's stubs from source/), not an installed instructor edition, and routes warnings/tqdm to
# stdout as the Validate button's kernel does (kernel_guard.py).
c.Execute.extra_arguments = [f"--IPKernelApp.exec_files={os.path.join(HERE, 'kernel_guard.py')}"]

# ---- the sandbox -------------------------------------------------------------------------------
# Every grading kernel runs in a bubblewrap sandbox as an unprivileged user that sees only its own
# assignment copy, with no network and limits on memory, processes, CPU time and file size; its
# PID namespace (every process it started) dies with it. Without bubblewrap or root it falls back
# to limits only and says so loudly (here, in the log, and in reports/<a>/sandbox.json).
# VITSEG_SANDBOX=require refuses to grade without the sandbox.
import vitseg_sandbox

c.Execute.kernel_manager_class = vitseg_sandbox.SandboxKernelManager
_mode, _why = vitseg_sandbox.probe()
if _mode != "bwrap":
    print(vitseg_sandbox.warning_text(_mode, _why), file=sys.stderr)

# ---- hidden checks: verdicts outside the kernel ------------------------------------------------
# The kernel only records the learner's outputs on inputs this process wrote from a fresh seed;
# this process compares them after the kernel is gone (vitseg_lab/_grader/autograde.py). The grader
# (instructor edition of vitseg_lab, with _grader/) is imported here, before any learner code runs;
# the assignment folders hold the student edition only, so a kernel cannot import it.
# SanitizeWorkdir (right after the kernel): symbolic links the kernel left are removed and its
# files given back to this user, before anything here reads or writes the folder. CapOutputs: no
# output of the graded notebook is larger than VITSEG_MAX_OUTPUT_KB (default 256).
# GradingExecute: nbgrader's Execute, except that a kernel that dies (os._exit, exit(), the memory
# limit) costs the exercises after it, not the whole notebook.
from vitseg_lab._grader.autograde import (
    ApplyVerdicts,
    CapOutputs,
    GradingExecute,
    SanitizeWorkdir,
    WriteGraderInputs,
)

c.Autograde.autograde_preprocessors = [
    WriteGraderInputs, GradingExecute, SanitizeWorkdir, ApplyVerdicts, CapOutputs, IgnorePattern,
    ClearMetadataPreprocessor, LimitOutput, SaveAutoGrades, AssignLatePenalties,
    CheckCellMetadata]

# ---- autograde ---------------------------------------------------------------------------------
# Tracebacks in the graded notebook keep the separator, "...truncated..." and the final error line
# only: the hidden test's frames never reach the feedback (with ClearHiddenTests below).
c.LimitOutput.max_traceback = 3
# A deleted test cell is put back and graded instead of scoring 0 pending manual grading.
c.OverwriteCells.add_missing_cells = True
# Per submission, before nbgrader reads it: duplicated/deleted/unknown graded cells repaired, a
# note for the learner, and the monkeypatch scan (reports/<assignment>/preflight/<student>.json).
c.Autograde.pre_convert_hook = hooks.autograde_preflight_hook
# Non-notebook files are always overwritten from source/ (the student-edition library + the
# grader): a learner can neither tamper with the library nor fall back on a reference.
c.Autograde.exclude_overwriting = {}

# ---- release and feedback ----------------------------------------------------------------------
c.GenerateAssignment.post_convert_hook = hooks.drop_instructor_files_from_release
c.GenerateFeedback.preprocessors = [GetGrades, hooks.ScrubHiddenTracebacks, ClearHiddenTests,
                                    hooks.PrerenderMath, CSSHTMLHeaderPreprocessor]
# Feedback pages work offline: the math is MathML (PrerenderMath, drawn by the browser itself) and
# the template templates/vitseg_feedback (= nbgrader's feedback template without nbconvert's
# MathJax <script> from a CDN) loads nothing from the network.
import nbgrader as _nbgrader

c.HTMLExporter.template_name = "vitseg_feedback"
c.HTMLExporter.extra_template_basedirs = [
    os.path.join(HERE, "templates"),
    os.path.join(os.path.dirname(_nbgrader.__file__), "server_extensions", "formgrader",
                 "templates")]
# feedback/<student>/<assignment>/ keeps the feedback pages (and nbgrader's timestamp.txt) only:
# no grader, no copy of the library, nothing the learner's kernel wrote.
c.GenerateFeedback.post_convert_hook = hooks.drop_instructor_files_from_feedback

# ---- optional: JupyterHub exchange (not needed for the offline workflow) -----------------------
# c.Exchange.root = "/srv/nbgrader/exchange"
