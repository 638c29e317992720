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
def test_validate_passes_the_reference_and_lists_every_exercise_of_the_empty_edition(
        student_edition, course, assignment, tmp_path):
    """What the Validate button runs (nbgrader validate with the student edition's config)."""
    name = g.chapter_notebooks()[assignment].name
    work = student_edition / "notebooks" / f"_validate_{name}"
    nbformat.write(g.reference_submission(course.root, assignment), work)
    try:
        ok = _validate(student_edition, work)
    finally:
        work.unlink()
    assert "Success! Your notebook passes all the tests." in ok, ok[-3000:]
    empty = _validate(student_edition, student_edition / "notebooks" / name)
    n_tests = sum(1 for c in nbformat.read(student_edition / "notebooks" / name,
                                           as_version=4).cells
                  if c.metadata.get("nbgrader", {}).get("grade"))
    assert f"VALIDATION FAILED ON {n_tests} CELL(S)!" in empty, empty[-3000:]
    assert len(set(_ENOT.findall(empty))) >= 1
    assert "Traceback (most recent call last)" not in empty


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
    assert shutil.which("make") is None or (student_edition / "Makefile").read_text().count(
        "pip install -q -e '.[dev]'") == 1
