"""The tamper suite of issue #11, with the real nbgrader (the learners are built in
tamper_cases.py and graded once per session in conftest.py, two at a time, each in its own
sandbox).

For every group of attacks: exactly the honest exercises score; no other learner's grade moves;
no hidden-test, grader or planted line reaches the feedback; grading goes on (every learner is in
the gradebook). What only the sandbox can stop (reading and writing other parts of the course,
detached processes, memory, processes) is asserted in bwrap mode, which the sandbox tests report.
"""

from __future__ import annotations

import json
import os
import re
import site
from pathlib import Path

import nbformat
import pytest

from tests.grading.tamper_cases import ATTACKS
from tools import grading as g

TAMPER = "tamper"

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _nb(graded, student):
    return nbformat.read(graded.root / "autograded" / student / "ch01" /
                         graded.assignments["ch01"].name, as_version=4)


def _outputs(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", "") if isinstance(o.get("text", ""), str)
                         else "".join(o["text"]))
            parts.append(f"{o.get('ename', '')}: {o.get('evalue', '')}")
            parts += [str(v) for v in o.get("data", {}).values()]
    return "\n".join(parts)


def _errors_of(nb, grade_id) -> list[str]:
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
    return [o.get("ename", "") for o in cell.outputs if o.output_type == "error"]


@pytest.fixture(scope="module")
def ch01(graded):
    if "ch01" not in graded.assignments:
        pytest.skip("chapter 01 is not in this course")
    return graded


@pytest.fixture(scope="module")
def bwrap(ch01):
    if ch01.sandbox["mode"] != "bwrap":
        pytest.skip(f"sandbox not available here ({ch01.sandbox['why']}); what only the sandbox "
                    "stops is not asserted in limits-only mode")
    return ch01


# ----------------------------------------------------------------------------------- the sandbox

def test_the_sandbox_mode_is_reported_and_required_where_it_works(ch01):
    """Which mode ran is printed here and written to reports/ch01/sandbox.json; a fallback comes
    with a loud warning in every learner's autograde log."""
    info = json.loads((ch01.root / "reports" / "ch01" / "sandbox.json").read_text())
    print(f"\nsandbox mode: {info['mode']} ({info['why']}); limits {info['limits']}")
    if os.environ.get("VITSEG_SANDBOX") == "require" or (
            os.geteuid() == 0 and Path("/usr/bin/bwrap").exists()):
        assert info["mode"] == "bwrap", info
    logs = sorted((ch01.root / "reports" / "ch01" / "logs").glob("*.log"))
    assert logs, "no per-learner autograde log"
    warned = ["VITSEG SANDBOX WARNING" in p.read_text() for p in logs]
    assert all(warned) if info["mode"] != "bwrap" else not any(warned)


def test_every_learner_is_graded_and_nothing_outlives_its_kernel(ch01):
    scores = g.gradebook_scores(ch01.root)
    for sid in [TAMPER, *ATTACKS, "demo-reference", "demo-empty", "demo-buggy"]:
        assert (sid, "ch01") in scores, f"{sid} was not graded"
    assert ch01.leftover_processes == [], ch01.leftover_processes


# ------------------------------------------------------------------------------------ the attacks

@pytest.mark.parametrize("student", list(ATTACKS))
def test_attack_scores_exactly_the_honest_exercises(ch01, student):
    scores = g.gradebook_scores(ch01.root)[(student, "ch01")]
    got = {k: v[0] for k, v in scores["grades"].items()}
    assert got == ch01.expected_attacks[student], (student, got)
    assert scores["max_score"] == sum(p for _, p in scores["grades"].values())
    assert scores["max_score"] == g.gradebook_scores(ch01.root)[("demo-reference", "ch01")][
        "max_score"]


@pytest.mark.parametrize("student", list(ATTACKS))
def test_attack_feedback_shows_no_hidden_test_or_grader_line(ch01, student, secrets):
    folder = ch01.root / "feedback" / student / "ch01"
    assert folder.is_dir(), f"no feedback for {student}"
    assert g.find_leaks(folder, ("hidden", "grader"), secrets) == []
    assert not list(folder.rglob("_grader")) and not (folder / ".vitseg_grading").exists()


