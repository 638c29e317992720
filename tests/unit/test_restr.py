"""vitseg_lab.restr: every exercise against its naive formulation (``_grader.ch05``) with a distinct
size on every axis, the padding mask honoured by every attention of the model, no convolution
anywhere (module walk and the dispatched ops), the patch embedding equal to timm's conv, late
binding of plugged exercises, configs, the full-scale lines, a smoke run, checkpoint loading and
the explorer."""

from __future__ import annotations

import inspect
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vitseg_lab as vl
from vitseg_lab import chapters, plug, restr, unplug
from vitseg_lab._grader import ch05 as G
from vitseg_lab.backbone import quick_vit


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _tiny_cfg(**kw):
    cfg = replace(restr.ReSTRConfig.smoke(), dim=24, num_heads=2, visual_depth=1, word_dim=8,
                  fusion_depth=1, seed_depth=1, mlp_ratio=2.0)
    return replace(cfg, **kw)


# ---------------------------------------------------------------------------- 5.1 patch labels

def test_patch_labels_shape_and_naive_loop():
    mask = (torch.rand(3, 12, 20, generator=_g(0)) < 0.8).float()     # h = 3 != w = 5
    y = vl.expect_shape(restr.patch_labels(mask, 4, 0.8), "B L", B=3, L=15)
    torch.testing.assert_close(y, G.naive_patch_labels(mask, 4, 0.8))


def test_patch_labels_threshold_is_strict_and_dtype_kept():
    mask = torch.zeros(1, 2, 4, dtype=torch.float64)
    mask[0, :, :2] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])            # 3 of 4 pixels
    mask[0, :, 2:] = 1.0
    y = restr.patch_labels(mask, 2, 0.75)
    assert y.dtype == torch.float64 and y.tolist() == [[0.0, 1.0]]


# ---------------------------------------------------------------------------- 5.2 attention

def _qkv(B=2, nh=3, N=4, M=7, dh=5, dv=6, seed=1, dtype=torch.float32):
    g = _g(seed)
    return (torch.randn(B, nh, N, dh, generator=g, dtype=dtype),
            torch.randn(B, nh, M, dh, generator=g, dtype=dtype),
            torch.randn(B, nh, M, dv, generator=g, dtype=dtype))


def test_padded_attention_shape_and_naive_loop():
    q, k, v = _qkv()
    pad = torch.tensor([[False, True, False, False, True, True, False], [False] * 6 + [True]])
    out, attn = restr.padded_attention(q, k, v, pad)
    vl.expect_shape(out, "B nh N dv", B=2, nh=3, N=4, dv=6)
    vl.expect_shape(attn, "B nh N M", B=2, nh=3, N=4, M=7)
    want_out, want_attn = G.naive_padded_attention(q, k, v, pad)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(attn, want_attn)
    assert (attn[0, :, :, [1, 4, 5]] == 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 4))


def test_padded_attention_without_padding_is_sdpa():
    q, k, v = _qkv(seed=2, dtype=torch.float64)
    out, _ = restr.padded_attention(q, k, v, torch.zeros(2, 7, dtype=torch.bool))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_padded_keys_and_values_change_nothing():
    q, k, v = _qkv(seed=3)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[:, 5:] = True
    out, attn = restr.padded_attention(q, k, v, pad)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] = 1e4 * torch.randn(2, 3, 2, 5, generator=_g(4))
    v2[:, :, 5:] = -1e4
    out2, attn2 = restr.padded_attention(q, k2, v2, pad)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(attn, attn2)


def test_padded_attention_all_padding_rows_are_zero_and_one_word_is_copied():
    q, k, v = _qkv(seed=5)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1] = True
    out, attn = restr.padded_attention(q, k, v, pad)
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (attn[1] == 0).all()
    q1, k1, v1 = _qkv(M=1, seed=6)
    out1, attn1 = restr.padded_attention(q1, k1, v1, torch.zeros(2, 1, dtype=torch.bool))
    assert (attn1 == 1).all()
    torch.testing.assert_close(out1, v1.expand(-1, -1, 4, -1))


def test_padded_attention_gradients_flow_but_not_into_padding():
    q, k, v = (t.requires_grad_() for t in _qkv(seed=7))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[:, -2:] = True
    out, _ = restr.padded_attention(q, k, v, pad)
    out.square().sum().backward()
    assert q.grad.abs().sum() > 0 and k.grad[:, :, :5].abs().sum() > 0
    assert (k.grad[:, :, 5:] == 0).all() and (v.grad[:, :, 5:] == 0).all()
    assert torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------- 5.3 patch logits

