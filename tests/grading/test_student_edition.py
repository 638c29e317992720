"""The student edition (`make student` -> dist/student/): no reference material, installs, runs
up to each first exercise with one-line errors, and the nbgrader Validate step behaves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tools import grading as g

pytestmark = pytest.mark.slow
CHAPTERS = list(g.chapter_notebooks())
_ENOT = re.compile(r"Exercise (\d+\.\d+) \((notebooks/[\w.-]+\.ipynb)\) is not done yet")


def _env(student_edition: Path, **extra) -> dict:
    """The learner's environment: the student edition is the library that imports (it shadows
    the instructor's editable install, as `pip install` of the student edition would)."""
    env = dict(os.environ, PYTHONPATH=str(student_edition), **extra)
    env.pop("NBGRADER_EXECUTION", None)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def test_layout_and_no_reference_hidden_test_or_grader(student_edition, secrets):
    for name in ("README.md", "Makefile", "pyproject.toml", "environment.yml",
                 "nbgrader_config.py", "vitseg_lab/__init__.py"):
        assert (student_edition / name).is_file(), name
    assert sorted(p.name for p in (student_edition / "notebooks").glob("*.ipynb")) == sorted(
        nb.name for nb in g.chapter_notebooks().values())
    assert not list(student_edition.rglob("_grader"))
    assert not list(student_edition.rglob("__pycache__"))
    assert g.find_leaks(student_edition, secrets=secrets) == []
    for p in student_edition.rglob("*"):
        if p.is_file():
            text = p.read_text(errors="ignore")
            for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS"):
                assert marker not in text, f"{p}: {marker}"


def test_student_edition_installs_with_pip(student_edition, tmp_path):
    """`pip install .` of the student edition (offline: no dependencies, no build isolation)."""
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(student_edition)],
        text=True, capture_output=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list(target.rglob("_grader"))
    code = ("import vitseg_lab, torch; from vitseg_lab import attention\n"
            "print(vitseg_lab.__file__)\n"
            "try:\n    attention.softmax(torch.zeros(2))\n"
            "except vitseg_lab.ExerciseNotDone as e:\n    print(e)\n")
    env = dict(os.environ, PYTHONPATH=str(target))
    run = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(str(target))
    assert "Exercise 1.4 (notebooks/01_vit_attention.ipynb) is not done yet" in run.stdout


@pytest.mark.parametrize("assignment", CHAPTERS)
def test_notebook_runs_to_its_first_exercise_then_fails_one_line_per_exercise(
        student_edition, assignment, monkeypatch):
    name = g.chapter_notebooks()[assignment].name
    nb = nbformat.read(student_edition / "notebooks" / name, as_version=4)
    for k, v in _env(student_edition).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.setenv("VITSEG_SCALE", "quick")
    replies: dict[int, dict] = {}

    def record(cell, cell_index, execute_reply, **kw):
        replies[cell_index] = execute_reply["content"]

    client = NotebookClient(nb, timeout=300, allow_errors=True, on_cell_executed=record,
                            resources={"metadata": {"path": str(student_edition / "notebooks")}})
    client.execute()
    first_solution = next(i for i, c in enumerate(nb.cells)
                          if c.metadata.get("nbgrader", {}).get("solution"))
    failed = {i: r for i, r in replies.items() if r["status"] == "error"}
    assert failed, "the empty edition should fail somewhere"
    assert min(failed) > first_solution, {i: failed[i]["ename"] for i in failed}
    prefix = name[:2].lstrip("0")
    exercise_of_test = {}
    current = None
    for i, c in enumerate(nb.cells):
        meta = c.metadata.get("nbgrader", {})
        if meta.get("solution"):
            current = i
        elif meta.get("grade"):
            exercise_of_test[i] = current
    deep = []
    for i, r in failed.items():
        if r["ename"] == "ExerciseNotDone":
            m = _ENOT.search(r["evalue"])
            assert m and m.group(2) == f"notebooks/{name}", r["evalue"]
            assert m.group(1).split(".")[0] == prefix, r["evalue"]   # this chapter's exercises
            assert len(r["traceback"]) <= 1, r["traceback"]           # one line, no traceback
        elif r["ename"] != "NameError":      # a name defined by an earlier failed cell
            deep.append((i, r["ename"], r["evalue"][:200]))
    assert deep == [], deep
    for test_cell in exercise_of_test:       # every graded cell fails with an exercise's number
        assert failed[test_cell]["ename"] == "ExerciseNotDone", (test_cell, failed[test_cell])