def test_in_kernel_verdict_attacks_cannot_reach_the_grader(ch01):
    """Patched readers, a replaced __code__, emptied cases, a lying tensor subclass, importing the
    references: the verdict is computed in nbgrader's process on plain data."""
    nb = _nb(ch01, "tamper-verdict")
    out = _outputs(nb)
    assert "grader not importable: ModuleNotFoundError" in out
    assert "import refused: ModuleNotFoundError" in out
    for gid in ("embed_tokens_test", "resize_pos_embed_test", "multi_head_attention_test"):
        assert _errors_of(nb, gid) == ["HiddenCheckFailed"], gid   # the visible tests passed
    for gid in ("patchify_test", "attention_rollout_test"):     # the patches broke the kernel's
        assert _errors_of(nb, gid), gid                          # own recorder / a lying tensor
    assert _errors_of(nb, "softmax_test") == []


def test_ipython_hooks_cannot_swallow_the_hidden_block(ch01):
    """Input/AST transformers and a pre_run_cell hook remove the asserts and the record call, and
    tracebacks are silenced: nbgrader sees clean cells, the records are missing, so 0."""
    nb = _nb(ch01, "tamper-ipython")
    for gid in ("multi_head_attention_test", "attention_rollout_test"):
        assert _errors_of(nb, gid), gid           # HiddenCheckFailed, unless an error came first
    assert _errors_of(nb, "softmax_test") == []


def test_forged_records_and_exits_change_nothing(ch01):
    nb = _nb(ch01, "tamper-proc")
    assert "HiddenCheckFailed" in _errors_of(nb, "attention_rollout_test")
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    # exit() only asks the client to end the kernel (ipykernel's ask_exit payload): the CI run of
    # 2026-12-02 saw the next cell run in the same kernel, the runs before saw KernelDied. Either
    # way nothing else may appear: what must hold is the grade and the absent forged records.
    assert [o.ename for o in last.outputs if o.output_type == "error"] in (["KernelDied"], [])
    folder = ch01.root / "autograded" / "tamper-proc" / "ch01"
    assert not (folder / ".vitseg_grading").exists()


def test_metadata_edits_are_undone_by_the_gradebook(ch01):
    scores = g.gradebook_scores(ch01.root)[("tamper-meta", "ch01")]
    assert scores["grades"]["multi_head_attention_test"] == (20.0, 20.0)
    assert "attention_rollout" not in scores["grades"]


# ------------------------------------------------------------------------- what only the sandbox stops

def test_the_kernel_sees_no_course_no_classmate_and_no_instructor_file(bwrap):
    out = _outputs(_nb(bwrap, "tamper-disk"))
    assert "classmate or instructor notebook found: None" in out
    assert not re.search(r"^WROTE", out, re.MULTILINE)
    assert "gradebook refused" in out
    assert "read refused: FileNotFoundError" in _outputs(_nb(bwrap, "tamper-verdict"))


def test_no_file_outside_the_kernel_folder_was_written(bwrap):
    for name, before in bwrap.protected.items():
        assert (bwrap.root / name).read_bytes() == before, name
    for d in site.getsitepackages():
        assert not (Path(d) / "sitecustomize.py").exists() or "VT_PWNED" not in (
            Path(d) / "sitecustomize.py").read_text()
    assert "VT_PWNED" not in (ROOT / "vitseg_lab" / "_grader" / "common.py").read_text()
    classmate = _nb(bwrap, "demo-reference")
    assert "VT_PWNED" not in json.dumps(classmate)


def test_memory_processes_and_output_are_limited(bwrap):
    nb = _nb(bwrap, "tamper-proc")
    out = _outputs(nb)
    assert "allocation refused: bytearray MemoryError" in out
    assert "allocation refused: torch RuntimeError" in out
    assert "ALLOCATED" not in out
    assert "fork refused after" in out
    assert "characters of output removed by the grader" in out
    path = bwrap.root / "autograded" / "tamper-proc" / "ch01" / bwrap.assignments["ch01"].name
    assert path.stat().st_size < 5 * 2**20
    assert not (path.parent / "daemon_was_here.txt").exists()


def test_warnings_and_tqdm_in_graded_cells_cost_nothing(ch01):
    """tamper-disk's softmax is correct but warns and draws a tqdm bar on every call: its test
    cell and the later ones that call it keep full marks; the noise is on stdout, not stderr."""
    scores = g.gradebook_scores(ch01.root)[("tamper-disk", "ch01")]["grades"]
    assert scores["softmax_test"] == (10.0, 10.0)
    assert scores["multi_head_attention_test"] == (20.0, 20.0)
    nb = _nb(ch01, "tamper-disk")
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") ==
                "softmax_test")
    streams = {o.name: o.text for o in cell.outputs if o.output_type == "stream"}
    assert "stderr" not in streams, streams
