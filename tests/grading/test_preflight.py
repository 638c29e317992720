"""Preflight repairs and the monkeypatch scan, on small synthetic notebooks (fast, no nbgrader
run; the same code runs on real submissions in test_autograde.py)."""

from __future__ import annotations

import copy
import json

import nbformat
import pytest

from tools import grading as g

hooks = g.hooks()


def _meta(kind: str, gid: str, points: int = 0) -> dict:
    base = {"schema_version": 3, "grade_id": gid, "task": False}
    if kind == "solution":
        return dict(base, grade=False, solution=True, locked=False)
    if kind == "test":
        return dict(base, grade=True, solution=False, locked=True, points=points)
    return dict(base, grade=False, solution=False, locked=True)


def _cell(src: str, kind: str | None = None, gid: str = "", points: int = 0, cid: str = ""):
    c = nbformat.v4.new_code_cell(src)
    if kind:
        c.metadata["nbgrader"] = _meta(kind, gid, points)
    c["id"] = cid or (gid.replace("_", "-") if gid else c["id"])
    return c


def release() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Chapter 9"),
        _cell("import math\nimport torch\nimport numpy as np\nfrom vitseg_lab import demo, plug",
              "readonly", "setup"),
        _cell("@plug(demo)\ndef double(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()",
              "solution", "double"),
        _cell("assert torch.allclose(double(torch.ones(2)), 2 * torch.ones(2))", "test",
              "double_test", 5),
        _cell("@plug(demo)\ndef triple(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()",
              "solution", "triple"),
        _cell("assert torch.equal(triple(torch.ones(2)), 3 * torch.ones(2))", "test",
              "triple_test", 5),
    ]
    return nb


def gids(nb) -> list[str]:
    return [c.metadata.get("nbgrader", {}).get("grade_id", "-") for c in nb.cells]


def test_duplicated_test_cell_keeps_the_original_and_says_what_to_do():
    rel = release()
    nb = copy.deepcopy(rel)
    dup = copy.deepcopy(nb.cells[3])
    dup["id"] = "pasted-copy"
    nb.cells.insert(2, dup)                       # the copy lands *before* the solution
    issues = hooks.fix_structure(nb, rel)
    assert gids(nb).count("double_test") == 1
    assert [c["id"] for c in nb.cells if c.metadata.get("nbgrader", {}).get(
        "grade_id") == "double_test"] == ["double-test"]        # the original, in its place
    assert gids(nb).index("double") < gids(nb).index("double_test")
    (issue,) = issues
    assert issue["kind"] == "duplicate" and "appears 2 times" in issue["message"]
    assert "Validate" in issue["message"] and "old version" not in issue["message"]


def test_duplicated_solution_cell_runs_as_an_ordinary_cell():
    rel = release()
    nb = copy.deepcopy(rel)
    nb.cells[2].source = nb.cells[2].source.replace("raise NotImplementedError()", "return 0")
    copy_ = copy.deepcopy(nb.cells[2])
    copy_["id"] = "second"
    copy_.source = "@plug(demo)\ndef double(x):\n    return 2 * x"
    nb.cells.insert(3, copy_)
    hooks.fix_structure(nb, rel)
    assert gids(nb).count("double") == 1
    assert any(c.source.endswith("return 2 * x") and "nbgrader" not in c.metadata
               for c in nb.cells), "the learner's second copy must still run"


def test_deleted_test_and_readonly_cells_are_put_back_in_place():
    rel = release()
    nb = copy.deepcopy(rel)
    del nb.cells[5]                                   # triple_test
    del nb.cells[3]                                   # double_test
    del nb.cells[1]                                   # setup (read-only)
    issues = hooks.fix_structure(nb, rel)
    assert gids(nb) == gids(rel)
    assert {i["kind"] for i in issues} == {"restored"}


def test_unknown_or_empty_grading_metadata_is_dropped():
    rel = release()
    nb = copy.deepcopy(rel)
    nb.cells.append(_cell("x = 1", "test", "from_another_notebook", 99))
    extra = nbformat.v4.new_code_cell("y = 2")
    extra.metadata["nbgrader"] = {}                   # what nbgrader calls the "old format"
    nb.cells.append(extra)
    issues = hooks.fix_structure(nb, rel)
    assert "nbgrader" not in nb.cells[-1].metadata and "nbgrader" not in nb.cells[-2].metadata
    assert [i["kind"] for i in issues] == ["unknown_cell"]


@pytest.fixture
def course(tmp_path):
    rel = release()
    (tmp_path / "release" / "ch09").mkdir(parents=True)
    nbformat.write(rel, tmp_path / "release" / "ch09" / "09_demo.ipynb")
    return tmp_path


def _submit(course, nb, name="09_demo.ipynb", student="ann"):
    folder = course / "submitted" / student / "ch09"
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / name)
    return folder


