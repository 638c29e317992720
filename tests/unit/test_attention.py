"""Chapter 01 reference implementations vs naive formulations, shapes, gradients, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from vitseg_lab import attention as A
from vitseg_lab._grader import ch01 as N


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("B,H,W,p", [(2, 12, 8, 4), (1, 6, 9, 3), (3, 16, 16, 8)])
def test_patchify_matches_loop(B, H, W, p):
    x = torch.randn(B, 3, H, W, generator=_g())
    out = A.patchify(x, p)
    assert out.shape == (B, (H // p) * (W // p), 3 * p * p)
    assert torch.equal(out, N.naive_patchify(x, p))


def test_patchify_matches_timm_conv_weight_order():
    conv = torch.nn.Conv2d(3, 7, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 12, 8, generator=_g(1))
    want = conv(x).flatten(2).transpose(1, 2)                    # (B, L, C)
    got = A.patchify(x, 4) @ conv.weight.flatten(1).T + conv.bias
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_embed_tokens_matches_loop_and_grads_flow():
    g = _g(2)
    B, L, D, C = 2, 5, 6, 4
    args = [torch.randn(B, L, D, generator=g), torch.randn(C, D, generator=g),
            torch.randn(C, generator=g), torch.randn(1, 1, C, generator=g),
            torch.randn(1, L + 1, C, generator=g)]
    for a in args:
        a.requires_grad_(True)
    out = A.embed_tokens(*args)
    assert out.shape == (B, L + 1, C)
    torch.testing.assert_close(out, N.naive_embed_tokens(*[a.detach() for a in args]))
    out.square().sum().backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
               for a in args)


@pytest.mark.parametrize("old,new", [((4, 4), (6, 3)), ((3, 5), (3, 5)), ((6, 6), (2, 4))])
def test_resize_pos_embed_matches_timm(old, new):
    pe = torch.randn(1, 1 + old[0] * old[1], 5, generator=_g(3))
    out = A.resize_pos_embed(pe, old, new)
    assert out.shape == (1, 1 + new[0] * new[1], 5)
    torch.testing.assert_close(out, N.naive_resize_pos_embed(pe, old, new), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, 0], pe[:, 0])


def test_softmax_matches_loop_and_is_stable():
    x = torch.randn(3, 4, 5, generator=_g(4))
    for dim in (0, 1, -1):
        torch.testing.assert_close(A.softmax(x, dim), N.naive_softmax(x, dim))
        torch.testing.assert_close(A.softmax(x, dim), torch.softmax(x, dim))
    big = torch.tensor([1000.0, 1000.0 + math.log(3.0)])
    torch.testing.assert_close(A.softmax(big), torch.tensor([0.25, 0.75]))
    masked = torch.tensor([[0.0, float("-inf")], [float("-inf"), float("-inf")]])
    torch.testing.assert_close(A.softmax(masked), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    xg = x.clone().requires_grad_(True)
    A.softmax(xg, 1)[:, 0].sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_multi_head_attention_matches_loop_and_timm():
    from timm.models.vision_transformer import Attention

    B, Nt, C, nh = 2, 5, 12, 3
    ref = Attention(C, num_heads=nh, qkv_bias=True).eval()
    x = torch.randn(B, Nt, C, generator=_g(5))
    args = (x, ref.qkv.weight, ref.qkv.bias, ref.proj.weight, ref.proj.bias, nh)
    out, attn = A.multi_head_attention(*args)
    assert out.shape == (B, Nt, C) and attn.shape == (B, nh, Nt, Nt)
    n_out, n_attn = N.naive_multi_head_attention(*[a.detach() if torch.is_tensor(a) else a
                                                   for a in args])
    torch.testing.assert_close(out, n_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn, n_attn, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-4)


def test_attention_rollout_matches_loop_and_edge_cases():
    maps = [torch.randn(2, 3, 6, 6, generator=_g(6 + i)).softmax(-1) for i in range(4)]
    r = A.attention_rollout(maps)
    assert r.shape == (2, 5) and (r >= 0).all()
    torch.testing.assert_close(r, N.naive_attention_rollout(maps), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(A.attention_rollout(maps, residual=0.0),
                               N.naive_attention_rollout(maps, residual=0.0), atol=1e-6, rtol=1e-5)
    eye = [torch.eye(4).expand(1, 2, 4, 4)]
    assert torch.equal(A.attention_rollout(eye), torch.zeros(1, 3))


def test_explicit_vit_reproduces_timm_at_native_and_new_resolution():
    from vitseg_lab.backbone import quick_vit

    torch.manual_seed(0)
    vit = quick_vit(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5)
    model = A.ExplicitViT(vit).eval()
    for hw in [(32, 32), (48, 40)]:
        x = torch.randn(2, 3, *hw, generator=_g(7))
        with torch.no_grad():
            out = model(x)
            torch.testing.assert_close(out.logits, vit(x), atol=1e-4, rtol=1e-4)
        assert out.grid == (hw[0] // 8, hw[1] // 8)
        n = 1 + out.grid[0] * out.grid[1]
        assert len(out.attn) == 2 and out.attn[0].shape == (2, 3, n, n)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 30, 32))


def test_explicit_vit_grads_reach_patch_embedding():
    from vitseg_lab.backbone import quick_vit

    vit = quick_vit(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=3)
    model = A.ExplicitViT(vit)
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    g = vit.patch_embed.proj.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_config_presets():
    for s in ("quick", "smoke", "full"):
        cfg = A.AttentionConfig.for_scale(s)
        assert cfg.train.steps > 0 and cfg.target_metric in ("exact_match", "mAP")
    q = A.AttentionConfig.quick()
    assert q.target_metric == "exact_match" and q.target >= 0.8 and q.train.out_dir
    assert not q.train.resume, "a rerun of the notebook must retrain, not reload the last run"
    assert 3 <= q.train.steps // q.train.eval_every <= 6, "a few evaluations: a curve, cheaply"
    assert A.AttentionConfig.smoke().train.steps < 10
    with pytest.raises(ValueError, match="scale"):
        A.AttentionConfig.for_scale("huge")


def test_build_counts_classes_as_the_data_set_does():
    cfg = A.AttentionConfig.smoke()
    train, _ = A.quick_data(cfg)
    model = A.build(cfg, train.num_classes)
    assert model.cfg is cfg
    batch = train.collate([train[i] for i in range(3)])
    out = model(batch["image"])
    assert out.logits.shape == batch["labels"].shape          # background is no image label
    assert out.token_logits.shape[-1] == train.num_classes    # ...but a token label
    terms = A.loss_fn(model, batch)
    assert set(terms) == {"cls", "token", "mil", "loss"}
    terms["loss"].backward()


def test_smoke_run_returns_a_run_result_and_a_checkpoint_load_rebuilds(tmp_path):
    from dataclasses import asdict, replace

    from vitseg_lab import chapters

    cfg = A.AttentionConfig.smoke()
    cfg = replace(cfg, train=replace(cfg.train, out_dir=str(tmp_path)))
    res = A.run(cfg)
    assert isinstance(res, chapters.RunResult) and res.skipped is None
    assert set(res.metrics) >= {"exact_match", "label_acc", "mAP"}
    assert 0.0 <= res.value <= 1.0 and set(res.baseline) == set(res.metrics)
    assert res.config == asdict(cfg) and res.target == cfg.target
    assert [r["step"] for r in res.history.rows if "lr" not in r] == [0, 2, 4]
    model = A.load(res.checkpoint)
    assert model.cfg == cfg
    for k, v in res.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_full_scale_run_without_its_pieces_lists_every_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = A.run(A.AttentionConfig.full())
    assert res.model is None and res.skipped == A.full_scale_check()
    head, *lines = res.skipped.splitlines()
    assert head.startswith("Full scale of chapter 01") and lines[0].startswith("- a CUDA GPU")
    assert all(line.startswith("- ") and "`" in line for line in lines)
    if A.fullscale.missing_message("voc"):
        assert any("vitseg-lab data download voc" in line for line in lines)
