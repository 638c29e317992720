"""vitseg_lab.afa: every exercise against its naive loop (``_grader.ch04``) and, where the
released code has a different formulation, against that one too (PAR's conv-kernel neighbours,
the window built pair by pair, the per-image softmax over present classes); the model, the
schedule of the loss, image-level-only training, late binding of plugged exercises, configs,
checkpoints and the full-scale lines."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import vitseg_lab as vl
from vitseg_lab import afa, plug, unplug
from vitseg_lab._grader import ch04 as G


def _g(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- 4.1 CAM

def test_cam_shape_and_naive_loop():
    g = _g(0)
    f, w = torch.randn(2, 5, 3, 4, generator=g), torch.randn(3, 5, generator=g)
    cam = vl.expect_shape(afa.class_activation_maps(f, w, (6, 7)), "B K H W", B=2, K=3, H=6, W=7)
    torch.testing.assert_close(cam, G.naive_class_activation_maps(f, w, (6, 7)))
    assert cam.min() >= 0 and cam.max() < 1
    # every map reaches ~1 and 0 on its own
    torch.testing.assert_close(cam.amax(dim=(-2, -1)), torch.ones(2, 3), atol=1e-4, rtol=0)


def test_cam_all_negative_class_is_zero_and_gradients_flow():
    g = _g(1)
    f = torch.rand(2, 3, 2, 2, generator=g, requires_grad=True)
    w = torch.cat([torch.rand(1, 3, generator=g), -torch.rand(1, 3, generator=g) - 0.1])
    w.requires_grad_(True)
    cam = afa.class_activation_maps(f, w, (4, 4))
    assert torch.equal(cam[:, 1], torch.zeros(2, 4, 4))
    cam[:, 0].square().sum().backward()
    assert f.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- 4.2 pseudo labels

def test_pseudo_labels_naive_loop_and_dtype():
    g = _g(2)
    hi, lo = torch.rand(2, 4, 3, 5, generator=g), torch.rand(2, 4, 3, 5, generator=g)
    out = vl.expect_shape(afa.pseudo_labels(hi, lo), "B H W", B=2, H=3, W=5)
    assert out.dtype == torch.int64
    torch.testing.assert_close(out, G.naive_pseudo_labels(hi, lo))


def test_two_backgrounds_equal_the_threshold_rule():
    """With the constant backgrounds of add_background, the rule is: max CAM over present
    classes > 0.55 -> its class, in (0.35, 0.55] -> ignore, <= 0.35 -> background."""
    g = _g(3)
    cams = torch.rand(3, 4, 6, 7, generator=g, dtype=torch.float64)
    labels = (torch.rand(3, 4, generator=g) < 0.6).double()
    labels[0] = 0.0                                         # an image with no class at all
    out = afa.pseudo_labels(afa.add_background(cams, labels, 0.55),
                            afa.add_background(cams, labels, 0.35))
    valid = cams * labels[:, :, None, None]
    top, arg = valid.max(dim=1)
    want = torch.where(top > 0.55, arg + 1, torch.where(top > 0.35, 255, 0))
    torch.testing.assert_close(out, want)


def test_add_background_matches_softmax_over_present_classes():
    g = _g(4)
    cams, labels = torch.rand(2, 5, 3, 4, generator=g), torch.tensor([[1., 0, 1, 0, 0],
                                                                      [0., 0, 0, 0, 1]])
    out = vl.expect_shape(afa.add_background(cams, labels, 0.4), "B K H W", B=2, K=6, H=3, W=4)
    for b in range(2):   # the released code's loop: softmax over the valid keys only
        keys = [0] + [k + 1 for k in range(5) if labels[b, k]]
        full = torch.cat([torch.full((1, 3, 4), 0.4), cams[b]])
        want = torch.zeros(6, 3, 4)
        want[keys] = full[keys].softmax(0)
        torch.testing.assert_close(out[b], want)


# ---------------------------------------------------------------------------- 4.3 PAR

def _official_neighbors(x, dilations):
    """The released code's formulation: a one-hot 3x3 kernel per neighbour, dilated conv."""
    kernel = torch.zeros(8, 1, 3, 3, dtype=x.dtype)
    for n, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        kernel[n, 0, r, c] = 1
    b, c, h, w = x.shape
    outs = []
    for d in dilations:
        pad = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
        outs.append(F.conv2d(pad, kernel, dilation=d).view(b, c, 8, h, w))
    return torch.cat(outs, dim=2)