def test_patch_logits_shape_and_naive_loop():
    g = _g(8)
    z, e = torch.randn(3, 7, 5, generator=g), torch.randn(3, 5, generator=g)
    out = vl.expect_shape(restr.patch_logits(z, e, 1 / math.sqrt(5)), "B L", B=3, L=7)
    torch.testing.assert_close(out, G.naive_patch_logits(z, e, 1 / math.sqrt(5)))
    torch.testing.assert_close(restr.patch_logits(z, e, 1.0), (z @ e[..., None])[..., 0])


def test_patch_logits_gradients():
    g = _g(9)
    z = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    e = torch.randn(2, 6, generator=g, requires_grad=True)
    restr.patch_logits(z, e, 0.5).sum().backward()
    torch.testing.assert_close(z.grad, 0.5 * e.detach()[:, None].expand(-1, 4, -1))
    assert e.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- 5.4 decoder block

def test_decoder_block_shape_and_naive_loop():
    g = _g(10)
    x, w, b = torch.randn(2, 3, 4, 6, generator=g), torch.randn(3, 6, generator=g), torch.randn(3)
    out = vl.expect_shape(restr.decoder_block(x, w, b), "B H W C", B=2, H=6, W=8, C=3)
    torch.testing.assert_close(out, G.naive_decoder_block(x, w, b))


def test_decoder_block_constant_grid_stays_constant_and_gradients_flow():
    x = torch.ones(1, 2, 3, 4, requires_grad=True)
    w = torch.randn(2, 4, generator=_g(11), requires_grad=True)
    out = restr.decoder_block(x, w, torch.zeros(2))
    torch.testing.assert_close(out, (w.detach().sum(1)).expand(1, 4, 6, 2))
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- 5.5 loss

def test_restr_loss_naive_and_weights():
    g = _g(12)
    pl, pt = torch.randn(3, 12, generator=g), (torch.rand(3, 12, generator=g) < 0.3).float()
    ml, mt = torch.randn(3, 8, 9, generator=g), (torch.rand(3, 8, 9, generator=g) < 0.3).float()
    loss = restr.restr_loss(pl, pt, ml, mt, 0.1)
    assert loss.shape == ()
    torch.testing.assert_close(loss, G.naive_restr_loss(pl, pt, ml, mt, 0.1))
    only_mask = restr.restr_loss(pl, pt, ml, mt, 0.0)
    torch.testing.assert_close(only_mask, F.binary_cross_entropy_with_logits(ml, mt))


def test_restr_loss_finite_for_huge_logits():
    loss = restr.restr_loss(torch.tensor([[300.0]]), torch.zeros(1, 1),
                            torch.tensor([[[-300.0]]]), torch.ones(1, 1, 1), 0.1)
    torch.testing.assert_close(loss, torch.tensor(0.1 * 300 + 300.0))


# ---------------------------------------------------------------------------- 5.6 metrics

def test_referring_metrics_naive_and_definitions():
    g = _g(13)
    pred, target = torch.rand(5, 6, 7, generator=g) < 0.5, torch.rand(5, 6, 7, generator=g) < 0.5
    got = restr.referring_metrics(pred, target)
    want = G.naive_referring_metrics(pred, target)
    assert set(got) == set(want) == {"oIoU", "mIoU", *(f"prec@{x}" for x in restr.
                                                      PRECISION_THRESHOLDS)}
    for key in want:
        assert math.isclose(got[key], want[key], rel_tol=1e-9), key
    # a large object found, a small one missed: oIoU 100/101, mIoU 1/2
    p, t = torch.zeros(2, 10, 10, dtype=torch.bool), torch.zeros(2, 10, 10, dtype=torch.bool)
    p[0], t[0], t[1, 0, 0] = True, True, True
    m = restr.referring_metrics(p, t)
    assert math.isclose(m["oIoU"], 100 / 101) and math.isclose(m["mIoU"], 0.5)
    assert m["prec@0.5"] == 0.5 and m["prec@0.9"] == 0.5


# ---------------------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return restr.build(_tiny_cfg()).eval()


def test_forward_shapes(tiny):
    images = torch.rand(3, 3, 64, 64)
    out = tiny(images, ["the red circle", "the blue square on the left", "the green triangle"])
    assert out.patch_logits.shape == (3, 64) and out.mask_logits.shape == (3, 64, 64)
    assert out.grid == (8, 8) and out.classifier.shape == (3, 24)
    assert out.fusion_attn.shape == (3, 2, 64 + 8, 64 + 8)
    assert tiny.predict(images, ["the red circle"] * 3).dtype == torch.bool
    with pytest.raises(ValueError, match="3 images but 2 expressions"):
        tiny(images, ["a", "b"])


