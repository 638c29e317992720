"""vitseg_lab.tokens: every exercise against its literal loop (``_grader.ch02``) and against the
paper's equation written with einsum, the shape contracts, gradients, edge cases; the VT module
against its equations, late binding of plugged exercises, VT-ResNet on a torchvision ResNet,
VT-FPN, the quick model, run/load, the ImageNet loader on an official-layout fixture, the FLOPs
table, the explorer and the full-scale lines."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch
import torchvision

import vitseg_lab as vl
from vitseg_lab import plug, tokens, unplug
from vitseg_lab._grader import ch02 as G
from vitseg_lab._grader import common


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _r(g, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=dtype)


# A distinct size on every axis: B 2, HW 15, L 4, C 6, dk 3.
B, HW, L, C, DK = 2, 15, 4, 6, 3


# ---------------------------------------------------------------------------- 2.1 filter tokenizer

def test_filter_attention_shape_loop_and_einsum():
    g = _g(0)
    x, w = _r(g, B, HW, C), _r(g, C, L)
    a = vl.expect_shape(tokens.filter_attention(x, w), "B HW L", B=B, HW=HW, L=L)
    torch.testing.assert_close(a, G.naive_filter_attention(x, w))
    logits = torch.einsum("bic,cl->bil", x, w)
    torch.testing.assert_close(a, torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True))
    torch.testing.assert_close(a.sum(1), torch.ones(B, L, dtype=a.dtype))   # over pixels


def test_filter_attention_large_logits_stay_finite():
    x = torch.tensor([[[500.0], [0.0], [-500.0]]])
    a = tokens.filter_attention(x, torch.ones(1, 2))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[0, :, 0], torch.tensor([1.0, 0.0, 0.0]))


# ---------------------------------------------------------------------------- 2.2 gather

def test_gather_tokens_shape_loop_and_average():
    g = _g(1)
    x = _r(g, B, HW, C)
    a = _r(g, B, HW, L).softmax(1)
    t = vl.expect_shape(tokens.gather_tokens(x, a), "B L C", B=B, L=L, C=C)
    torch.testing.assert_close(t, G.naive_gather_tokens(x, a))
    torch.testing.assert_close(t, torch.einsum("bil,bic->blc", a, x))
    # a one-hot column picks exactly one pixel
    one = torch.zeros(1, HW, 1, dtype=x.dtype)
    one[0, 7, 0] = 1
    torch.testing.assert_close(tokens.gather_tokens(x[:1], one)[0, 0], x[0, 7])


# ---------------------------------------------------------------------------- 2.3 recurrent

def test_recurrent_attention_shape_loop_and_transpose_with_L_ne_C():
    g = _g(2)
    x, t_in, w = _r(g, B, HW, C), _r(g, B, L, C), _r(g, C, C)
    a = vl.expect_shape(tokens.recurrent_attention(x, t_in, w), "B HW L", B=B, HW=HW, L=L)
    torch.testing.assert_close(a, G.naive_recurrent_attention(x, t_in, w))
    w_r = torch.einsum("blc,cd->bld", t_in, w)
    logits = torch.einsum("bic,blc->bil", x, w_r)          # X W_Rᵀ
    torch.testing.assert_close(a, logits.softmax(1))
    # the paper's literal X W_R cannot even be formed when L != C
    with pytest.raises(RuntimeError):
        torch.bmm(x, w_r)


def test_recurrent_attention_of_filter_tokens_is_a_filter_attention():
    """With W_T→R = I and one-hot token rows, the recurrent tokenizer is a filter tokenizer whose
    filters are the tokens themselves."""
    g = _g(3)
    x, t_in = _r(g, 1, HW, C), _r(g, 1, L, C)
    torch.testing.assert_close(tokens.recurrent_attention(x, t_in, torch.eye(C, dtype=x.dtype)),
                               tokens.filter_attention(x, t_in[0].T))


# ---------------------------------------------------------------------------- 2.4 transformer

def _transformer_inputs(g, dtype=torch.float64):
    s = 1 / math.sqrt(C)
    return (_r(g, B, L, C, dtype=dtype), _r(g, C, DK, dtype=dtype) * s,
            _r(g, C, DK, dtype=dtype) * s, _r(g, C, C, dtype=dtype) * s,
            _r(g, C, C, dtype=dtype) * s)


def test_token_transformer_shape_loop_and_equation():
    t, k, q, f1, f2 = _transformer_inputs(_g(4))
    out = vl.expect_shape(tokens.token_transformer(t, k, q, f1, f2), "B L C", B=B, L=L, C=C)
    torch.testing.assert_close(out, G.naive_token_transformer(t, k, q, f1, f2))
    s = torch.einsum("bid,bjd->bij", t @ k, t @ q).softmax(-1)
    mid = t + s @ t
    torch.testing.assert_close(out, mid + (mid @ f1).clamp(min=0) @ f2)


def test_token_transformer_with_zero_ffn_and_one_token():
    t, k, q, f1, _ = _transformer_inputs(_g(5))
    zero = torch.zeros(C, C, dtype=t.dtype)
    # one token attends to itself with weight 1: T' = 2T, and F2 = 0 leaves it there
    torch.testing.assert_close(tokens.token_transformer(t[:, :1], k, q, f1, zero), 2 * t[:, :1])


# ---------------------------------------------------------------------------- 2.5, 2.6 projector

def test_projector_attention_shape_loop_and_rows_sum_to_one():
    g = _g(6)
    x, t, wq, wk = _r(g, B, HW, C), _r(g, B, L, C), _r(g, C, C), _r(g, C, C)
    p = vl.expect_shape(tokens.projector_attention(x, t, wq, wk), "B HW L", B=B, HW=HW, L=L)
    torch.testing.assert_close(p, G.naive_projector_attention(x, t, wq, wk))
    torch.testing.assert_close(p, torch.einsum("bic,blc->bil", x @ wq, t @ wk).softmax(-1))
    torch.testing.assert_close(p.sum(-1), torch.ones(B, HW, dtype=p.dtype))


def test_project_shape_loop_and_leaves_inputs():
    g = _g(7)
    x, t = _r(g, B, HW, C), _r(g, B, L, C)
    p = _r(g, B, HW, L).softmax(-1)
    x0 = x.clone()
    out = vl.expect_shape(tokens.project(x, t, p), "B HW C", B=B, HW=HW, C=C)
    torch.testing.assert_close(out, G.naive_project(x, t, p))
    torch.testing.assert_close(x, x0)


# ---------------------------------------------------------------------------- every exercise

@pytest.mark.parametrize("tag", sorted(G.CHECKS))
def test_reference_passes_its_hidden_check_and_every_planted_bug_is_caught(tag):
    check = G.CHECKS[tag]
    assert common.check_function(tag, check.library_function(), seed=3) is None
    assert len(G.BUGS[tag]) >= 3
    for bug in G.BUGS[tag]:
        msg = common.check_function(tag, common.mutated(check, bug), seed=3)
        assert msg, f"planted bug {bug.mistake!r} of {tag} passes the hidden check"


def test_naive_softmax_matches_torch():  # the grader's own helper is right
    vals = [torch.tensor(v) for v in (1.0, -2.0, 300.0)]
    got = G._softmax_list(vals)
    torch.testing.assert_close(torch.tensor(got), torch.tensor([1.0, -2.0, 300.0]).softmax(0),
                               check_dtype=False)


def test_every_exercise_has_gradients_that_flow():
    g = _g(8)
    x = _r(g, B, HW, C, dtype=torch.float32).requires_grad_()
    ws = [_r(g, *s, dtype=torch.float32).mul(0.3).requires_grad_()
          for s in [(C, L), (C, C), (C, DK), (C, DK), (C, C), (C, C), (C, C), (C, C)]]
    a = tokens.filter_attention(x, ws[0])
    t = tokens.gather_tokens(x, a)
    a2 = tokens.recurrent_attention(x, t, ws[1])
    t2 = tokens.token_transformer(tokens.gather_tokens(x, a2), *ws[2:6])
    out = tokens.project(x, t2, tokens.projector_attention(x, t2, ws[6], ws[7]))
    out.square().sum().backward()
    for p in [x, *ws]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- the VT module

def test_vt_modules_follow_the_equations():
    torch.manual_seed(0)
    first = tokens.VisualTransformer(C, L).double()
    second = tokens.VisualTransformer(C, L, recurrent=True).double()
    x = _r(_g(9), B, HW, C)
    o1 = first(x)
    A = (x @ first.tokenizer).softmax(1)
    T = A.transpose(1, 2) @ x
    T = G.naive_token_transformer(T, *(p.detach() for p in (first.key, first.query, first.f1,
                                                           first.f2)))
    P = ((x @ first.proj_query) @ (T @ first.proj_key).transpose(1, 2)).softmax(-1)
    torch.testing.assert_close(o1.attention, A)
    torch.testing.assert_close(o1.tokens, T)
    torch.testing.assert_close(o1.readback, P)
    torch.testing.assert_close(o1.features, x + P @ T)
    o2 = second(o1.features, o1.tokens)
    torch.testing.assert_close(o2.attention, G.naive_recurrent_attention(
        o1.features.detach(), o1.tokens.detach(), second.tokenizer.detach()))
    with pytest.raises(ValueError, match="previous module's tokens"):
        second(x)


def test_plugged_exercises_reach_every_caller():
    """Late binding: the VT module, VT-FPN and the explorer call the module globals at call time."""
    calls = []

    @plug(tokens, quiet=True)
    def gather_tokens(features, attention):
        calls.append(features.shape)
        return attention.transpose(1, 2) @ features

    try:
        tokens.VisualTransformer(C, L)(torch.randn(B, HW, C))
        tokens.VTFPN((3, 5), channels=8, tokens_per_level=2)(
            [torch.randn(1, 3, 4, 4), torch.randn(1, 5, 2, 2)])
    finally:
        unplug(tokens, "gather_tokens")
    assert len(calls) == 3


def test_unfinished_exercise_names_itself():
    @plug(tokens, quiet=True)
    def filter_attention(features, weight):
        raise NotImplementedError

    try:
        with pytest.raises(vl.ExerciseNotDone, match=r"Exercise 2\.1 .*02_visual_tokens"):
            tokens.VisualTransformer(C, L)(torch.randn(B, HW, C))
    finally:
        unplug(tokens, "filter_attention")


def test_wrong_shape_from_a_learner_is_named():
    @plug(tokens, quiet=True)
    def projector_attention(features, tokens, query_weight, key_weight):
        return torch.zeros(features.shape[0], tokens.shape[1], features.shape[1])

    try:
        with pytest.raises(vl.ShapeError, match="projector_attention"):
            tokens.VisualTransformer(C, L)(torch.randn(B, HW, C))
    finally:
        unplug(tokens, "projector_attention")


# ---------------------------------------------------------------------------- models

def test_vt_resnet_replaces_layer4_of_a_torchvision_resnet():
    torch.manual_seed(0)
    model = tokens.VTResNet(torchvision.models.resnet18(), num_classes=7, num_tokens=16).eval()
    assert not hasattr(model, "layer4") and len(model.vt) == 2
    assert model.vt[0].tokenizer.shape == (256, 16) and model.vt[1].recurrent
    assert model.vt[-1].proj_query is None            # the classifier reads tokens, not the map
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert model.vt[0].tokenizer.grad.abs().sum() > 0


def test_vt_fpn_and_plain_fpn_shapes():
    feats = [torch.randn(1, c, s, s + 1) for c, s in zip((4, 6, 8, 10), (8, 4, 2, 1))]
    for fpn in (tokens.PlainFPN((4, 6, 8, 10), 12), tokens.VTFPN((4, 6, 8, 10), 12, 3)):
        outs = fpn(feats)
        assert [tuple(o.shape) for o in outs] == [(1, 12, s, s + 1) for s in (8, 4, 2, 1)]


def test_quick_models_forward_backward_and_parameter_budget():
    cfg = tokens.TokensConfig.quick()
    vt, conv = tokens.build(cfg, 10), tokens.build(replace(cfg, head="conv"), 10)
    assert vt.cfg is cfg
    n_vt = sum(p.numel() for p in vt.head.parameters())
    n_conv = sum(p.numel() for p in conv.head.parameters())
    assert n_vt == tokens.vt_parameter_count(cfg)
    assert abs(n_conv - n_vt) / n_vt < 0.05, (n_conv, n_vt)
    batch = {"image": torch.rand(2, 3, 64, 64), "semantic": torch.randint(0, 10, (2, 64, 64))}
    for m in (vt, conv):
        loss = tokens.loss_fn(m, batch)["loss"]
        loss.backward()
        assert torch.isfinite(loss)
    out = vt(batch["image"])
    assert out.logits.shape == (2, 10, 64, 64) and out.grid == (16, 16) and len(out.vt) == 2


def test_configs_and_bad_values():
    for scale in ("quick", "smoke", "full"):
        cfg = tokens.TokensConfig.for_scale(scale)
        assert cfg.target_metric in ("mIoU", "top1") and hasattr(cfg, "train")
    assert tokens.TokensConfig.quick().num_threads == 1
    assert tokens.TokensConfig.full().dataset == "imagenet"
    with pytest.raises(ValueError, match="unknown scale"):
        tokens.TokensConfig.for_scale("huge")
    with pytest.raises(ValueError, match="head="):
        tokens.build(replace(tokens.TokensConfig.quick(), head="mlp"), 10)


def test_smoke_run_baseline_checkpoint_and_load(tmp_path):
    cfg = tokens.TokensConfig.smoke()
    cfg = replace(cfg, train=replace(cfg.train, out_dir=str(tmp_path / "run")))
    res = tokens.run(cfg)
    assert res.model is not None and res.target_metric == "mIoU"
    assert 0 <= res.value <= 1 and "mIoU" in res.baseline
    assert os.path.exists(res.checkpoint) and os.path.exists(tmp_path / "run_baseline" / "last.pt")
    model = tokens.load(res.checkpoint)
    assert isinstance(model.head, tokens.VTHead)
    x = res.val[0]["image"][None]
    res.model.eval()
    torch.testing.assert_close(model(x).logits, res.model(x).logits)


def test_full_scale_check_names_every_missing_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = replace(tokens.TokensConfig.full(), data_root=str(tmp_path))
    msg = tokens.full_scale_check(cfg)
    head, *lines = msg.splitlines()
    assert head.startswith("Full scale of chapter 02 (tokens) cannot start") and len(lines) == 2
    assert lines[0].startswith("- a CUDA GPU") and "torchrun" in lines[0]
    assert "ILSVRC2012_img_val.tar" in lines[1] and "image-net.org" in lines[1]
    res = tokens.run(cfg)
    assert res.skipped == msg and res.model is None


def _fake_imagenet(root, wnids=("n01440764", "n01443537"), per_class=2):
    """torchvision's ImageNet layout after its first parse: meta.bin + train/<wnid>/*.JPEG +
    val/<wnid>/*.JPEG."""
    from PIL import Image

    torch.save(({w: (f"class {i}",) for i, w in enumerate(wnids)}, list(wnids)),
               os.path.join(root, "meta.bin"))
    for split in ("train", "val"):
        for i, w in enumerate(wnids):
            os.makedirs(os.path.join(root, split, w))
            for j in range(per_class):
                Image.new("RGB", (40 + 3 * j, 30), (60 * i, 20 * j, 90)).save(
                    os.path.join(root, split, w, f"{w}_{j}.JPEG"))


def test_imagenet_loader_on_the_official_layout_and_a_vt_r18_step(tmp_path, monkeypatch):
    _fake_imagenet(str(tmp_path))
    cfg = replace(tokens.TokensConfig.full(), data_root=str(tmp_path), img_size=32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tokens.full_scale_check(cfg) is None
    train, val = tokens.imagenet_data(cfg)
    assert len(train) == 4 and len(val) == 4
    s = train[0]
    assert s["image"].shape == (3, 32, 32) and s["label"] in (0, 1)
    batch = torch.utils.data.default_collate([train[i] for i in range(4)])
    model = tokens.build(replace(cfg, num_tokens=4), 2)
    assert isinstance(model, tokens.VTResNet)
    tokens.loss_fn(model, batch)["loss"].backward()
    model.eval()
    m = tokens.metric_fn(model, [batch])
    assert 0 <= m["top1"] <= m["top5"] <= 1


def test_flops_table_against_hand_counts():
    rows = {r["what"]: r for r in tokens.flops_table()}
    r18 = rows["ResNet-18 -> VT-R18, 224 x 224"]
    assert abs(r18["ours"] - 1.81) < 0.03                      # torchvision R18 = the paper's R18
    fpn = rows["R50 FPN module -> VT-FPN, COCO-Stuff 800 x 1216"]
    # laterals + 3x3 output convs at strides 4..32 of 800 x 1216, by hand: 55.1 G (the paper's)
    pix = [200 * 304, 100 * 152, 50 * 76, 25 * 38]
    hand = sum(p * c * 256 for p, c in zip(pix, (256, 512, 1024, 2048))) + sum(pix) * 9 * 256 ** 2
    assert abs(fpn["ours"] - hand / 1e9) / (hand / 1e9) < 0.01
    assert all(r["ratio"] > 1 for r in rows.values())


def test_token_explorer_runs_the_learner_functions():
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    cfg = tokens.TokensConfig.quick()
    train, val = tokens.quick_data(replace(cfg, num_train=2, num_val=3))
    model = tokens.build(cfg, train.num_classes)
    box = tokens.token_explorer(model, val)
    st = box.state
    assert st["gather"].shape == (16, 16) and st["readback"].shape == (cfg.num_tokens,)
    torch.testing.assert_close(st["gather"].sum(), torch.tensor(1.0))     # a column of A
    torch.testing.assert_close(st["readback"].sum(), torch.tensor(1.0))   # a row of P
    slider_token = box.children[0].children[2]
    slider_token.value = 3
    assert box.state["token"] == 3
    with pytest.raises(ValueError, match="VT modules"):
        tokens.token_explorer(tokens.build(replace(cfg, head="conv"), 10), val)