def test_dilated_neighbors_equal_the_conv_kernel_formulation():
    x = torch.randn(2, 3, 5, 7, generator=_g(5))
    nb = vl.expect_shape(afa.dilated_neighbors(x, (1, 3)), "B C N H W", B=2, C=3, N=16, H=5, W=7)
    torch.testing.assert_close(nb, _official_neighbors(x, (1, 3)))
    d = afa.neighbor_distances((1, 3))
    assert d.shape == (16,) and math.isclose(float(d[0]), math.sqrt(2), rel_tol=1e-6) and float(d[11]) == 3.0


def test_par_kernel_naive_loop_and_normalisation():
    img = torch.rand(2, 3, 5, 6, generator=_g(6), dtype=torch.float64)
    k = vl.expect_shape(afa.par_kernel(img, (1, 2)), "B N H W", B=2, N=16, H=5, W=6)
    assert k.dtype == torch.float64
    torch.testing.assert_close(k, G.naive_par_kernel(img, (1, 2)))
    torch.testing.assert_close(k.sum(1), torch.full((2, 5, 6), 1.01, dtype=torch.float64))


def test_par_kernel_prefers_same_colour_neighbours():
    img = torch.zeros(1, 3, 6, 6)
    img[..., :, 3:] = 1.0                          # left half black, right half white
    img = img + 0.01 * torch.rand(1, 3, 6, 6, generator=_g(7))
    k = afa.par_kernel(img, (1,))
    # pixel (2, 2) is black: its right neighbour (offset (0, 1), index 4) is white
    assert k[0, 4, 2, 2] < 0.01 < k[0, 3, 2, 2]


def test_par_literal_iterations():
    g = _g(8)
    img, masks = torch.rand(1, 3, 6, 5, generator=g), torch.rand(1, 2, 3, 3, generator=g)
    out = vl.expect_shape(afa.par(img, masks, (1, 2), num_iter=3), "B K H W", B=1, K=2, H=6,
                          W=5)
    m = F.interpolate(masks, size=(6, 5), mode="bilinear", align_corners=True)
    k = G.naive_par_kernel(img, (1, 2))
    offs = [(dy * d, dx * d) for d in (1, 2) for dy, dx in G._OFFS]
    for _ in range(3):
        new = torch.zeros_like(m)
        for y in range(6):
            for x in range(5):
                for n, (dy, dx) in enumerate(offs):
                    yy, xx = min(max(y + dy, 0), 5), min(max(x + dx, 0), 4)
                    new[0, :, y, x] += k[0, n, y, x] * m[0, :, yy, xx]
        m = new
    torch.testing.assert_close(out, m)


# ---------------------------------------------------------------------------- 4.4 affinity labels

def _official_window(h, w, radius):
    """The released ``get_mask_by_radius``, pair by pair."""
    L = h * w
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        r, c = divmod(i, w)
        for r2 in range(max(0, r - radius), min(h, r + radius + 1)):
            for c2 in range(max(0, c - radius), min(w, c + radius + 1)):
                mask[i, r2 * w + c2] = mask[r2 * w + c2, i] = True
    return mask


def test_window_mask_equals_the_released_loop():
    assert torch.equal(afa.window_mask(4, 6, 2), _official_window(4, 6, 2))
    assert afa.window_mask(3, 5, 8).all()


def test_affinity_labels_naive_loop():
    g = _g(9)
    lab = torch.randint(0, 3, (2, 4, 5), generator=g)
    lab[torch.rand(2, 4, 5, generator=g) < 0.2] = 255
    out = vl.expect_shape(afa.affinity_labels(lab, 2), "B L L", B=2, L=20)
    assert out.dtype == torch.int64
    torch.testing.assert_close(out, G.naive_affinity_labels(lab, 2))
    inside = afa.window_mask(4, 5, 2)
    assert (out[:, ~inside] == 255).all() and torch.equal(out, out.transpose(1, 2))


def test_affinity_labels_all_ignored():
    out = afa.affinity_labels(torch.full((1, 3, 4), 255), 8)
    assert (out == 255).all()


# ---------------------------------------------------------------------------- 4.5 attention