@pytest.mark.parametrize("seed_input", ["language", "fused"])
def test_padded_words_change_nothing_in_any_attention(seed_input):
    """Words in padded slots (other ids, or other vectors) must not change any output: the
    language encoder, the fusion encoder and the seed encoder all honour the padding mask."""
    torch.manual_seed(1)
    model = restr.build(_tiny_cfg(seed_input=seed_input)).eval()
    ids, pad = model.vocab.encode(["the red circle", "the blue square on the left"], 8)
    images = torch.rand(2, 3, 64, 64)
    ref = model(images, (ids, pad))
    ids2 = ids.clone()
    ids2[pad] = torch.randint(2, len(model.vocab), (int(pad.sum()),), generator=_g(2))
    other = model(images, (ids2, pad))
    torch.testing.assert_close(other.mask_logits, ref.mask_logits)
    torch.testing.assert_close(other.patch_logits, ref.patch_logits)
    torch.testing.assert_close(other.classifier, ref.classifier)
    # and the unpadded words do matter
    ids3 = ids.clone()
    ids3[0, 1] = model.vocab.index["green"]
    assert not torch.allclose(model(images, (ids3, pad)).patch_logits[0], ref.patch_logits[0])
    # every fusion query puts zero weight on padded words
    L = 64
    assert (ref.fusion_attn[:, :, :, L:][pad[:, None, None, :].expand(-1, 2, L + 8, -1)] == 0).all()


_CONV_MODULES = (nn.modules.conv._ConvNd,)


@pytest.mark.parametrize("cfg", [_tiny_cfg(), _tiny_cfg(decoder_input="masked", patch_size=16)])
def test_no_convolution_anywhere(cfg):
    """No Conv module in the model, and no convolution op runs in forward or backward."""
    model = restr.build(cfg)
    convs = [n for n, m in model.named_modules() if isinstance(m, _CONV_MODULES)]
    assert not convs, f"convolution modules: {convs}"

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        out = model(torch.rand(2, 3, 64, 64), ["the red circle", "the blue square"])
        (out.mask_logits.sum() + out.patch_logits.sum()).backward()
    assert ops.names and not [n for n in ops.names if "conv" in n], sorted(ops.names)


def test_full_size_model_has_no_convolution_either():
    cfg = restr.ReSTRConfig.full()
    cfg = replace(cfg, pretrained=False, vocab=("the", "man", "left"))
    with torch.device("meta"):
        model = restr.build(cfg)
    assert not [n for n, m in model.named_modules() if isinstance(m, _CONV_MODULES)]
    assert len(model.decoder.linears) == 4                       # K = log2 16
    assert [lin.out_features for lin in model.decoder.linears] == [768, 384, 192, 96]


