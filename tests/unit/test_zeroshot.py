"""vitseg_lab.zeroshot: every exercise against its naive loop (``_grader.ch06``) and a second
formulation (torch convs, hand-worked numbers), the frozen word-vector classifier (no gradient,
never changes), synchronised background, the torchvision-built detector end to end (losses,
gradients, output spaces, no detections), pycocotools figures on a hand-made detection set,
configs, the full-scale lines, checkpoints and late binding of plugged exercises."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import vitseg_lab as vl
from vitseg_lab import chapters, plug, unplug, zeroshot
from vitseg_lab._grader import ch06 as G


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _r(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------- 6.1 semantic scores

def test_semantic_scores_shape_and_naive_loop():
    g = _g(0)
    x, w, b, v = _r(g, 5, 11), _r(g, 7, 11), _r(g, 7), _r(g, 4, 7)
    out = vl.expect_shape(zeroshot.semantic_scores(x, w, b, v), "N K", N=5, K=4)
    torch.testing.assert_close(out, G.naive_semantic_scores(x, w, b, v))
    torch.testing.assert_close(out, F.linear(F.linear(x, w, b), v))


def test_semantic_scores_gradients_reach_the_encoder_not_the_vectors():
    g = _g(1)
    x = _r(g, 3, 6).requires_grad_()
    w, b = _r(g, 5, 6).requires_grad_(), _r(g, 5).requires_grad_()
    v = _r(g, 4, 5)                        # fixed class vectors: no requires_grad
    zeroshot.semantic_scores(x, w, b, v).logsumexp(-1).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, w, b))
    assert v.grad is None


def test_semantic_scores_no_rois():
    g = _g(2)
    out = zeroshot.semantic_scores(_r(g, 0, 8), _r(g, 5, 8), _r(g, 5), _r(g, 6, 5))
    assert out.shape == (0, 6)


# ---------------------------------------------------------------------------- 6.2 reconstruction

def test_reconstruction_loss_matches_weighted_mse_and_naive():
    g = _g(3)
    x, xh = _r(g, 3, 4, 5, 2, dtype=torch.float64), _r(g, 3, 4, 5, 2, dtype=torch.float64)
    out = zeroshot.reconstruction_loss(x, xh, 0.5)
    assert out.shape == () and out.dtype == torch.float64
    torch.testing.assert_close(out, 0.5 * F.mse_loss(x, xh))
    torch.testing.assert_close(out, G.naive_reconstruction_loss(x, xh, 0.5))


def test_reconstruction_loss_worked_example_and_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    xh = torch.tensor([[1.0, 0.0], [3.0, 6.0]], requires_grad=True)
    out = zeroshot.reconstruction_loss(x, xh, 0.5)
    assert math.isclose(out.item(), 0.5 * (4 + 4) / 4)          # 0.5 · mean(0, 4, 0, 4)
    out.backward()
    assert xh.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- 6.3 seen -> unseen

def test_seen_to_unseen_shape_and_naive_loop():
    g = _g(4)
    lg, vs, vu = _r(g, 5, 4) * 3, _r(g, 4, 7), _r(g, 3, 7)
    out = vl.expect_shape(zeroshot.seen_to_unseen(lg, vs, vu), "N U", N=5, U=3)
    torch.testing.assert_close(out, G.naive_seen_to_unseen(lg, vs, vu))


def test_seen_to_unseen_worked_example_and_a_class_no_seen_vector_resembles():
    # attributes (bg, red, blue, circle, square); seen: red circle, blue square
    vs = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 1, 0, 1]])
    vu = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 0, 0, 0]])  # red square, "?"
    logits = torch.tensor([[-30.0, 30.0, -30.0]])       # sure: red circle
    out = zeroshot.seen_to_unseen(logits, vs, vu)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    # a class whose vector shares nothing with any seen vector scores 0 for every RoI
    many = zeroshot.seen_to_unseen(_r(_g(5), 6, 3) * 4, vs, vu)
    assert many[:, 2].abs().max() == 0


def test_swapping_the_unseen_set_permutes_the_scores():
    g = _g(6)
    lg, vs, vu = _r(g, 4, 5), _r(g, 5, 6), _r(g, 4, 6)
    perm = torch.tensor([0, 3, 1, 2])                  # background stays first
    torch.testing.assert_close(zeroshot.seen_to_unseen(lg, vs, vu[perm]),
                               zeroshot.seen_to_unseen(lg, vs, vu)[:, perm])


def test_seen_to_unseen_large_logits_stay_finite_and_gradients_flow():
    g = _g(7)
    lg = (_r(g, 3, 4) * 500).requires_grad_()
    out = zeroshot.seen_to_unseen(lg, _r(g, 4, 5), _r(g, 2, 5))
    assert torch.isfinite(out).all()
    zeroshot.seen_to_unseen(lg / 500, _r(g, 4, 5), _r(g, 2, 5)).sum().backward()
    assert lg.grad is not None and torch.isfinite(lg.grad).all()


# ---------------------------------------------------------------------------- 6.4 vector conv

def test_vector_conv_is_a_1x1_conv_and_matches_the_loop():
    g = _g(8)
    px, v = _r(g, 2, 5, 3, 4), _r(g, 6, 5)
    out = vl.expect_shape(zeroshot.vector_conv(px, v), "R K h w", R=2, K=6, h=3, w=4)
    torch.testing.assert_close(out, F.conv2d(px, v[:, :, None, None]))
    torch.testing.assert_close(out, G.naive_vector_conv(px, v))
    assert zeroshot.vector_conv(_r(g, 0, 5, 3, 4), v).shape == (0, 6, 3, 4)


def test_frozen_vector_conv_gets_no_gradient_and_never_changes():
    g = _g(9)
    vec = _r(g, 4, 6)
    conv = zeroshot.FrozenVectorConv(vec)
    assert not conv.weight.requires_grad and conv.bias is None
    torch.testing.assert_close(conv.weight[:, :, 0, 0], vec)
    x = _r(g, 3, 6, 5, 5).requires_grad_()
    conv(x).square().sum().backward()
    assert conv.weight.grad is None and x.grad.abs().sum() > 0
    opt = torch.optim.SGD([x, *conv.parameters()], lr=1.0)
    opt.step()
    torch.testing.assert_close(conv.weight[:, :, 0, 0], vec)


# ---------------------------------------------------------------------------- 6.5 unseen masks

def test_unseen_mask_logits_are_two_1x1_convs_without_a_nonlinearity():
    g = _g(10)
    lg, vs, vu = _r(g, 2, 4, 3, 5), _r(g, 4, 6), _r(g, 3, 6)
    out = vl.expect_shape(zeroshot.unseen_mask_logits(lg, vs, vu), "R U h w", R=2, U=3, h=3, w=5)
    two = F.conv2d(F.conv2d(lg, vs.T[:, :, None, None]), vu[:, :, None, None])
    torch.testing.assert_close(out, two)
    torch.testing.assert_close(out, G.naive_unseen_mask_logits(lg, vs, vu))


# ---------------------------------------------------------------------------- 6.6 background

def test_background_vector_is_the_mean_of_the_interleaved_background_rows():
    w = torch.arange(12.0).reshape(6, 2)                 # A = 3: rows 0, 2, 4 are background
    torch.testing.assert_close(zeroshot.background_vector(w), torch.tensor([4.0, 5.0]))
    g = _g(11)
    w = _r(g, 10, 7, dtype=torch.float64)
    torch.testing.assert_close(zeroshot.background_vector(w), G.naive_background_vector(w))


def test_ba_rpn_starts_from_the_background_vector_and_objectness_is_fg_minus_bg():
    bg = torch.tensor([0.0, 0.0, 1.0])
    head = zeroshot.BackgroundAwareRPNHead(8, 3, 3, bg)
    torch.testing.assert_close(head.background(), bg)
    f = _r(_g(12), 2, 8, 5, 4)
    logits, deltas = head([f])
    assert logits[0].shape == (2, 3, 5, 4) and deltas[0].shape == (2, 12, 5, 4)
    fb = head.vec_fb(head.semantic(head.conv(f))).view(2, 3, 2, 5, 4)
    # two-way softmax CE == BCE on the difference
    target = torch.randint(0, 2, (2, 3, 5, 4), generator=_g(13))
    ce = F.cross_entropy(fb.permute(0, 1, 3, 4, 2).reshape(-1, 2), target.reshape(-1))
    bce = F.binary_cross_entropy_with_logits(logits[0].reshape(-1), target.reshape(-1).float())
    torch.testing.assert_close(ce, bce)


# ---------------------------------------------------------------------------- 6.7 harmonic mean

def test_harmonic_mean_values_and_zeros():
    s = torch.tensor([[0.5, 0.0, 0.2], [1.0, 0.0, 30.0]])
    u = torch.tensor([[0.5, 0.0, 0.0], [0.25, 0.4, 10.0]])
    out = zeroshot.harmonic_mean(s, u)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0, 0.0], [0.4, 0.0, 15.0]]))
    torch.testing.assert_close(out, G.naive_harmonic_mean(s, u))


# ---------------------------------------------------------------------------- the detector

@pytest.fixture(scope="module")
def smoke():
    torch.manual_seed(0)
    cfg = zeroshot.ZSIConfig.smoke()
    train, val = zeroshot.quick_data(cfg)
    model = zeroshot.build(cfg, train.num_classes)
    return cfg, train, val, model


def test_quick_data_holds_unseen_classes_out_of_training(smoke):
    _, train, val, _ = smoke
    assert train.unseen_class_ids == val.unseen_class_ids and len(train.unseen_class_ids) == 3
    for i in range(len(train)):
        assert not set(train[i]["instance_labels"].tolist()) & set(train.unseen_class_ids)
    assert any(set(val[i]["instance_labels"].tolist()) & set(val.unseen_class_ids)
               for i in range(len(val)))


def test_losses_gradients_and_frozen_vectors_through_training_steps(smoke):
    cfg, train, _, _ = smoke
    torch.manual_seed(1)
    model = zeroshot.build(cfg, train.num_classes).train()
    heads = model.detector.roi_heads
    box_vec = heads.box_predictor.vectors.detach().clone()
    mask_w = heads.mask_predictor.conv_vec.weight.detach().clone()
    assert not heads.box_predictor.vectors.requires_grad
    assert not heads.mask_predictor.conv_vec.weight.requires_grad
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = train.collate([train[i] for i in range(4)])
    for _ in range(2):
        terms = zeroshot.loss_fn(model, batch)
        assert {"classifier", "box_reg", "mask", "objectness", "rpn_box_reg", "recon_box",
                "recon_mask"} <= set(terms)
        assert torch.isfinite(terms["loss"])
        opt.zero_grad()
        terms["loss"].backward()
        assert heads.box_predictor.vectors.grad is None
        assert heads.mask_predictor.conv_vec.weight.grad is None
        assert heads.box_predictor.encoder.weight.grad.abs().sum() > 0
        assert model.detector.rpn.head.vec_fb.weight.grad.abs().sum() > 0
        assert model.detector.backbone.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        opt.step()
    # the class rows never change; row 0 is the synchronised background
    torch.testing.assert_close(heads.box_predictor.vectors[1:], box_vec[1:])
    torch.testing.assert_close(heads.mask_predictor.conv_vec.weight[1:], mask_w[1:])
    model(batch["image"][:1], zeroshot.targets_of(batch)[:1])  # forward syncs the background
    bg = zeroshot.background_vector(model.detector.rpn.head.vec_fb.weight[:, :, 0, 0])
    if cfg.normalize_vectors:
        bg = F.normalize(bg, dim=0)
    torch.testing.assert_close(heads.box_predictor.vectors[0], bg)
    torch.testing.assert_close(heads.mask_predictor.conv_vec.weight[0, :, 0, 0], bg)
    assert not torch.allclose(heads.box_predictor.vectors[0], box_vec[0])   # it was learned


def test_sync_bg_mask_false_leaves_the_mask_head_background_alone(smoke):
    cfg, train, _, _ = smoke
    model = zeroshot.build(replace(cfg, sync_bg_mask=False), train.num_classes)
    with torch.no_grad():
        model.detector.rpn.head.vec_fb.weight.add_(1.0)
    before = model.detector.roi_heads.mask_predictor.conv_vec.weight.clone()
    model.sync_background()
    torch.testing.assert_close(model.detector.roi_heads.mask_predictor.conv_vec.weight, before)


def test_training_on_an_unseen_class_is_refused(smoke):
    _, _, val, model = smoke
    model.train()
    i = next(i for i in range(len(val))
             if set(val[i]["instance_labels"].tolist()) & set(val.unseen_class_ids))
    batch = val.collate([val[i]])
    with pytest.raises(ValueError, match="not seen classes"):
        model(batch["image"], zeroshot.targets_of(batch))


@pytest.mark.parametrize("mode", ["seen", "unseen", "gzsi"])
def test_eval_outputs_name_data_set_classes_of_the_chosen_space(smoke, mode):
    _, _, val, model = smoke
    model.eval()
    unseen = val.unseen_class_ids
    model.set_output(mode, unseen if mode != "seen" else ())
    with torch.no_grad():
        dets = model(torch.stack([val[i]["image"] for i in range(2)]))
    model.set_output("seen")
    allowed = {"seen": set(val.seen_class_ids), "unseen": set(unseen),
               "gzsi": set(val.seen_class_ids) | set(unseen)}[mode]
    for d in dets:
        n = len(d["boxes"])
        assert d["scores"].shape == (n,) and d["masks"].shape == (n, 1, 64, 64)
        assert set(d["labels"].tolist()) <= allowed


def test_no_detections_is_handled_end_to_end(smoke):
    _, _, val, model = smoke
    heads = model.detector.roi_heads
    old = heads.score_thresh
    heads.score_thresh = 2.0                        # nothing passes
    try:
        loader = torch.utils.data.DataLoader(val, 4, collate_fn=val.collate)
        out = zeroshot.evaluate_zsi(model, loader, val.unseen_class_ids)
    finally:
        heads.score_thresh = old
    assert out["unseen_mask_ap50"] == 0.0 and out["unseen_box_recall50"] == 0.0
    assert out["gzsi_hm_mask_ap50"] == 0.0


def test_scores_on_boxes_matches_the_exercises(smoke):
    _, _, val, model = smoke
    item = val[0]
    boxes = item["boxes"].float().clone()
    boxes[:, 2:] += 1
    res = model.scores_on_boxes(item["image"], boxes, val.unseen_class_ids)
    vec = model.detector.roi_heads.box_predictor.vectors
    torch.testing.assert_close(res["unseen_scores"],
                               G.naive_seen_to_unseen(res["seen_logits"], vec,
                                                      model.vectors_of(val.unseen_class_ids)),
                               atol=1e-5, rtol=1e-4)
    assert res["masks"].shape[:2] == (len(boxes), 1 + len(val.unseen_class_ids))


def test_code_behaviour_switch_applies_only_the_last_mask_conv():
    heads = zeroshot._masked_heads(4, 8, code_behaviour=True)
    x = _r(_g(14), 2, 8, 5, 5)
    ref = heads(x)
    with torch.no_grad():
        heads.convs[0][0].weight.add_(1.0)
    torch.testing.assert_close(heads(x), ref)
    paper = zeroshot._masked_heads(4, 8, code_behaviour=False)
    ref = paper(x)
    with torch.no_grad():
        paper[0][0].weight.add_(1.0)
    assert not torch.allclose(paper(x), ref)


def test_plugged_exercise_reaches_the_model(smoke):
    _, train, _, model = smoke
    calls = []

    @plug(zeroshot, quiet=True)
    def semantic_scores(x, weight, bias, vectors):
        calls.append(x.shape)
        return torch.zeros(x.shape[0], vectors.shape[0])

    try:
        model.train()
        batch = train.collate([train[i] for i in range(2)])
        terms = zeroshot.loss_fn(model, batch)
        assert calls and math.isclose(terms["classifier"].item(), math.log(1 + 6), rel_tol=1e-5)
    finally:
        unplug(zeroshot, "semantic_scores")


# ---------------------------------------------------------------------------- pycocotools

def test_coco_eval_on_a_hand_made_detection_set():
    # class 1: two GT boxes; detections: a false positive (0.9), then a box of IoU 0.55 with
    # GT A (0.8); GT B is missed. Sorted: FP, TP -> precision 0, 1/2 at recall 0, 1/2.
    gts = [{"image_id": 0, "category_id": 1, "bbox": [0, 0, 10, 10]},
           {"image_id": 1, "category_id": 1, "bbox": [20, 20, 8, 8]}]
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9},
            {"image_id": 0, "category_id": 1, "bbox": [0, 0, 10, 5.5], "score": 0.8}]
    r = zeroshot.coco_eval(gts, dets, [1], "bbox", [0, 1])
    # IoU 0.55 counts at 0.4 and 0.5, not at 0.6. AP (101 recall points): the interpolated
    # precision is 1/2 up to recall 1/2 (51 points), 0 after.
    ap = 51 * 0.5 / 101
    assert r["recall100"] == pytest.approx([0.5, 0.5, 0.0])
    assert r["map"] == pytest.approx([ap, ap, 0.0])


def test_coco_eval_without_detections_is_zero():
    gts = [{"image_id": 0, "category_id": 2, "bbox": [1, 1, 4, 4]}]
    assert zeroshot.coco_eval(gts, [], [2], "bbox", [0]) == {"recall100": [0.0] * 3,
                                                             "map": [0.0] * 3}


# ---------------------------------------------------------------------------- configs, full scale

def test_configs():
    q, s = zeroshot.ZSIConfig.quick(), zeroshot.ZSIConfig.smoke()
    assert q.num_threads == 1 and q.target_metric == s.target_metric and s.train.steps <= 3
    f = zeroshot.ZSIConfig.full()
    assert f.dataset == "coco" and f.recon_weight == 0.5 and f.train.warmup_steps == 500
    assert zeroshot.ZSIConfig.full("65_15").train.warmup_steps == 7000
    assert zeroshot.ZSIConfig.for_scale("smoke") == s
    with pytest.raises(ValueError, match="unknown scale"):
        zeroshot.ZSIConfig.for_scale("huge")


def test_full_scale_check_names_every_missing_piece_with_a_command(monkeypatch, tmp_path):
    monkeypatch.setenv("VITSEG_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    msg = zeroshot.full_scale_check()
    if msg is None:
        pytest.skip("this machine has everything for full scale")
    lines = msg.splitlines()
    assert len(lines) >= 3 and all("`" in ln for ln in lines[1:])
    assert any("coco-zsi" in ln for ln in lines) and any("CUDA" in ln or "weights" in ln
                                                        for ln in lines)


def test_run_at_full_scale_without_pieces_is_skipped(monkeypatch, tmp_path):
    monkeypatch.setenv("VITSEG_DATA", str(tmp_path))
    res = zeroshot.run(zeroshot.ZSIConfig.full())
    if res.skipped is None:
        pytest.skip("full scale is available here")
    assert res.model is None and "coco-zsi" in res.skipped


def test_checkpoint_round_trip(tmp_path):
    from vitseg_lab.train import fit

    cfg = zeroshot.ZSIConfig.smoke()
    cfg = replace(cfg, train=replace(cfg.train, out_dir=str(tmp_path)))
    train, _ = zeroshot.quick_data(cfg)
    torch.manual_seed(0)
    model = zeroshot.build(cfg, train.num_classes)
    fit(model, train, cfg.train, zeroshot.loss_fn, collate_fn=train.collate,
        meta=chapters.checkpoint_meta("zeroshot", cfg, train.num_classes))
    back = zeroshot.load(str(tmp_path / "last.pt"))
    assert back.cfg == cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(a.cpu(), b, msg=k)


def test_coco_pipeline_on_the_official_layout_fixture(monkeypatch, tmp_path):
    """The full-scale data path on tiny fakes in the official layout: labels shifted past the
    background, exact boxes back in the targets, word vectors with the background first, one
    training step and a pycocotools evaluation."""
    from vitseg_lab.data.fixtures import make_coco_zsi

    make_coco_zsi(tmp_path, "48_17")
    monkeypatch.setenv("VITSEG_DATA", str(tmp_path))
    cfg = replace(zeroshot.ZSIConfig.smoke(), dataset="coco", split="48_17", unseen=())
    train, val = zeroshot._coco_data(cfg)
    assert train.num_classes == 1 + 48 + 17 and train.seen_class_ids == list(range(1, 49))
    vec = train.class_vectors()
    assert vec.shape == (66, 300) and vec[0, 0] == 0.0 and vec[1, 0] == 1.0  # column c holds c + ..
    item = train.ds[0]
    mine = zeroshot.COCOInstances(train.ds)[0]             # no flip: boxes come back exactly
    assert mine["instance_labels"].tolist() == (item["instance_labels"] + 1).tolist()
    t = zeroshot.targets_of(train.collate([mine]))[0]
    torch.testing.assert_close(t["boxes"], item["boxes"].as_subclass(torch.Tensor).float())
    W = item["image"].shape[-1]
    flipped = zeroshot.COCOInstances(train.ds, flip=True)
    torch.manual_seed(3)
    for _ in range(4):                                      # a flip mirrors the boxes
        f = zeroshot.targets_of(train.collate([flipped[0]]))[0]["boxes"]
        assert torch.allclose(f, t["boxes"]) or torch.allclose(
            f, torch.stack([W - t["boxes"][:, 2], t["boxes"][:, 1], W - t["boxes"][:, 0],
                            t["boxes"][:, 3]], 1))
    torch.manual_seed(0)
    model = zeroshot.build(cfg, train.num_classes, vec, train.seen_class_ids)
    terms = zeroshot.loss_fn(model, train.collate([train[i] for i in range(len(train))]))
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    loader = torch.utils.data.DataLoader(val, 2, collate_fn=val.collate)
    out = zeroshot.evaluate_zsi(model, loader, val.unseen_class_ids)
    assert 0.0 <= out["unseen_mask_ap50"] <= 1.0 and "gzsi_hm_box_ap50" in out