def test_attention_affinity_naive_loop_symmetry_and_gradients():
    g = _g(10)
    S = torch.randn(2, 3, 5, 5, generator=g, requires_grad=True)
    w = torch.randn(3, generator=g, requires_grad=True)
    b = torch.randn((), generator=g, requires_grad=True)
    A = vl.expect_shape(afa.attention_affinity(S, w, b), "B L L", B=2, L=5)
    torch.testing.assert_close(A, G.naive_attention_affinity(S.detach(), w.detach(), b.detach()))
    torch.testing.assert_close(A, A.transpose(1, 2))
    A.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (S, w, b))


# ---------------------------------------------------------------------------- 4.6 loss

def test_affinity_loss_naive_and_edge_cases():
    g = _g(11)
    A = torch.rand(2, 6, 6, generator=g, requires_grad=True)
    lab = torch.tensor([0, 1, 255])[torch.randint(0, 3, (2, 6, 6), generator=g)]
    loss = afa.affinity_loss(A, lab)
    assert loss.shape == ()
    torch.testing.assert_close(loss.detach(), G.naive_affinity_loss(A.detach(), lab))
    loss.backward()
    assert (A.grad[lab == 1] < 0).all() and (A.grad[lab == 0] > 0).all()
    assert (A.grad[lab == 255] == 0).all()
    A2 = torch.rand(1, 4, 4, requires_grad=True)
    empty = afa.affinity_loss(A2, torch.full((1, 4, 4), 255))          # all ignored
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(A2.grad).all()


# ---------------------------------------------------------------------------- 4.7 random walk

def test_random_walk_naive_loop_and_column_normalisation():
    g = _g(12)
    probs = torch.rand(2, 3, 3, 4, generator=g).softmax(1)
    a = torch.rand(2, 12, 12, generator=g)
    A = ((a + a.transpose(1, 2)) / 2).requires_grad_(True)
    mask = afa.window_mask(3, 4, 1)
    rw = vl.expect_shape(afa.random_walk(probs, A, mask), "B K h w", B=2, K=3, h=3, w=4)
    torch.testing.assert_close(rw, G.naive_random_walk(probs, A.detach(), mask))
    assert not rw.requires_grad                                  # A is detached
    # METHODS §2.5: the same as each target averaging its sources with row-normalised weights
    Aa = (A.detach() * mask) ** 2
    D = Aa.sum(1) + 0.1                                          # column sums (B, L)
    want = ((Aa.transpose(1, 2) / D[:, :, None]) @ probs.flatten(2).transpose(1, 2))
    torch.testing.assert_close(rw.flatten(2), want.transpose(1, 2))
    # ...and not P · D⁻¹A (rows normalised), even for a symmetric A
    rows = Aa / (Aa.sum(2, keepdim=True) + 0.1)
    assert (probs.flatten(2) @ rows - rw.flatten(2)).abs().max() > 1e-3


# ---------------------------------------------------------------------------- seg loss

def test_seg_loss_is_the_mean_of_background_and_foreground_halves():
    g = _g(13)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    lab = torch.randint(0, 4, (2, 3, 5), generator=g)
    lab[0, 0] = 255
    bg = F.cross_entropy(logits, lab.masked_fill(lab != 0, 255), ignore_index=255)
    fg = F.cross_entropy(logits, lab.masked_fill(lab == 0, 255), ignore_index=255)
    torch.testing.assert_close(afa.seg_loss(logits, lab), 0.5 * (bg + fg))
    assert torch.isfinite(afa.seg_loss(logits, torch.zeros_like(lab)))   # no foreground at all


# ---------------------------------------------------------------------------- model and training

@pytest.fixture(scope="module")
def smoke():
    cfg = afa.AFAConfig.smoke()
    train, val = afa.quick_data(cfg)
    torch.manual_seed(0)
    return cfg, train, val, afa.build(cfg, train.num_classes)


def test_forward_shapes(smoke):
    cfg, train, _, model = smoke
    batch = train.collate([train[i] for i in range(3)])
    out = model(batch["image"])
    K, h = train.num_classes, cfg.img_size // cfg.patch_size
    assert out.cls_logits.shape == (3, K - 1) and out.seg_logits.shape == (3, K, h, h)
    assert out.affinity.shape == (3, h * h, h * h)
    assert out.attn_logits.shape == (3, cfg.attn_blocks * cfg.num_heads, h * h, h * h)
    assert model.cfg is cfg


