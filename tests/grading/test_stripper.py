"""The student-edition library: reference regions become ExerciseNotDone stubs (fast, no nbgrader)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools import grading as g
from tools.student import LIBRARY, StripError, strip_library, strip_source

MODULE = textwrap.dedent('''\
    """A chapter module."""

    from __future__ import annotations

    import torch

    def double(x: torch.Tensor, k: int = 2) -> torch.Tensor:
        """Exercise 9.1 · multiply by k.

        Args:
            x: (B, L).
        """
        ### BEGIN SOLUTION
        y = x * k
        return y
        ### END SOLUTION


    class Box:
        def scale(self, x):
            """Exercise 9.2 · a method works too."""
            ### BEGIN SOLUTION
            return x * 3
            ### END SOLUTION


    def helper(x):
        return double(x)
    ''')


def _signatures(text: str) -> dict[str, tuple]:
    return {n.name: (ast.unparse(n.args), ast.unparse(n.returns) if n.returns else None,
                     ast.get_docstring(n))
            for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef)}


def test_region_becomes_stub_keeping_signature_docstring_and_indentation():
    new, tags = strip_source(MODULE, "demo.py")
    assert tags == ["9.1", "9.2"]
    assert "y = x * k" not in new and "return x * 3" not in new
    assert "BEGIN SOLUTION" not in new and "END SOLUTION" not in new
    assert '    raise ExerciseNotDone("9.1")\n' in new
    assert '        raise ExerciseNotDone("9.2")\n' in new      # method: deeper indent
    assert "from vitseg_lab.exercises import ExerciseNotDone" in new
    assert _signatures(MODULE) == _signatures(new)
    assert "def helper(x):\n    return double(x)" in new                # outside regions: untouched


@pytest.mark.parametrize("bad, message", [
    (MODULE.replace("Exercise 9.1 · ", ""), "Exercise N.M"),
    (MODULE.replace("    ### END SOLUTION\n\n\nclass", "\n\nclass", 1), "nested|without"),
    ('### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n', "outside a function"),
])
def test_regions_the_stripper_cannot_stub_stop_the_build(bad, message):
    with pytest.raises(StripError, match=message):
        strip_source(bad, "bad.py")


@pytest.fixture(scope="module")
def stub_library(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    dst = tmp_path_factory.mktemp("stub") / "vitseg_lab"
    return dst, strip_library(LIBRARY, dst)


def test_student_library_has_the_instructor_api_and_no_reference(stub_library):
    dst, stubbed = stub_library
    assert stubbed, "no exercise found in the library"
    assert not (dst / "_grader").exists()
    for py in LIBRARY.rglob("*.py"):
        rel = py.relative_to(LIBRARY)
        if "_grader" in rel.parts:
            continue
        text = (dst / rel).read_text()
        assert _signatures(py.read_text()) == _signatures(text), f"{rel}: API changed"
        assert "### BEGIN SOLUTION" not in text and "### END SOLUTION" not in text
        for tag in stubbed.get(rel.as_posix(), []):
            assert f'raise ExerciseNotDone("{tag}")' in text


def test_every_stub_raises_its_number_and_notebook(stub_library):
    """Call every exercise of the stub library (in a fresh process that imports only the stubs)."""
    dst, stubbed = stub_library
    modules = [f"vitseg_lab.{rel[:-3].replace('/', '.')}" for rel in stubbed]
    code = textwrap.dedent(f"""
        import importlib, inspect, vitseg_lab
        from vitseg_lab.exercises import ExerciseNotDone, exercise_tag, notebook_of
        assert vitseg_lab.__file__.startswith({str(dst)!r}), vitseg_lab.__file__
        n = 0
        for name in {modules!r}:
            mod = importlib.import_module(name)
            for fname, fn in vars(mod).items():
                if not inspect.isfunction(fn) or fn.__module__ != name or not exercise_tag(fn):
                    continue
                args = [None] * sum(p.default is p.empty for p in
                                    inspect.signature(fn).parameters.values())
                try:
                    fn(*args)
                except ExerciseNotDone as e:
                    want = f"Exercise {{exercise_tag(fn)}} ({{notebook_of(exercise_tag(fn))}}) is not done yet"
                    assert str(e).startswith(want), (fname, str(e))
                    n += 1
                else:
                    raise AssertionError(fname + " did not raise")
        print(n)
        """)
    env = dict(os.environ, PYTHONPATH=str(dst.parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=dst.parent, text=True,
                         capture_output=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == sum(len(t) for t in stubbed.values())


@pytest.mark.parametrize("assignment", list(g.chapter_notebooks()))
def test_solution_cells_use_only_names_the_notebook_defines(assignment):
    """A solution cell is a copy of a library function; a name its module imports (``F``,
    ``Tensor``) must be imported by the notebook too, or every learner's cell fails (reference
    included) and the demo's reference learner loses the exercise."""
    import nbformat

    nb = nbformat.read(g.chapter_notebooks()[assignment], as_version=4)
    assert g.undefined_names(nb) == []
