"""plug(), ExerciseNotDone, expect_shape and late binding."""

from __future__ import annotations

import types

import pytest
import torch

import vitseg_lab as vl
from vitseg_lab import attention
from vitseg_lab.exercises import ExerciseNotDone, ShapeError, exercise_tag, plug, unplug


@pytest.fixture(autouse=True)
def _restore():
    yield
    unplug(attention)


def test_exercise_tags_on_every_solution_region():
    import ast
    from pathlib import Path

    for py in Path(vl.__file__).parent.rglob("*.py"):
        text = py.read_text()
        if "### BEGIN SOLUTION" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                src = ast.get_source_segment(text, node) or ""
                if "### BEGIN SOLUTION" in src:
                    doc = ast.get_docstring(node) or ""
                    assert doc.startswith("Exercise "), f"{py.name}:{node.name} lacks its tag"


def test_plug_replaces_module_global_and_reports(capsys):
    @plug(attention)
    def softmax(logits, dim=-1):
        return torch.zeros_like(logits)

    assert attention.softmax is softmax
    assert "Exercise 1.4" in capsys.readouterr().out
    unplug(attention, "softmax")
    assert attention.softmax(torch.zeros(2)).sum() == 1


def test_plug_unknown_name_and_bad_signature():
    with pytest.raises(NameError, match="no exercise called 'sofmax'.*softmax"):
        @plug(attention)
        def sofmax(logits, dim=-1):
            return logits

    with pytest.raises(TypeError, match=r"\(logits, dim\)"):
        @plug(attention)
        def softmax(x):
            return x

    with pytest.raises(TypeError, match="takes a module"):
        plug("attention")


def test_not_implemented_becomes_exercise_not_done():
    @plug(attention, quiet=True)
    def softmax(logits, dim=-1):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotDone, match=r"Exercise 1\.4 \(notebooks/01_vit_attention"):
        attention.softmax(torch.zeros(3))
    assert issubclass(ExerciseNotDone, NotImplementedError)


def test_plug_takes_effect_inside_model_forward():
    from vitseg_lab.backbone import quick_vit

    model = attention.ExplicitViT(quick_vit(img_size=16, patch_size=8, embed_dim=12, depth=1,
                                            num_heads=2, num_classes=2))
    calls = []

    @plug(attention, quiet=True)
    def softmax(logits, dim=-1):
        calls.append(logits.shape)
        return torch.softmax(logits, dim)

    model(torch.randn(1, 3, 16, 16))
    assert calls == [(1, 2, 5, 5)]