def test_loss_schedule_uses_image_labels_only(smoke):
    _, train, _, model = smoke
    batch = train.collate([train[i] for i in range(4)])
    batch = {"image": batch["image"], "labels": batch["labels"]}      # no masks at all
    model.train()
    model.step.zero_()
    seen = []
    for _ in range(3):                                          # cam_iters=1, rw_after=2
        terms = afa.loss_fn(model, batch)
        seen.append(sorted(terms))
        model.zero_grad()
        terms["loss"].backward()
        assert torch.isfinite(terms["loss"])
    assert seen[0] == ["cls", "loss"] and seen[1] == seen[2] == ["aff", "cls", "loss", "seg"]
    assert int(model.step) == 3
    # L_aff trains q and k of the last blocks (the attention is not detached)
    assert model.backbone.vit.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.attn_proj.weight.grad.abs().sum() > 0


def test_plugged_exercises_reach_the_model(smoke):
    cfg, train, _, model = smoke
    calls = []
    original = afa.random_walk

    @plug(afa, quiet=True)
    def random_walk(probs, affinity, mask, alpha=2.0):
        calls.append(probs.shape)
        return original(probs, affinity, mask, alpha)

    try:
        images = train.collate([train[i] for i in range(2)])
        preds = afa.stage_predictions(model.eval(), images["image"], images["labels"])
    finally:
        unplug(afa)
    assert calls and set(preds) == set(afa.STAGES)
    assert all(p.shape == (2, cfg.img_size, cfg.img_size) for p in preds.values())


def test_run_smoke_checkpoint_and_load(tmp_path):
    cfg = afa.AFAConfig.smoke()
    cfg = replace(cfg, train=replace(cfg.train, out_dir=str(tmp_path)))
    res = afa.run(cfg)
    assert res.skipped is None and set(res.metrics) >= {"mIoU", "cam_mIoU", "cam_par_mIoU",
                                                        "rw_mIoU", "rw_par_mIoU", "seg_mIoU"}
    assert "mIoU" in res.baseline and res.checkpoint
    loaded = afa.load(res.checkpoint)
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.cpu())
    assert int(loaded.step) == cfg.train.steps


def test_affinity_head_init_and_the_single_view_label_path(smoke, monkeypatch):
    """Quick scale's two departures, checked: the zero-initialised affinity head gives A = 0.5
    everywhere (the released kaiming init does not); with one view and no mirror, loss_fn's
    pseudo label uses the training forward's own CAM, equal to a separate no-grad pass."""
    cfg, train, _, model = smoke
    batch = train.collate([train[i] for i in range(3)])
    assert cfg.aff_init == "zero" and cfg.cam_scales == (1.0,) and not cfg.cam_flip
    fresh = afa.build(cfg, train.num_classes).eval()
    A = fresh(batch["image"], seg=False).affinity
    assert torch.equal(A, torch.full_like(A, 0.5))
    torch.manual_seed(0)
    kaiming = afa.build(replace(cfg, aff_init="kaiming"), train.num_classes).eval()
    assert kaiming(batch["image"], seg=False).affinity.std() > 0.01
    with pytest.raises(ValueError, match="aff_init"):
        afa.build(replace(cfg, aff_init="xavier"), train.num_classes)
    seen = {}
    real = afa.refined_labels

    def spy(images, cams, labels, cfg, valid=None):
        seen["cams"] = cams
        return real(images, cams, labels, cfg, valid)

    monkeypatch.setattr(afa, "refined_labels", spy)
    was_training = model.training
    model.eval()                                    # no dropout: the two passes must agree
    try:
        model.step.fill_(cfg.cam_iters)
        afa.loss_fn(model, {"image": batch["image"], "labels": batch["labels"]})
        ref, _, _ = afa.multi_scale_cams(model, batch["image"], (1.0,), flip=False)
    finally:
        model.train(was_training)
    torch.testing.assert_close(seen["cams"], ref)


def test_configs_and_full_scale_lines():
    full = afa.AFAConfig.for_scale("full")
    assert (full.aff_init, full.aff_weight, full.cam_flip, full.walk_scale) == (
        "kaiming", 0.1, True, None)                  # the released values
    assert full.crop == 512 and full.train.lr == 6e-5 and full.train.steps == 20_000
    assert full.par_dilations == (1, 2, 4, 8, 12, 24) and full.cam_scales == (1.0, 0.5, 1.5)
    assert (full.high_thre, full.low_thre, full.radius) == (0.55, 0.35, 8)
    with pytest.raises(ValueError):
        afa.AFAConfig.for_scale("huge")
    if not torch.cuda.is_available():
        msg = afa.full_scale_check(full)
        pieces = [line for line in msg.splitlines() if line.startswith("- ")]
        assert "CUDA" in pieces[0] and any("voc" in p for p in pieces)
        assert all("`" in line for line in pieces)                 # each piece names a command
        res = afa.run(full)
        assert res.skipped == msg and res.model is None