def test_preflight_renames_a_lone_notebook_and_notes_it_once(course):
    nb = release()
    del nb.cells[3]
    folder = _submit(course, nb, name="09_demo (1).ipynb")
    rep = hooks.preflight_submission(str(course), "ch09", "ann")
    assert (folder / "09_demo.ipynb").exists() and not (folder / "09_demo (1).ipynb").exists()
    kinds = [i["kind"] for i in rep["notebooks"]["09_demo.ipynb"]["issues"]]
    assert kinds == ["renamed", "restored"]
    hooks.preflight_submission(str(course), "ch09", "ann")        # idempotent
    fixed = nbformat.read(folder / "09_demo.ipynb", as_version=4)
    notes = [c for c in fixed.cells if hooks.PREFLIGHT_KEY in c.metadata]
    assert len(notes) == 1 and fixed.cells[0] is notes[0]
    assert "graded as '09_demo.ipynb'" in notes[0].source
    saved = json.loads((course / "reports" / "ch09" / "preflight" / "ann.json").read_text())
    assert [i["kind"] for i in saved["notebooks"]["09_demo.ipynb"]["issues"]] == kinds
    original = course / "preflight" / "originals" / "ann" / "ch09" / "09_demo.ipynb"
    assert len(nbformat.read(original, as_version=4).cells) == 5


PATCHES = [
    "torch.allclose = lambda *a, **k: True",
    "torch.testing.assert_close = lambda *a, **k: None",
    "np.allclose = lambda *a, **k: True",
    "setattr(torch, 'equal', lambda *a: True)",
    "import builtins",
    "__builtins__.__dict__.update(abs=lambda x: 0)",
    "import json; json.loads = lambda s: {'ok': True, 'msg': ''}",
    "from vitseg_lab._grader import common",
    "vitseg_lab.exercises._ORIGINALS.clear()",
    "get_ipython().set_custom_exc((Exception,), lambda *a: None)",
    "import sys; sys.modules['vitseg_lab._grader'] = None",
    "import os; os.environ['NBGRADER_EXECUTION'] = ''",
    "import numpy as torch",
    "torch = None",
    "AssertionError = type('Nope', (Exception,), {})",
    "from unittest import mock",
    "import subprocess; subprocess.run = print",
    "exec('tor' + 'ch.allclose = lambda *a, **k: True')",
    "math.isclose = lambda *a, **k: True",
]


@pytest.mark.parametrize("line", PATCHES)
def test_scan_flags_patches_with_the_offending_line(line):
    rel = release()
    nb = copy.deepcopy(rel)
    nb.cells[2].source = "@plug(demo)\ndef double(x):\n    return 2 * x\n\n" + line
    findings = hooks.scan_notebook(nb, rel)
    assert findings, f"not flagged: {line}"
    assert any(f["line"] == line.strip() and f["grade_id"] == "double" for f in findings)


def test_scan_flags_a_patch_in_a_cell_that_does_not_parse():
    rel = release()
    nb = copy.deepcopy(rel)
    nb.cells.insert(3, nbformat.v4.new_code_cell("def broken(:\ntorch.allclose = f"))
    assert [f["line"] for f in hooks.scan_notebook(nb, rel)] == ["torch.allclose = f"]


LEGIT = [
    "x = torch.zeros(3)\ny = x.clone()\ny[0] = 1",
    "import matplotlib.pyplot as plt\nplt.rcParams['figure.dpi'] = 120",
    "import torch.nn.functional as F\nout = F.relu(torch.randn(3))",
    "import torch\nimport numpy as np\nnp.random.seed(0)\ntorch.manual_seed(0)",
    "%timeit double(torch.ones(3))\n!ls",
    "def helper(t):\n    max = t.max()\n    return max",
    "class Cfg:\n    steps = 3\ncfg = Cfg()\ncfg.steps = 4",
    "import math\nr = math.sqrt(2)",
]


@pytest.mark.parametrize("code", LEGIT)
def test_scan_leaves_ordinary_learner_code_alone(code):
    rel = release()
    nb = copy.deepcopy(rel)
    nb.cells.insert(3, nbformat.v4.new_code_cell(code))
    assert hooks.scan_notebook(nb, rel) == []


def test_scrub_replaces_traceback_entries_that_quote_hidden_lines():
    src = "assert f(1) == 2\n### BEGIN HIDDEN TESTS\n_G.check_f(f)\n### END HIDDEN TESTS"
    cell = _cell(src, "test", "f_test", 1)
    cell.outputs = [nbformat.v4.new_output(
        "error", ename="AssertionError", evalue="wrong",
        traceback=["---", "\x1b[32m----> 3\x1b[39m _G\x1b[33m.\x1b[39mcheck_f(f)", "AssertionError: wrong"])]
    assert hooks.scrub_outputs(cell, hooks.hidden_lines(src)) == 1
    assert "check_f" not in json.dumps(cell.outputs)
    assert cell.outputs[0]["traceback"][-1] == "AssertionError: wrong"


def test_edited_grading_flags_of_our_cells_are_put_back():
    """A test cell turned into a solution cell (nbgrader would fail the whole notebook with
    "Inconsistent checksums"), a solution cell made graded, a test cell's points raised."""
    rel = release()
    nb = copy.deepcopy(rel)
    nb.cells[3].metadata["nbgrader"].update(grade=False, solution=True, locked=False)
    nb.cells[3].source = "pass"
    nb.cells[2].metadata["nbgrader"].update(grade=True, points=50)
    nb.cells[5].metadata["nbgrader"]["points"] = 1000
    issues = hooks.fix_structure(nb, rel)
    for i in (2, 3, 5):
        assert nb.cells[i].metadata["nbgrader"] == rel.cells[i].metadata["nbgrader"]
    assert nb.cells[3].source == rel.cells[3].source          # a locked cell gets its content back
    assert sorted(i["grade_id"] for i in issues if i["kind"] == "metadata") == [
        "double", "double_test", "triple_test"]
