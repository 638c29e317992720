"""vitseg_lab.segvit: every exercise against its naive loop (``_grader.ch03``), the ATM decoder and
head against a literal per-class, per-head loop, QD against a full block, the Shrunk model, sliding
windows, late binding of plugged exercises, configs and the full-scale line."""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitseg_lab as vl
from vitseg_lab import chapters, inference, plug, segvit, shrunk, unplug
from vitseg_lab._grader import ch03 as G
from vitseg_lab.backbone import ViTBackbone, quick_vit


def _g(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- 3.1 similarity

def test_atm_similarity_shape_and_naive_loop():
    g = _g(0)
    q, k = torch.randn(2, 3, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    sim = vl.expect_shape(segvit.atm_similarity(q, k, 4), "B nh K L", B=2, nh=4, K=3, L=5)
    torch.testing.assert_close(sim, G.naive_atm_similarity(q, k, 4))


def test_atm_similarity_one_head_is_scaled_dot_product():
    g = _g(1)
    q, k = torch.randn(1, 2, 9, generator=g), torch.randn(1, 4, 9, generator=g)
    torch.testing.assert_close(segvit.atm_similarity(q, k, 1)[:, 0], q @ k.transpose(1, 2) / 3)


def test_atm_similarity_gradients():
    g = _g(2)
    q = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    segvit.atm_similarity(q, k, 2).square().sum().backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- 3.2 mask logits

def test_atm_mask_logits_shape_and_naive_loop():
    sim = torch.randn(2, 3, 4, 15, generator=_g(3))
    out = vl.expect_shape(segvit.atm_mask_logits(sim, (3, 5)), "B K h w", B=2, K=4, h=3, w=5)
    torch.testing.assert_close(out, G.naive_atm_mask_logits(sim, (3, 5)))


def test_atm_mask_logits_are_pre_softmax_and_row_major():
    sim = torch.zeros(1, 2, 1, 6)
    sim[0, 0, 0, 4] = 10.0   # head 0 says token 4 = row 1, column 1 of a 2 x 3 grid
    sim[0, 1, 0, 4] = -2.0
    out = segvit.atm_mask_logits(sim, (2, 3))
    assert out[0, 0, 1, 1] == 4.0 and out.abs().sum() == 4.0


# ---------------------------------------------------------------------------- 3.3 cascade

def test_cascade_masks_same_grid_is_a_running_sum():
    g = _g(4)
    ms = [torch.randn(2, 3, 4, 5, generator=g) for _ in range(3)]
    out = vl.expect_shape(segvit.cascade_masks(ms), "S B K h w", S=3, B=2, K=3, h=4, w=5)
    torch.testing.assert_close(out[0], ms[0])
    torch.testing.assert_close(out[2], ms[0] + ms[1] + ms[2])


def test_cascade_masks_resizes_to_last_grid_like_a_naive_bilinear_loop():
    g = _g(5)
    ms = [torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64),
          torch.randn(1, 2, 6, 5, generator=g, dtype=torch.float64)]
    torch.testing.assert_close(segvit.cascade_masks(ms), G.naive_cascade_masks(ms))


def test_naive_bilinear_agrees_with_torch():  # the grader's own loop is right
    m = torch.randn(3, 4, generator=_g(6), dtype=torch.float64)
    want = F.interpolate(m[None, None], size=(7, 5), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(G._bilinear(m, (7, 5)), want)


# ---------------------------------------------------------------------------- 3.4 inference

def test_semantic_scores_shape_and_naive_loop():
    g = _g(7)
    cls, masks = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 6, 7, generator=g)
    out = vl.expect_shape(segvit.semantic_scores(cls, masks), "B K H W", B=2, K=4, H=6, W=7)
    torch.testing.assert_close(out, G.naive_semantic_scores(cls, masks))


def test_semantic_scores_worked_example():
    # one token, sure it is class 1 of 2; its mask is on at one pixel
    cls = torch.tensor([[[-20.0, 20.0, -20.0]]])
    masks = torch.tensor([[[[30.0, -30.0]]]])
    out = segvit.semantic_scores(cls, masks)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]]]]), atol=1e-6,
                               rtol=0)


# ---------------------------------------------------------------------------- 3.7 QD