def test_plug_takes_effect_inside_fit():
    calls = []

    @plug(attention, quiet=True)
    def patchify(images, patch_size):
        calls.append(images.shape[0])
        B, c, H, W = images.shape
        x = images.reshape(B, c, H // patch_size, patch_size, W // patch_size, patch_size)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, -1, c * patch_size ** 2)

    cfg = attention.AttentionConfig.smoke()
    attention.run(cfg)
    assert len(calls) >= cfg.train.steps


def test_plug_takes_effect_inside_widget():
    from vitseg_lab import widgets
    from vitseg_lab.backbone import quick_vit
    from vitseg_lab.data.shapes import ShapeScenes

    model = attention.ExplicitViT(quick_vit(img_size=32, patch_size=8, embed_dim=12, depth=2,
                                            num_heads=2, num_classes=9))
    ds = ShapeScenes(2, size=32, max_objects=2)
    box = widgets.attention_explorer(model, ds)
    first = box.state["map"].clone()

    @plug(attention, quiet=True)
    def softmax(logits, dim=-1):
        return torch.full_like(logits, 1.0 / logits.shape[dim])

    box.children[0].children[0].value = 1            # scene slider -> recompute with the plug
    assert torch.allclose(box.state["map"], torch.full((4, 4), 1 / 17))
    assert not torch.allclose(first, box.state["map"])


def test_widget_controls_change_the_map():
    from vitseg_lab import widgets
    from vitseg_lab.backbone import quick_vit
    from vitseg_lab.data.shapes import ShapeScenes

    torch.manual_seed(0)
    model = attention.ExplicitViT(quick_vit(img_size=32, patch_size=8, embed_dim=12, depth=2,
                                            num_heads=2, num_classes=9))
    box = widgets.attention_explorer(model, ShapeScenes(2, size=32, max_objects=2))
    maps = [box.state["map"].clone()]
    row_slider = box.children[1].children[1]
    row_slider.value = 0
    maps.append(box.state["map"].clone())
    box.children[0].children[1].value = 0            # layer
    maps.append(box.state["map"].clone())
    assert box.state["patch"] == (0, 2) and box.state["layer"] == 0
    assert not torch.allclose(maps[0], maps[1]) and not torch.allclose(maps[1], maps[2])


def test_expect_shape_messages():
    t = torch.zeros(2, 5, 3)
    assert vl.expect_shape(t, "B K L", B=2, K=5, L=3) is t
    with pytest.raises(ShapeError, match=r"axis K: expected 3, got 5; axis L: expected 5, got 3"):
        vl.expect_shape(t, "B K L", name="masks", B=2, K=3, L=5)
    with pytest.raises(ShapeError, match="should have 2 axes"):
        vl.expect_shape(t, "B K", B=2)
    with pytest.raises(ShapeError, match="axis N: expected 5, got 3"):
        vl.expect_shape(torch.zeros(5, 3), "N N")
    with pytest.raises(ShapeError, match="is a list"):
        vl.expect_shape([1, 2], "B")
    vl.expect_shape(t, "_ K _", K=5)


def test_exercise_tag_parsing():
    assert exercise_tag(attention.patchify) == "1.1"
    assert exercise_tag(attention.attention_rollout) == "1.6"
    assert exercise_tag(lambda: None) is None


def test_scale_env(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.setenv("VITSEG_SCALE", "full")
    assert vl.scale() == "full"
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert vl.scale() == "smoke" and vl.grading()
    monkeypatch.delenv("NBGRADER_EXECUTION")
    monkeypatch.setenv("VITSEG_SCALE", "huge")
    with pytest.raises(ValueError, match="VITSEG_SCALE='huge'"):
        vl.scale()


def test_library_never_binds_exercises_early():
    """No `from vitseg_lab.<module> import <exercise>` outside the exercise's own module: importing
    a module's classes is fine, binding one of its exercise functions would bypass plug()."""
    import ast
    import importlib
    from pathlib import Path

    from vitseg_lab.chapters import CHAPTERS

    modules = {m for ch in CHAPTERS.values() for m in ch.exercise_modules}
    exercises = {m: {n for n, v in vars(importlib.import_module(m)).items()
                     if callable(v) and exercise_tag(v)} for m in modules}
    root = Path(vl.__file__).parent
    for py in root.rglob("*.py"):
        if "_grader" in py.parts:
            continue
        for node in ast.walk(ast.parse(py.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            mod = node.module if node.level == 0 else f"vitseg_lab.{node.module}"
            bound = {a.name for a in node.names} & exercises.get(mod, set())
            assert not bound, f"{py.name} binds {mod} exercises early: {sorted(bound)}"
    assert isinstance(attention, types.ModuleType)


@pytest.mark.parametrize("bad,kind", [(lambda t: t.numpy(), "numpy.ndarray"),
                                      (lambda t: t.tolist(), "list")])
def test_a_learner_function_returning_numpy_or_a_list_is_named_in_one_sentence(bad, kind):
    from vitseg_lab.backbone import quick_vit
    from vitseg_lab.exercises import NotATensor

    reference = attention.patchify

    @plug(attention, quiet=True)
    def patchify(images, patch_size):
        return bad(reference(images, patch_size).detach())

    model = attention.ExplicitViT(quick_vit(img_size=16, patch_size=8, embed_dim=12, depth=1,
                                            num_heads=2, num_classes=3))
    with pytest.raises(NotATensor) as e:
        model(torch.randn(1, 3, 16, 16))
    msg = str(e.value)
    assert msg.startswith(f"patchify returned a {kind}, not a torch.Tensor; return a tensor")
    assert "\n" not in msg and isinstance(e.value, ShapeError)   # one line in the notebook
    assert vl.expect_tensor(torch.zeros(1), name="x") is not None
    with pytest.raises(NotATensor, match="output 1"):
        vl.expect_tensor((torch.zeros(1), [1.0]), name="multi_head_attention")


def test_a_rejected_plug_replaces_the_previous_attempt_everywhere():
    @plug(attention, quiet=True)
    def softmax(logits, dim=-1):
        return logits.softmax(dim)

    # A notebook: the cell's globals hold the previous attempt under the exercise's name.
    namespace = {"softmax": softmax, "plug": plug, "attention": attention}
    code = ("@plug(attention, quiet=True)\n"
            "def softmax(logits, axis=-1):\n    return logits.softmax(axis)\n")
    with pytest.raises(vl.exercises.PlugSignatureError, match=r"\(logits, dim\)"):
        exec(code, namespace)
    for fn in (attention.softmax, namespace["softmax"]):
        with pytest.raises(ExerciseNotDone, match="rejected.*keep the signature"):
            fn(torch.zeros(2))
    unplug(attention, "softmax")
    assert torch.allclose(attention.softmax(torch.zeros(2)), torch.full((2,), 0.5))


def test_plugging_the_untouched_stub_says_so(capsys):
    @plug(attention)
    def softmax(logits, dim=-1):
        raise NotImplementedError()

    assert "is still the stub" in capsys.readouterr().out
    with pytest.raises(ExerciseNotDone, match="Exercise 1.4"):
        attention.softmax(torch.zeros(2))


class _Shell:
    def __init__(self):
        self.shown = []

    def _showtraceback(self, etype, value, stb):
        self.shown.append(stb)

    def showtraceback(self, exc_tuple, tb_offset=None):
        self.shown.append("full traceback")


def test_notebook_errors_are_one_line_and_name_errors_name_the_cell():
    from vitseg_lab.exercises import _notebook_exception

    sh = _Shell()
    err = NameError("name 'atm_similarity' is not defined", name="atm_similarity")
    _notebook_exception(sh, NameError, err, None)
    assert sh.shown[-1] == [("NameError: atm_similarity is Exercise 3.1 "
                             "(notebooks/03_segvit_atm.ipynb): run its solution cell (the one "
                             "starting with @plug(segvit)) before this one.")]
    _notebook_exception(sh, NameError, NameError("x", name="not_an_exercise"), None)
    assert sh.shown[-1] == "full traceback"
    _notebook_exception(sh, ShapeError, ShapeError("bad shape"), None)
    assert sh.shown[-1] == ["ShapeError: bad shape"]