def _validate(student_edition: Path, nb_path: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "nbgrader", "validate", str(nb_path)],
                         cwd=student_edition, env=_env(student_edition), text=True,
                         capture_output=True)
    return out.stdout + out.stderr


@pytest.mark.parametrize("assignment", CHAPTERS)
def test_validate_passes_the_reference(student_edition, course, assignment):
    """`nbgrader validate` (what the Validate button runs) with the student edition's config, on a
    learner who solved every exercise."""
    name = g.chapter_notebooks()[assignment].name
    work = student_edition / "notebooks" / f"_validate_{name}"
    nbformat.write(g.reference_submission(course.root, assignment), work)
    try:
        ok = _validate(student_edition, work)
    finally:
        work.unlink()
    assert "Success! Your notebook passes all the tests." in ok, ok[-3000:]


def test_validate_agrees_with_autograde_on_warnings_and_tqdm(student_edition, course):
    """A correct solution that warns and draws a plain tqdm bar inside its graded cells: nbgrader
    gives a test cell 0 for any stderr, so both kernels send them to stdout. Autograde gives the
    same learner full marks for it (test_tamper.py, tamper-disk's softmax)."""
    if "ch01" not in g.chapter_notebooks():
        pytest.skip("chapter 01 is not in this course")
    from tests.grading.tamper_cases import noisy_reference

    name = g.chapter_notebooks()["ch01"].name
    work = student_edition / "notebooks" / f"_noisy_{name}"
    nbformat.write(noisy_reference(course.root), work)
    try:
        ok = _validate(student_edition, work)
    finally:
        work.unlink()
    assert "Success! Your notebook passes all the tests." in ok, ok[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(student_edition, tmp_path_factory):
    """JupyterLab started in the student edition, as `make lab` starts it."""
    import json
    import time
    import urllib.request

    port, token = _free_port(), "vitseg-test"
    home = tmp_path_factory.mktemp("labhome")
    env = _env(student_edition, JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "ws"), JUPYTER_RUNTIME_DIR=str(home / "rt"))
    log = open(home / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", "--allow-root", "--ServerApp.open_browser=False"],
        cwd=student_edition, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def call(path, data=None):
        req = urllib.request.Request(base + path, data=data,
                                     headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=600) as r:
            body = r.read().decode()
            return r.status, (json.loads(body) if body.startswith(("{", "[")) else body)

    try:
        for _ in range(120):
            try:
                call("/api/status")
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError((home / "lab.log").read_text()[-3000:])
        yield call
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_student_edition_opens_in_jupyterlab_with_the_validate_extension(lab):
    status, page = lab("/lab")
    assert status == 200 and "JupyterLab" in page
    status, version = lab(f"/nbgrader_version?version={__import__('nbgrader').__version__}")
    assert version == {"success": True}


@pytest.mark.parametrize("assignment", CHAPTERS)
def test_validate_button_lists_every_exercise_of_the_empty_edition(lab, student_edition,
                                                                   assignment):
    """The request the Validate button sends, on the notebook as released."""
    import urllib.parse

    name = g.chapter_notebooks()[assignment].name
    body = urllib.parse.urlencode({"path": f"notebooks/{name}"}).encode()
    status, reply = lab("/assignments/validate", data=body)
    assert status == 200 and reply["success"], reply
    failed = reply["value"].get("failed", [])
    n_tests = sum(1 for c in nbformat.read(student_edition / "notebooks" / name,
                                           as_version=4).cells
                  if c.metadata.get("nbgrader", {}).get("grade"))
    assert len(failed) == n_tests, reply["value"]
    for cell in failed:
        assert _ENOT.search(cell["raw_error"]), cell["raw_error"]
        assert "Traceback (most recent call last)" not in cell["raw_error"]


def test_student_config_gives_long_cells_their_budget(student_edition):
    class _C(dict):
        def __getattr__(self, k):
            return self.setdefault(k, type(self)())

        def __setattr__(self, k, v):
            self[k] = v

    c = _C()
    exec((student_edition / "nbgrader_config.py").read_text(), {"get_config": lambda: c})
    cell, long = g.cell_budgets()
    f = c["Execute"]["timeout_func"]
    assert f({"metadata": {"tags": ["long-running"]}}) == long
    assert f({"metadata": {}}) == c["Execute"]["timeout"] == cell
    assert (student_edition / "Makefile").read_text().count("pip install -q -e '.[dev]'") == 1
    if shutil.which("make"):
        dry = subprocess.run(["make", "-n", "lab"], cwd=student_edition, text=True,
                             capture_output=True)
        assert dry.returncode == 0 and "jupyter lab notebooks/" in dry.stdout, dry.stderr