def test_query_downsample_shape_and_naive_loop():
    t = torch.randn(2, 35, 3, generator=_g(8))
    out = vl.expect_shape(segvit.query_downsample(t, (5, 7)), "B L C", B=2, L=12, C=3)
    torch.testing.assert_close(out, G.naive_query_downsample(t, (5, 7)))


def test_qd_block_equals_a_full_block_sampled_at_the_queries():
    """Attention rows are independent: QD's output is the full block's output at the kept rows."""
    torch.manual_seed(0)
    vit = quick_vit(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2).eval()
    blk, P, grid = vit.blocks[0], vit.num_prefix_tokens, (5, 3)
    x = torch.randn(2, P + 15, 24)
    out, small = shrunk.qd_block(blk, x, grid, P)
    full = blk(x)
    keep = G.naive_query_downsample(full[:, P:], grid)
    assert small == (3, 2)
    torch.testing.assert_close(out, torch.cat([full[:, :P], keep], 1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- decoder and head

def _tiny_head(K=3, C=10, d=8, nh=2, S=2, layers=1, seed=0):
    torch.manual_seed(seed)
    return segvit.ATMHead(in_dim=C, num_classes=K, dim=d, num_heads=nh, num_stages=S,
                          layers_per_stage=layers).double().eval()


def test_decoder_layer_matches_per_class_per_head_loop():
    torch.manual_seed(0)
    layer = segvit.ATMDecoderLayer(8, 2).double().eval()
    q, f = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    out, sim = layer(q, f)
    for b in range(2):
        x, mask = G.naive_atm_decoder(layer.state_dict(), q[b], f[b], 2)
        torch.testing.assert_close(out[b], x)
        torch.testing.assert_close(sim[b].mean(0), mask)


def test_atm_head_matches_naive_cascade_loop():
    """The whole head: per image, stages deepest first, tokens flowing on, masks accumulating."""
    head = _tiny_head(S=2, layers=2)
    grid = (2, 3)
    feats = [torch.randn(2, 6, 10, dtype=torch.float64) for _ in range(2)]
    out = head(feats, grid)
    sd = head.state_dict()
    for b in range(2):
        q = sd["class_tokens"]
        acc = 0
        for s, f in enumerate(reversed(feats)):
            proj = f[b] @ sd[f"layer_tokens.{s}.proj.weight"].T + sd[f"layer_tokens.{s}.proj.bias"]
            tokens = F.layer_norm(proj, (8,), sd[f"layer_tokens.{s}.norm.weight"],
                                  sd[f"layer_tokens.{s}.norm.bias"])
            for i in range(2):
                layer_sd = {k[len(f"stages.{s}.{i}."):]: v for k, v in sd.items()
                            if k.startswith(f"stages.{s}.{i}.")}
                q, mask = G.naive_atm_decoder(layer_sd, q, tokens, 2)
            acc = acc + mask.reshape(3, *grid)
            cls = q @ sd["class_head.weight"].T + sd["class_head.bias"]
            torch.testing.assert_close(out.class_logits[s][b], cls)
            torch.testing.assert_close(out.stage_logits[s][b], mask.reshape(3, *grid))
            torch.testing.assert_close(out.mask_logits[s][b], acc)


def test_mask_logits_get_gradient_through_the_attention_logits():
    head = _tiny_head().float().train()
    feats = [torch.randn(2, 6, 10, requires_grad=True) for _ in range(2)]
    out = head(feats, (2, 3))
    out.mask_logits[-1].sum().backward()  # mask loss only: must reach q/k projections and tokens
    layer = head.stages[-1][0]
    assert layer.q_proj.weight.grad.abs().sum() > 0 and layer.k_proj.weight.grad.abs().sum() > 0
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_head_rejects_wrong_number_of_layers():
    with pytest.raises(ValueError, match="out_layers"):
        _tiny_head(S=2)([torch.randn(1, 6, 10, dtype=torch.float64)], (2, 3))


# ---------------------------------------------------------------------------- model, plug, Shrunk

@pytest.fixture(scope="module")
def quick_model():
    torch.manual_seed(0)
    cfg = replace(segvit.SegViTConfig.quick(), img_size=32)
    return segvit.build(cfg, num_classes=5)


def test_segvit_forward_backward_and_predict(quick_model):
    from vitseg_lab.data.shapes import ShapeScenes

    ds = ShapeScenes(4, size=32, colors=("red", "green"), shapes=("circle", "square"))
    batch = ShapeScenes.collate([ds[i] for i in range(4)])
    cfg = quick_model.cfg
    terms = segvit.loss_fn(quick_model, batch)
    terms["loss"].backward()
    grads = [p.grad for p in quick_model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    quick_model.zero_grad()
    scores = quick_model.predict(batch["image"])
    vl.expect_shape(scores, "B K H W", B=4, K=5, H=32, W=32)
    out = quick_model(batch["image"])
    g = 32 // cfg.patch_size
    assert len(out.mask_logits) == 3 and out.grid == (g, g)


def test_plugged_exercises_drive_the_model(quick_model):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = quick_model(x).mask_logits[-1]

        @plug(segvit, quiet=True)
        def atm_mask_logits(sim, grid):
            return sim.amax(dim=1).reshape(sim.shape[0], sim.shape[2], *grid)

        try:
            after = quick_model(x).mask_logits[-1]
        finally:
            unplug(segvit)
    assert not torch.allclose(before, after)


def test_a_wrong_exercise_shape_is_reported_by_name(quick_model):
    @plug(segvit, quiet=True)
    def atm_similarity(queries, keys, num_heads):
        return queries @ keys.transpose(1, 2)  # heads forgotten

    try:
        with pytest.raises(vl.ShapeError, match="atm_similarity"):
            quick_model(torch.rand(1, 3, 32, 32))
    finally:
        unplug(segvit)


def test_exercises_are_called_late_not_bound():
    src = inspect.getsource(segvit)
    names = "atm_similarity|atm_mask_logits|cascade_masks|semantic_scores|query_downsample"
    assert not re.search(rf"self\.\w+\s*=\s*({names})\b", src)
    for mod in ("segvit", "losses"):
        assert not re.search(rf"from \.{mod} import|from vitseg_lab\.{mod} import", src)


def test_exercise_tags_and_solution_regions():
    from vitseg_lab import losses
    from vitseg_lab.exercises import exercise_tag

    tags = {n: exercise_tag(getattr(m, n)) for m, ns in (
        (segvit, ["atm_similarity", "atm_mask_logits", "cascade_masks", "semantic_scores",
                  "query_downsample"]),
        (losses, ["sigmoid_focal_loss", "dice_loss"])) for n in ns}
    assert sorted(tags.values()) == ["3.1", "3.2", "3.3", "3.4", "3.5", "3.6", "3.7"]
    for m in (segvit, losses):
        src = inspect.getsource(m)
        assert src.count("### BEGIN SOLUTION") == src.count("### END SOLUTION")
    from vitseg_lab.exercises import notebook_of

    assert notebook_of("3.5") == notebook_of("3.1") == "notebooks/03_segvit_atm.ipynb"


def _shrunk(img=64, depth=4, qd=2, K=3):
    torch.manual_seed(0)
    vit = quick_vit(img_size=img, patch_size=8, embed_dim=24, depth=depth, num_heads=2)
    grid = (img // 8, img // 8)
    up = shrunk.QueryUpsampler(in_dim=24, dim=16, num_heads=2, grid=grid, depth=1)
    head = segvit.ATMHead(in_dim=16, num_classes=K, dim=16, num_heads=2, num_stages=1,
                          layers_per_stage=1)
    return shrunk.ShrunkSegViT(ViTBackbone(vit), up, head, qd_index=qd)


def test_shrunk_model_runs_at_1_32_and_returns_1_16_masks():
    model = _shrunk()
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    assert out.grid == (8, 8) and out.mask_logits[-1].shape == (2, 3, 8, 8)
    vl.expect_shape(model.predict(x), "B K H W", B=2, K=3, H=64, W=64)
    out.mask_logits[-1].sum().backward()
    assert model.backbone.vit.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    # another input size: the QU queries are resampled
    assert model(torch.rand(1, 3, 48, 80)).mask_logits[-1].shape == (1, 3, 6, 10)


def test_shrunk_rejects_bad_qd_index():
    with pytest.raises(ValueError, match="qd_index"):
        _shrunk(qd=0)


# ---------------------------------------------------------------------------- sliding windows

class _PixelModel(torch.nn.Module):
    """A per-pixel scorer: sliding windows must reproduce whole-image scores exactly."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def predict(self, images):
        return self.conv(images)


def test_window_starts_cover_the_image():
    assert inference._window_starts(1280, 640, 608) == [0, 608, 640]
    assert inference._window_starts(640, 640, 608) == [0]
    assert inference._window_starts(500, 640, 608) == [0]


def test_slide_inference_equals_whole_image_for_a_per_pixel_model():
    torch.manual_seed(0)
    m = _PixelModel()
    x = torch.rand(2, 3, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(inference.slide_inference(m, x, crop=16, stride=12),
                                   m.predict(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        inference.slide_inference(m, x, crop=16, stride=20)


def test_slide_inference_one_window_is_predict(quick_model):
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(inference.slide_inference(quick_model, x, crop=64, stride=32),
                                   quick_model.predict(x))


class _RampModel(_PixelModel):
    """Per-pixel scores plus a left-to-right ramp: not mirror-symmetric, so flip matters."""

    def predict(self, images):
        ramp = torch.linspace(0, 1, images.shape[-1]).expand(*images.shape[-2:])
        return self.conv(images) + ramp * torch.arange(4.0).view(1, 4, 1, 1)


def _one_aug(m, x, r, flipped, crop, stride, size):
    """One augmentation written out: resize, (mirror,) slide, (mirror back,) resize, softmax."""
    H, W = x.shape[-2:]
    sc = min(crop * r / min(H, W), 2048 * r / max(H, W))
    xi = F.interpolate(x, size=(round(H * sc), round(W * sc)), mode="bilinear",
                       align_corners=False)
    if flipped:
        xi = torch.flip(xi, dims=[3])
    s = inference.slide_inference(m, xi, crop=crop, stride=stride)
    if flipped:
        s = torch.flip(s, dims=[3])
    return F.interpolate(s, size=size, mode="bilinear", align_corners=False).softmax(1)


def test_aug_test_single_scale_is_the_sliding_window_test():
    torch.manual_seed(0)
    m, x = _PixelModel(), torch.rand(1, 3, 37, 53)
    got = segvit.aug_test_scores(m, x, crop=16, stride=12, size=(20, 30))
    vl.expect_shape(got, "B K H W", B=1, K=4, H=20, W=30)
    torch.testing.assert_close(got, _one_aug(m, x, 1.0, False, 16, 12, (20, 30)))
    # the softmax keeps the single-scale argmax of the raw scores
    raw = F.interpolate(inference.slide_inference(m, inference.resize_short(x, 16, 2048), crop=16,
                                                  stride=12), size=(20, 30), mode="bilinear",
                        align_corners=False)
    assert torch.equal(got.argmax(1), raw.argmax(1))
    with pytest.raises(ValueError, match="ratios"):
        segvit.aug_test_scores(m, x, crop=16, stride=12, ratios=())


def test_aug_test_multi_scale_and_flip_average_every_augmentation():
    torch.manual_seed(1)
    m, x = _RampModel(), torch.rand(1, 3, 30, 44)
    ratios, size = (0.5, 1.0, 1.75), (30, 44)
    got = segvit.aug_test_scores(m, x, crop=16, stride=12, ratios=ratios, flip=True)
    want = torch.stack([_one_aug(m, x, r, f, 16, 12, size) for r in ratios
                        for f in (False, True)]).mean(0)
    torch.testing.assert_close(got, want)
    no_flip = segvit.aug_test_scores(m, x, crop=16, stride=12, ratios=ratios)
    assert not torch.allclose(got, no_flip), "the ramp is not mirror-symmetric: flip must count"
    # a mirror-symmetric (per-pixel) model: flipping changes nothing
    p = _PixelModel()
    torch.testing.assert_close(segvit.aug_test_scores(p, x, crop=16, stride=12, flip=True),
                               segvit.aug_test_scores(p, x, crop=16, stride=12))
    assert segvit.MS_RATIOS == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert (segvit.PAPER["vit_l_ade_miou_ms"], segvit.PAPER["vit_l_shrunk_ade_miou_ms"],
            segvit.PAPER["vit_b_ade_miou_ms"]) == (55.2, 55.1, 53.0)


def test_full_scale_metric_uses_the_configured_test_augmentation(monkeypatch, quick_model):
    seen = []

    def fake(model, image, **kw):
        seen.append(kw)
        return torch.rand(1, 5, *kw["size"])

    monkeypatch.setattr(segvit, "aug_test_scores", fake)
    cfg = replace(quick_model.cfg, dataset="ade20k", crop=32, slide_stride=24,
                  test_ratios=segvit.MS_RATIOS, test_flip=True)
    old, quick_model.cfg = quick_model.cfg, cfg
    try:
        loader = [{"image": torch.rand(2, 3, 40, 48), "semantic": torch.randint(0, 5, (2, 20, 24))}]
        m = segvit.metric_fn(quick_model, loader)
    finally:
        quick_model.cfg = old
    assert 0 <= m["mIoU"] <= 1 and len(seen) == 2
    assert seen[0] == {"crop": 32, "stride": 24, "ratios": segvit.MS_RATIOS, "flip": True,
                       "size": (20, 24)}
    full = segvit.SegViTConfig.full()
    assert (full.test_ratios, full.test_flip) == ((1.0,), False), "the ss column by default"


def test_full_large_missing_pieces_name_the_full_large_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = segvit.full_scale_check(segvit.SegViTConfig.full_large()).splitlines()[1]
    assert gpu.startswith("- a CUDA GPU") and "--scale full-large`" in gpu, gpu
    assert "VITSEG_SCALE=full" not in gpu, "the notebook's full scale is the ViT-B row"
    base = segvit.full_scale_check(segvit.SegViTConfig.full()).splitlines()[1]
    assert "--scale full`" in base and "full-large" not in base


# ---------------------------------------------------------------------------- configs and run

def test_configs_hold_the_paper_recipe():
    full = segvit.SegViTConfig.for_scale("full")
    assert (full.img_size, full.crop, full.slide_stride, full.out_layers, full.decoder_dim) == (
        512, 512, 341, (5, 7, 11), 384), "ViT-B's row is the 512 setting (METHODS 1.6)"
    assert full.model_name == "vit_base_patch16_384.augreg_in21k_ft_in1k"
    t = full.train
    assert (t.steps, t.lr, t.weight_decay, t.warmup_steps, t.schedule, t.grad_clip,
            t.head_lr_mult, t.no_decay_norm_bias) == (160_000, 2e-5, 0.01, 1500, "poly", 35.0,
                                                      10.0, "norm")
    assert full.global_batch_size == 16 and t.batch_size * 8 == 16, "2 per GPU on 8 GPUs"
    assert (full.drop_cls_token, full.decoder_dropout, full.atm_attn_dropout,
            full.official_init, full.reduce_num_masks) == (True, 0.1, 0.1, True, True)
    assert full.target == 51.3
    large = segvit.SegViTConfig.for_scale("full-large")
    assert (large.img_size, large.crop, large.slide_stride, large.out_layers, large.decoder_dim,
            large.decoder_heads, large.embed_dim, large.depth, large.drop_path) == (
        640, 640, 608, (7, 15, 23), 512, 16, 1024, 24, 0.3)
    assert large.target == 54.6 and large.global_batch_size == 16
    assert segvit.SegViTConfig.for_scale("quick").target >= 0.8
    assert segvit.SegViTConfig.for_scale("smoke").train.steps <= 5
    with pytest.raises(ValueError, match="quick"):
        segvit.SegViTConfig.for_scale("huge")


def test_full_scale_check_lists_every_missing_piece_with_its_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = segvit.full_scale_check()
    head, *lines = msg.splitlines()
    assert head.startswith("Full scale of chapter 03") and f"{len(lines)} missing" in head
    assert lines[0].startswith("- a CUDA GPU") and "--scale full" in lines[0]
    assert all(line.startswith("- ") and "`" in line for line in lines), lines
    if segvit.fullscale.weights_problem(segvit.FULL_MODEL):
        assert any(segvit.FULL_MODEL in line for line in lines)
    if segvit.fullscale.missing_message("ade20k"):
        assert any("vitseg-lab data download ade20k" in line for line in lines)


def test_full_scale_run_without_its_pieces_is_skipped_with_the_list(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = segvit.run(segvit.SegViTConfig.full())
    assert res.model is None and res.skipped == segvit.full_scale_check()
    assert not res.reached and res.summary().startswith("skipped: Full scale")


def test_run_smoke_trains_end_to_end(tmp_path):
    cfg = segvit.SegViTConfig.smoke()
    cfg = replace(cfg, train=replace(cfg.train, out_dir=str(tmp_path)))
    out = segvit.run(cfg)
    assert isinstance(out, chapters.RunResult) and out.target_metric == "mIoU"
    assert 0.0 <= out.value <= 1.0 and 0.0 <= out.baseline["mIoU"] <= 1.0
    assert len(out.metrics["iou"]) == out.model.num_classes
    assert any("loss" in r for r in out.history.rows)
    evals = [r["step"] for r in out.history.rows if "lr" not in r]
    assert evals == [0, 2, 3], "the baseline at step 0, then every eval_every steps and the end"
    assert out.config == dataclasses.asdict(cfg) and out.seconds > 0
    model = segvit.load(out.checkpoint)                   # the registry can rebuild it
    assert model.cfg == cfg and model.num_classes == out.model.num_classes
    for k, v in out.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_quick_config_follows_the_protocol():
    q = segvit.SegViTConfig.quick()
    assert q.target_metric == "mIoU" and q.target >= 0.8 and q.train.out_dir
    assert not q.train.resume, "a rerun of the notebook must retrain, not reload the last run"
    assert 3 <= q.train.steps // q.train.eval_every <= 6, "a few evaluations: a curve, cheaply"


def test_full_scale_path_runs_on_an_ade20k_fixture(tmp_path, monkeypatch):
    """The ADE20K branch of run(): paper transform, list-collated val images of other sizes,
    short-side resize + sliding windows + resize back, checkpoint — on a tiny model and fake data."""
    from vitseg_lab.data import fixtures

    fixtures.make_ade20k(tmp_path, n_train=4, n_val=2, size=(40, 56))
    monkeypatch.setenv("VITSEG_DATA", str(tmp_path))
    monkeypatch.setattr(segvit, "full_scale_check", lambda cfg=None: None)  # no CUDA, no weights
    full = segvit.SegViTConfig.full()
    cfg = replace(full, model_name="quick", pretrained=False, img_size=32, patch_size=8,
                  embed_dim=24, depth=2, num_heads=2, out_layers=(0, 1), decoder_dim=24,
                  decoder_heads=2, layers_per_stage=1, crop=32, slide_stride=24,
                  global_batch_size=None,
                  train=replace(full.train, steps=2, batch_size=2, warmup_steps=1, num_workers=0,
                                eval_every=0, ckpt_every=0, out_dir=str(tmp_path / "run"),
                                progress=False))
    out = segvit.run(cfg)
    assert 0.0 <= out.value <= 1.0 and len(out.metrics["iou"]) == segvit.ADE_CLASSES
    assert (tmp_path / "run" / "last.pt").exists()


# ---------------------------------------------------------------------------- official behaviours

def _tiny_cfg(**kw):
    kw = {"model_name": "quick", "img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 4,
          "num_heads": 2, "out_layers": (1, 3), "decoder_dim": 16, "decoder_heads": 2,
          "layers_per_stage": 3, **kw}
    return replace(segvit.SegViTConfig.quick(), **kw)


def test_global_batch_is_split_over_the_processes(monkeypatch):
    full = segvit.SegViTConfig.full()
    assert segvit.per_process_batch(full, 8).train.batch_size == 2
    assert segvit.per_process_batch(full, 1).train.batch_size == 16
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert segvit.per_process_batch(full).train.batch_size == 4
    with pytest.raises(ValueError, match="split"):
        segvit.per_process_batch(full, 3)
    q = segvit.SegViTConfig.quick()
    assert segvit.per_process_batch(q, 8) is q, "no global batch: the per-process one stays"
    off = replace(full, global_batch_size=0)
    assert segvit.per_process_batch(off, 8) is off


def test_drop_cls_token_blocks_see_patch_tokens_only():
    torch.manual_seed(0)
    seen = []
    model = segvit.build(_tiny_cfg(drop_cls_token=True), 3)
    assert isinstance(model.backbone, segvit.PatchOnlyBackbone)
    assert not model.backbone.vit.cls_token.requires_grad
    model.backbone.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model(torch.rand(2, 3, 32, 32))
    assert seen[0] == (2, 16, 24), "16 patch tokens, no CLS token, enter the first block"
    # the patch tokens carry their own position embedding (pos_embed[1:]), as the official ViT
    vit = model.backbone.vit
    x = torch.rand(1, 3, 32, 32)
    tok, _ = model.backbone.embed(x)
    want = vit.patch_embed(x).flatten(1, 2) + vit.pos_embed[:, 1:]   # NHWC: dynamic size
    torch.testing.assert_close(tok, want)
    kept = segvit.build(_tiny_cfg(drop_cls_token=False), 3)
    seen.clear()
    kept.backbone.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    kept(torch.rand(2, 3, 32, 32))
    assert seen[0] == (2, 17, 24)


def test_dropout_is_active_in_train_and_absent_in_eval():
    torch.manual_seed(0)
    layer = segvit.ATMDecoderLayer(16, 2, dropout=0.1, attn_dropout=0.1)
    q, f = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    layer.train()
    a, sim_a = layer(q, f)
    b, sim_b = layer(q, f)
    assert not torch.allclose(a, b), "train mode: two passes differ (dropout)"
    layer.eval()
    torch.testing.assert_close(layer(q, f)[0], layer(q, f)[0])
    # the ATM attention dropout alone also acts on the class-token update
    only_attn = segvit.ATMDecoderLayer(16, 2, dropout=0.0, attn_dropout=0.5).train()
    (a, sim_a), (b, sim_b) = only_attn(q, f), only_attn(q, f)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(sim_a, sim_b, msg="the mask logits are taken before the dropout")
    assert only_attn.attn_dropout.p == 0.5
    model = segvit.build(_tiny_cfg(decoder_dropout=0.1, atm_attn_dropout=0.1), 3)
    ps = {m.p for m in model.head.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.1}
    assert model.head.stages[0][0].self_attn.dropout == 0.1


def test_official_init_statistics():
    torch.manual_seed(0)
    head = segvit.ATMHead(in_dim=64, num_classes=200, dim=256, num_heads=4, num_stages=1,
                          layers_per_stage=2, official_init=True)
    assert abs(float(head.class_tokens.detach().std()) - 1.0) < 0.05, "class queries ~ N(0, 1)"
    w = head.stages[0][0].q_proj.weight
    assert abs(float(w.detach().std()) - 0.02) < 0.002, "trunc-normal std 0.02"
    assert float(head.class_head.bias.detach().abs().sum()) == 0.0
    ln = head.layer_tokens[0].norm
    assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and not ln.bias.detach().any()
    plain = segvit.ATMHead(in_dim=64, num_classes=200, dim=256, num_heads=4, num_stages=1,
                           layers_per_stage=2, official_init=False)
    assert float(plain.class_tokens.detach().std()) < 0.05
    assert float(plain.stages[0][0].q_proj.weight.detach().std()) > 0.03, "PyTorch's default"
    up = shrunk.QueryUpsampler(in_dim=24, dim=64, num_heads=2, grid=(16, 16), depth=1,
                               official_init=True)
    assert abs(float(up.queries.detach().std()) - 1.0) < 0.1, "QU queries ~ N(0, 1)"


def test_official_weight_decay_exempts_only_norm_layers():
    from vitseg_lab.train import param_groups

    model = segvit.build(_tiny_cfg(drop_cls_token=True), 3)
    cfg = segvit.SegViTConfig.full().train
    groups = param_groups(model, cfg)
    ids = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[i] for g in groups if g["weight_decay"] == 0 for i in ids[g["name"]]}
    assert no_decay, "norm layers get no decay"
    assert all(".norm" in n for n in no_decay), no_decay
    decay = {names[i] for g in groups if g["weight_decay"] > 0 for i in ids[g["name"]]}
    assert "head.class_head.bias" in decay and "backbone.vit.pos_embed" in decay
    assert "head.class_tokens" in decay
    assert "backbone.vit.cls_token" not in decay | no_decay, "frozen: not optimised at all"
    # the course default still exempts biases and 1-d parameters
    course = param_groups(model, replace(cfg, no_decay_norm_bias=True))
    course_nd = {names[id(p)] for g in course if g["weight_decay"] == 0 for p in g["params"]}
    assert "head.class_head.bias" in course_nd


def _num_masks_worker(rank, path, counts):
    import torch.distributed as dist

    from vitseg_lab import losses

    dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=rank, world_size=2)
    try:
        got = losses.global_num_masks(counts[rank])
        own = losses.global_num_masks(counts[rank], reduce=False)
        Path(f"{path}.{rank}").write_text(f"{got} {own}")
    finally:
        dist.destroy_process_group()


def test_mask_normaliser_is_averaged_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    from vitseg_lab import losses

    assert losses.global_num_masks(3) == 3.0 and losses.global_num_masks(0) == 1.0
    path = str(tmp_path / "nm")
    mp.spawn(_num_masks_worker, args=(path, (2, 8)), nprocs=2, join=True)
    results = [tuple(map(float, Path(f"{path}.{r}").read_text().split())) for r in range(2)]
    assert results == [(5.0, 2.0), (5.0, 8.0)], "all-reduced sum / world size on every rank"


def test_atm_loss_uses_the_reduced_normaliser(monkeypatch):
    from vitseg_lab import losses

    g = _g(11)
    cls = [torch.randn(1, 3, 4, generator=g)]
    masks = [torch.randn(1, 3, 4, 4, generator=g)]
    sem = torch.tensor([[[0, 0, 1, 1]] * 4])
    base = losses.atm_loss(cls, masks, sem)
    monkeypatch.setattr(losses, "global_num_masks", lambda n, device=None, reduce=True: 4.0)
    halved = losses.atm_loss(cls, masks, sem)         # 2 present classes normalised by 4
    torch.testing.assert_close(halved["focal"], base["focal"] / 2)
    torch.testing.assert_close(halved["dice"], base["dice"] / 2)


def test_official_shrunk_structure():
    torch.manual_seed(0)
    cfg = _tiny_cfg(structure="shrunk", qd_index=2, drop_cls_token=True, official_init=True,
                    decoder_dropout=0.1, atm_attn_dropout=0.1)
    model = segvit.build(cfg, 3)
    assert isinstance(model.head, shrunk.ATMSingleHead) and not model.final_norm
    assert not any(isinstance(m, segvit.LayerTokens) for m in model.head.modules()), \
        "no input projection in the single head"
    assert len(model.head.layers) == 3
    # no final norm on the 1/32 path: a norm that would change everything changes nothing
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    ref = model(x)
    model.backbone.vit.norm = torch.nn.LayerNorm(24)
    torch.nn.init.constant_(model.backbone.vit.norm.weight, 5.0)
    again = model(x)
    torch.testing.assert_close(again.mask_logits[-1], ref.mask_logits[-1])
    model.final_norm = True
    assert not torch.allclose(model(x).mask_logits[-1], ref.mask_logits[-1])
    model.final_norm = False
    # 3 layers, each its own class logits and non-accumulated mask
    assert len(ref.class_logits) == len(ref.mask_logits) == 3
    seen = []
    hooks = [lay.register_forward_hook(lambda m, i, o: seen.append(o[1]))
             for lay in model.head.layers]
    out = model(x)
    for h in hooks:
        h.remove()
    for sim, mask in zip(seen, out.mask_logits):
        torch.testing.assert_close(mask, segvit.atm_mask_logits(sim, out.grid))
    assert not torch.allclose(out.mask_logits[2], sum(out.mask_logits))
    # all 3 are supervised: each layer's mask gets gradient from the loss
    model.train()
    out = model(x)
    for m in out.mask_logits:
        m.retain_grad()
    terms = losses_atm(out, torch.randint(0, 3, (2, 32, 32)))
    terms["loss"].backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in out.mask_logits)
    assert all(c.requires_grad for c in out.class_logits)


def losses_atm(out, sem):
    from vitseg_lab import losses

    return losses.atm_loss(out.class_logits, out.mask_logits, sem)


def test_flops_reproduce_the_paper_under_fvcore_rules():
    from vitseg_lab import flops

    rows = {r["model"]: r for r in flops.flops_table()}
    for name, r in rows.items():
        assert r["fvcore"] == r["paper"], (name, r)
        assert r["torch"] < r["fvcore"], "the einsum, upsampling and LayerNorm add cost"
    assert rows["SegViT ViT-L"]["inference"] == 9.22
    assert 0.39 < rows["SegViT-Shrunk ViT-L"]["saving"] < 0.43