def test_non_square_images_through_every_stage(smoke):
    """A 48x64 image: a non-square token grid (h != w; 12x16 with the quick 4x4 patches) through
    the affinity, the window, the random walk (also on the 1.5x view's 18x24 grid), PAR and every
    evaluated stage; the walk's window is the released loop's on that grid."""
    cfg, _, _, model = smoke
    was_training = model.training
    model.eval()
    try:
        _check_non_square(cfg, model)
    finally:
        model.train(was_training)


def _check_non_square(cfg, model):
    g = _g(11)
    images = torch.rand(2, 3, 48, 64, generator=g)
    labels = torch.tensor([[1.0] + [0.0] * 8, [0.0, 1.0, 1.0] + [0.0] * 6])
    out = model(images, seg=False)
    h, w = 48 // cfg.patch_size, 64 // cfg.patch_size
    assert h != w and out.grid == (h, w) and out.affinity.shape == (2, h * w, h * w)
    assert torch.equal(afa.window_mask(h, w, 2), _official_window(h, w, 2))
    aff, grid = afa.walk_affinity(model, images, 1.5)
    n = grid[0] * grid[1]
    assert grid == (round(1.5 * h), round(1.5 * w)) and aff.shape == (2, n, n)
    cams, aff, grid = afa.multi_scale_cams(model, images, (1.0,))
    label = afa.propagated_labels(images, cams * labels[:, :, None, None], labels, aff, grid, cfg)
    assert label.shape == (2, 48, 64)
    preds = afa.stage_predictions(model, images, labels)
    assert all(p.shape == (2, 48, 64) for p in preds.values())
    present = torch.cat([torch.ones(2, 1), labels], 1)            # background + image labels
    for p in preds.values():
        if p is not preds["seg"]:
            assert all(bool(present[b, p[b].unique()].all()) for b in range(2))


def test_dense_crf_snaps_to_the_colour_edge():
    pytest.importorskip("pydensecrf.densecrf")
    img = torch.zeros(3, 20, 30)
    img[:, :, 15:] = 1.0
    probs = torch.full((2, 20, 30), 0.5)                        # undecided in the middle
    probs[0, :, :12], probs[1, :, :12] = 0.8, 0.2
    probs[0, :, 18:], probs[1, :, 18:] = 0.2, 0.8
    q = afa.dense_crf(img, probs)
    assert q.shape == (2, 20, 30) and torch.allclose(q.sum(0), torch.ones(20, 30), atol=1e-4)
    assert q.argmax(0)[:, :15].eq(0).all() and q.argmax(0)[:, 15:].eq(1).all()


def test_affinity_explorer_controls_run_the_learner_functions(smoke):
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    cfg, _, val, model = smoke
    calls = {"attention_affinity": 0, "affinity_labels": 0, "random_walk": 0}
    originals = {k: getattr(afa, k) for k in calls}

    def counted(name):
        @functools.wraps(originals[name])            # keeps the exercise's signature for plug
        def fn(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return fn

    was_training = model.training
    try:
        for name in calls:
            plug(afa, quiet=True)(counted(name))
        box = afa.affinity_explorer(model, val)
        h = w = cfg.img_size // cfg.patch_size
        st = box.state
        assert st["affinity_row"].shape == (h, w) and st["aff_label_row"].shape == (h, w)
        assert all(st[k].shape == (cfg.img_size, cfg.img_size)
                   for k in ("map_cam", "map_cam_par", "map_rw"))
        assert all(calls[k] > 0 for k in calls), calls
        assert set(st["aff_label_row"].unique().tolist()) <= {0.0, 1.0, float(afa.IGNORE)}
        scene, _klass = box.children[0].children
        row, col = box.children[1].children
        col.value = w - 1
        assert box.state["token"] == row.value * w + w - 1
        row.value = 0
        assert box.state["token"] == w - 1
        before = calls["random_walk"]
        scene.value = 1
        assert box.state["scene"] == 1 and calls["random_walk"] > before
    finally:
        unplug(afa)
        model.train(was_training)
