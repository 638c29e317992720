"""The grading kernel's sandbox (grading/vitseg_sandbox.py) on its own, with a real kernel started
the way nbgrader starts it, and the pins and grammar the grading stack relies on. Which mode ran is
printed (``-s``) and, in bwrap mode, asserted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
import tomllib
from nbclient import NotebookClient

from tools import edition
from tools import grading as g

ROOT = Path(__file__).resolve().parents[2]
sandbox = g.sandbox_module()


def _run(cells: list[str], work: Path, timeout: int = 120, short: int = 5):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(
        nb, timeout=timeout, interrupt_on_timeout=True, allow_errors=True,
        timeout_func=lambda cell: short if "while True" in cell.source else timeout,
        kernel_manager_class=sandbox.SandboxKernelManager, kernel_name="python3",
        resources={"metadata": {"path": str(work)}})
    client.execute()
    return ["".join(o.get("text", "") or f"{o.get('ename')}" for o in c.outputs)
            for c in nb.cells]


@pytest.fixture
def work(tmp_path):
    d = tmp_path / "course" / "autograded" / "ann" / "ch09"
    d.mkdir(parents=True)
    (tmp_path / "course" / "gradebook.db").write_text("secret")
    return d


def test_mode_is_known_and_loud_when_it_falls_back(monkeypatch):
    mode, why = sandbox.probe()
    print(f"\nsandbox mode here: {mode} ({why}); limits {sandbox.limits()}")
    assert mode in ("bwrap", "limits-only")
    assert (sandbox.warning_text(mode, why) == "") == (mode == "bwrap")
    monkeypatch.setenv("VITSEG_SANDBOX", "off")
    m, w = sandbox.probe()
    assert m == "limits-only" and "VITSEG SANDBOX WARNING" in sandbox.warning_text(m, w)
    if shutil.which("bwrap") is None or os.geteuid() != 0:
        monkeypatch.setenv("VITSEG_SANDBOX", "require")
        with pytest.raises(RuntimeError, match="require"):
            sandbox.probe()


@pytest.mark.slow
def test_sandboxed_kernel_sees_only_its_folder_and_is_limited(work):
    if sandbox.probe()[0] != "bwrap":
        pytest.skip(f"no sandbox here: {sandbox.probe()[1]}")
    out = _run([
        f"import os; print(os.getuid(), os.getcwd() == {str(work)!r})",
        f"print(os.path.exists('../../../gradebook.db'), os.path.exists({str(ROOT / 'vitseg_lab')!r}))",
        ("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
         "except OSError as e:\n    print('no network', type(e).__name__)"),
        "try:\n    bytearray(20 * 2**30)\nexcept MemoryError:\n    print('no 20 GB')",
        ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; "
         "time.sleep(300)'], start_new_session=True); print('started')"),
        "while True:\n    pass",
        "print('after the interrupt')",
        "open('written.txt', 'w').write('ok'); print(os.listdir('.'))",
    ], work)
    uid = sandbox.BASE_UID
    assert out[0].split() == [str(uid), "True"], out[0]
    assert out[1].split() == ["False", "False"], out[1]
    assert out[2].startswith("no network"), out[2]
    assert out[3].strip() == "no 20 GB", out[3]
    assert "KeyboardInterrupt" in out[5] and out[6].strip() == "after the interrupt"
    assert (work / "written.txt").read_text() == "ok"
    left = subprocess.run(["ps", "-u", str(uid), "-o", "pid="], capture_output=True, text=True,
                          check=False)
    assert left.stdout.strip() == "", "a process of the sandbox user outlived its kernel"


@pytest.mark.slow
def test_limits_only_mode_still_runs_the_kernel(work, monkeypatch):
    monkeypatch.setenv("VITSEG_SANDBOX", "off")
    sandbox._probe_cache.clear()
    try:
        out = _run([f"import os; print(os.environ.get('PYTHONPATH'), os.getcwd() == {str(work)!r})"],
                   work)
    finally:
        sandbox._probe_cache.clear()
    assert out[0].split() == ["None", "True"], out


def test_sandbox_setup_script_is_idempotent_and_says_the_mode():
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed: tools/sandbox_setup.sh would install it")
    p = subprocess.run(["bash", str(ROOT / "tools" / "sandbox_setup.sh")], capture_output=True,
                       text=True, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr
    assert re.search(r"grading kernels run in (bwrap|limits-only) mode", p.stdout), p.stdout


def test_ci_installs_the_sandbox_and_refuses_the_fallback():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tools/sandbox_setup.sh" in ci and "VITSEG_SANDBOX=require" in ci


def test_jupyter_pins_satisfy_nbgrader():
    """nbgrader 0.9 (maintenance mode) needs jupyterlab < 5, notebook < 8, jupyter_client < 9:
    exact pins in pyproject.toml's dev extras (environment.yml mirrors them, test_packaging.py)."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]
    pins = dict(d.split("==") for d in dev if "==" in d)
    for name, below in (("jupyterlab", 5), ("notebook", 8), ("jupyter_client", 9)):
        assert name in pins, f"{name} is not pinned"
        assert int(pins[name].split(".")[0]) < below, (name, pins[name])


def test_hidden_block_is_what_the_grader_parses():
    from vitseg_lab._grader.autograde import RECORD_CALL

    block = edition.hidden_block("3.5", "sigmoid_focal_loss")
    assert RECORD_CALL.findall(block) == ["3.5"]
    assert edition.hidden_lines("x = 1\n" + block) == [
        "from vitseg_lab.recorder import record", "record('3.5', sigmoid_focal_loss)"]


def test_the_student_edition_config_routes_stderr_like_the_grader():
    from tools import student

    text = student._NBGRADER_CONFIG
    assert "sys.stderr = sys.stdout" in text
    assert "sys.stderr = sys.stdout" in (ROOT / "grading" / "kernel_guard.py").read_text()



def test_grading_preprocessors_are_enabled():
    """nbconvert's Preprocessor is disabled by default: registered in autograde_preprocessors it
    would do nothing, and no hidden check would ever count (this happened)."""
    from vitseg_lab._grader import autograde as ag

    for cls in (ag.WriteGraderInputs, ag.SanitizeWorkdir, ag.ApplyVerdicts, ag.CapOutputs,
                ag.GradingExecute):
        assert cls().enabled, cls.__name__


def test_records_of_one_chapter_do_not_share_a_file(tmp_path):
    """Path.with_suffix would turn '1.4' into '1.json' for every tag of chapter 1 (this happened:
    every exercise but the last read another exercise's record)."""
    import torch

    from vitseg_lab.recorder import load, save

    for tag in ("1.1", "1.4", "1.10"):
        save(tmp_path / tag, {"tag": tag, "x": torch.full((2,), float(len(tag)))})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{t}.{ext}" for t in ("1.1", "1.4", "1.10") for ext in ("json", "safetensors"))
    for tag in ("1.1", "1.4", "1.10"):
        assert load(tmp_path / tag)["tag"] == tag