def test_linear_patch_embedding_equals_timm_conv_and_loads_conv_weights():
    vit = quick_vit(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    conv = vit.patch_embed.proj
    x = torch.rand(2, 3, 32, 24)
    want = conv(x)
    enc = restr.VisualEncoder(vit)
    torch.testing.assert_close(vit.patch_embed.proj(x), want, rtol=1e-5, atol=1e-5)
    fresh = restr.LinearPatchProj(3, 16, 8)
    fresh.load_state_dict({"weight": conv.weight, "bias": conv.bias})
    torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
    assert enc.patch_size == 8


def test_plugged_exercises_run_inside_the_model(tiny):
    """plug() reaches every caller: the model looks the exercises up at call time."""
    calls = {}
    names = ["padded_attention", "patch_logits", "decoder_block"]
    try:
        for name in names:
            params = ", ".join(inspect.signature(getattr(restr, name)).parameters)
            ns = {"_f": getattr(restr, name), "_calls": calls}
            exec(f"def {name}({params}):\n    _calls['{name}'] = _calls.get('{name}', 0) + 1\n"
                 f"    return _f({params})", ns)
            plug(restr, quiet=True)(ns[name])
        tiny(torch.rand(1, 3, 64, 64), ["the red circle"])
    finally:
        for name in names:
            unplug(restr, name)
    cfg = tiny.cfg
    assert calls == {"padded_attention": cfg.language_depth + cfg.fusion_depth + cfg.seed_depth,
                     "patch_logits": 1, "decoder_block": int(math.log2(cfg.patch_size))}


def test_loss_fn_and_metric_fn_on_a_batch(tiny):
    train, _ = restr.quick_data(_tiny_cfg(num_train=4))
    batch = train.collate([train[i] for i in range(4)])
    terms = restr.loss_fn(tiny, batch)
    assert set(terms) == {"loss", "patch_bce", "mask_bce"} and terms["loss"].requires_grad
    torch.testing.assert_close(terms["loss"], tiny.cfg.lam * terms["patch_bce"] + terms["mask_bce"])
    m = restr.metric_fn(tiny, [batch])
    assert {"oIoU", "mIoU", "prec@0.5"} <= set(m) and all(isinstance(v, float) for v in m.values())


def test_expression_kinds():
    assert restr.expression_kind("the red circle") == "attribute"
    assert restr.expression_kind("the red circle on the left") == "spatial"
    assert restr.expression_kind("the topmost blue cross") == "spatial"
    assert restr.expression_kind("the larger green square") == "size"


# ---------------------------------------------------------------------------- configs, run, load

def test_configs_and_scales():
    for scale in ("quick", "smoke", "full"):
        cfg = restr.ReSTRConfig.for_scale(scale)
        assert cfg.target_metric and cfg.train.steps >= 1
    full = restr.ReSTRConfig.full()
    assert (full.img_size, full.patch_size, full.word_dim, full.max_len) == (480, 16, 300, 20)
    assert (full.train.lr, full.train.weight_decay, full.train.batch_size) == (1e-5, 5e-4, 8)
    assert (full.train.steps, full.train.warmup_steps, full.lam, full.tau) == (400_000, 40_000,
                                                                                0.1, 0.8)
    with pytest.raises(ValueError, match="unknown scale"):
        restr.ReSTRConfig.for_scale("huge")
    with pytest.raises(ValueError, match="seed_input='both'"):
        restr.build(_tiny_cfg(seed_input="both"))
    with pytest.raises(ValueError, match="not a power of 2"):
        restr.build(_tiny_cfg(patch_size=6, img_size=60))


def test_full_scale_check_lists_every_missing_piece_with_a_command(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSEG_DATA", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    msg = restr.full_scale_check(restr.ReSTRConfig.full())
    head, *lines = msg.splitlines()
    assert "4 missing pieces" in head, msg                # GPU, ViT weights, GloVe, RefCOCO
    assert len(lines) == 4 and all(line.startswith("- ") and "`" in line for line in lines)
    assert "CUDA" in lines[0] and "vit_base_patch16_224.augreg_in21k" in lines[1]
    assert "glove.840B.300d" in lines[2] and "vitseg-lab data download refcoco" in lines[3]
    ready = replace(restr.ReSTRConfig.quick())
    assert restr.full_scale_check(ready).count("\n") == 1     # quick on CPU: only the GPU line
    result = restr.run(restr.ReSTRConfig.full())
    assert result.skipped == msg and result.model is None


def test_smoke_run_returns_a_run_result_and_load_rebuilds_it(tmp_path):
    cfg = _tiny_cfg(train=replace(_tiny_cfg().train, out_dir=str(tmp_path)))
    result = restr.run(cfg)
    assert isinstance(result, chapters.RunResult) and result.skipped is None
    assert result.target_metric in result.metrics and "oIoU" in result.baseline
    assert "shuffled_oIoU" in result.metrics and result.checkpoint
    model = restr.load(result.checkpoint)
    assert model.cfg == cfg
    x = torch.rand(1, 3, 64, 64)
    result.model.eval()
    torch.testing.assert_close(model(x, ["the red circle"]).mask_logits,
                               result.model(x, ["the red circle"]).mask_logits)


def test_explorer_draws_and_explains_unknown_words(tiny):
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    _, val = restr.quick_data(_tiny_cfg(num_val=3))
    box = restr.expression_explorer(tiny, val)
    assert box.state["message"] is None and box.state["mask"].shape == (64, 64)
    assert box.state["patch_probs"].shape == (8, 8) and box.state["attention"].shape == (8, 8)
    text = box.children[1].children[0]
    text.value = "the crimson circel"
    assert "crimson" in box.state["message"] and "'circle'" in box.state["message"]
    text.value = "?!"
    assert "no words" in box.state["message"]
    box.children[0].children[0].value = 2            # another scene: its expression, drawn
    assert box.state["scene"] == 2 and box.state["message"] is None
