"""vitseg_lab.losses: focal and dice (exercises 3.5, 3.6) against literal per-pixel loops, and the
ATM criterion against a per-image, per-class loop; ignore-index edge cases; gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitseg_lab import losses
from vitseg_lab._grader import ch03 as G


def _case(seed, N=4, P=23, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, P, generator=g, dtype=dtype) * scale,
            (torch.rand(N, P, generator=g) < 0.3).to(dtype),
            torch.rand(N, P, generator=g) < 0.8)


# ---------------------------------------------------------------------------- focal and dice

@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.9, 1.5)])
def test_focal_matches_naive_loop(alpha, gamma):
    x, t, v = _case(0)
    got = losses.sigmoid_focal_loss(x, t, v, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(got, G.naive_sigmoid_focal_loss(x, t, v, alpha, gamma))
    assert got.shape == (4,)


def test_focal_gamma_zero_is_alpha_weighted_bce():
    x, t, _ = _case(1)
    v = torch.ones_like(t, dtype=torch.bool)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    want = ((0.25 * t + 0.75 * (1 - t)) * bce).mean(-1)
    torch.testing.assert_close(losses.sigmoid_focal_loss(x, t, v, gamma=0.0), want)


def test_dice_matches_naive_loop():
    x, t, v = _case(2, N=5, P=31)
    got = losses.dice_loss(x, t, v)
    torch.testing.assert_close(got, G.naive_dice_loss(x, t, v))
    assert got.shape == (5,) and bool(((got >= 0) & (got < 1)).all())


def test_masks_without_valid_pixels_cost_nothing():
    x, t, v = _case(3, N=3, P=8)
    v[1] = False
    assert losses.sigmoid_focal_loss(x, t, v)[1] == 0
    assert losses.dice_loss(x, t, v)[1] == 0


def test_ignored_pixels_do_not_change_focal_or_dice():
    x, t, v = _case(4, N=2, P=20)
    x2 = torch.where(v, x, x + 100.0)  # change only ignored pixels, wildly
    t2 = torch.where(v, t, 1 - t)
    for fn in (losses.sigmoid_focal_loss, losses.dice_loss):
        torch.testing.assert_close(fn(x, t, v), fn(x2, t2, v))


def test_large_logits_stay_finite_float32():
    x, t, v = _case(5, dtype=torch.float32, scale=200.0)
    for fn in (losses.sigmoid_focal_loss, losses.dice_loss):
        assert torch.isfinite(fn(x, t, v)).all()
    torch.testing.assert_close(losses.sigmoid_focal_loss(x, t, v),
                               G.naive_sigmoid_focal_loss(x, t, v).float(), atol=1e-4, rtol=1e-4)


def test_focal_and_dice_gradients_flow_only_through_valid_pixels():
    x, t, v = _case(6)
    x.requires_grad_(True)
    (losses.sigmoid_focal_loss(x, t, v).sum() + losses.dice_loss(x, t, v).sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~v] == 0).all() and (x.grad[v] != 0).any()


# ---------------------------------------------------------------------------- the ATM criterion

def test_atm_targets_bind_token_k_to_class_k():
    sem = torch.tensor([[[0, 2], [255, 2]], [[255, 255], [255, 255]]])  # image 2: all ignored
    present, cls, onehot = losses.atm_targets(sem, num_classes=4)
    assert present.tolist() == [[True, False, True, False], [False] * 4]
    assert cls.tolist() == [[0, 4, 2, 4], [4, 4, 4, 4]]
    assert onehot.shape == (2, 4, 2, 2)
    assert onehot[0, 2].tolist() == [[0, 1], [0, 1]] and onehot[:, :, 1, 0].sum() == 0
    assert onehot[1].sum() == 0


def test_atm_targets_rejects_ids_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        losses.atm_targets(torch.tensor([[[0, 7]]]), num_classes=4)


def _naive_atm_loss(class_logits, mask_logits, sem, ignore_in_masks="skip"):
    """Per stage, per image, per class, with the paper's weights: CE (no-object 0.1) + 20 focal +
    dice over present classes, normalised by the number of present classes."""
    B, K = class_logits[0].shape[:2]
    H, W = sem.shape[-2:]
    total = 0.0
    for cls, masks in zip(class_logits, mask_logits):
        num, den = 0.0, 0.0
        focal = dice = 0.0
        n_masks = 0
        for b in range(B):
            lab = sem[b]
            labelled = lab != 255
            for k in range(K):
                present = bool((lab[labelled] == k).any())
                target = k if present else K
                w = 1.0 if present else 0.1
                num += w * -torch.log_softmax(cls[b, k], 0)[target]
                den += w
                if not present:
                    continue
                n_masks += 1
                up = F.interpolate(masks[b, k][None, None], size=(H, W), mode="bilinear",
                                   align_corners=False).flatten()[None]
                t = (lab == k).flatten()[None].to(up.dtype)
                valid = labelled.flatten()[None] if ignore_in_masks == "skip" else \
                    torch.ones_like(t, dtype=torch.bool)
                focal += G.naive_sigmoid_focal_loss(up, t, valid)[0]
                dice += G.naive_dice_loss(up, t, valid)[0]
        n_masks = max(n_masks, 1)
        total += num / den + 20 * focal / n_masks + dice / n_masks
    return total


def _atm_inputs(seed, B=2, K=4, S=3, h=3, w=3, H=6, W=6):
    g = torch.Generator().manual_seed(seed)
    cls = [torch.randn(B, K, K + 1, generator=g, dtype=torch.float64) for _ in range(S)]
    masks = [torch.randn(B, K, h, w, generator=g, dtype=torch.float64) for _ in range(S)]
    sem = torch.randint(0, K, (B, H, W), generator=g)
    sem[sem == K - 1] = 1                         # class K-1 absent everywhere
    sem[0, 0, :] = 255                           # a row of ignore
    return cls, masks, sem


@pytest.mark.parametrize("ignore_in_masks", ["skip", "negative"])
def test_atm_loss_matches_naive_per_class_loop(ignore_in_masks):
    cls, masks, sem = _atm_inputs(0)
    got = losses.atm_loss(cls, masks, sem, ignore_in_masks=ignore_in_masks)
    want = _naive_atm_loss(cls, masks, sem, ignore_in_masks)
    torch.testing.assert_close(got["loss"], torch.as_tensor(want, dtype=torch.float64))


def test_atm_loss_ignore_choice_only_matters_where_there_is_ignore():
    cls, masks, sem = _atm_inputs(1)
    skip, neg = (losses.atm_loss(cls, masks, sem, ignore_in_masks=m)["loss"]
                 for m in ("skip", "negative"))
    assert not torch.isclose(skip, neg)
    sem = sem.clone()
    sem[sem == 255] = 0
    skip, neg = (losses.atm_loss(cls, masks, sem, ignore_in_masks=m)["loss"]
                 for m in ("skip", "negative"))
    torch.testing.assert_close(skip, neg)


def test_atm_loss_all_ignored_image_only_trains_no_object():
    cls, masks, _ = _atm_inputs(2, B=1, S=1)
    sem = torch.full((1, 6, 6), 255)
    out = losses.atm_loss(cls, masks, sem)
    assert out["focal"] == 0 and out["dice"] == 0
    want = F.cross_entropy(cls[0][0], torch.full((4,), 4))  # every token is "no object"
    torch.testing.assert_close(out["loss"], want)


def test_atm_loss_gradients_reach_every_stage():
    cls, masks, sem = _atm_inputs(3)
    for t in cls + masks:
        t.requires_grad_(True)
    losses.atm_loss(cls, masks, sem)["loss"].backward()
    for t in cls + masks:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_atm_loss_uses_plugged_exercises():
    from vitseg_lab import plug, unplug

    cls, masks, sem = _atm_inputs(4)
    base = losses.atm_loss(cls, masks, sem)

    @plug(losses, quiet=True)
    def dice_loss(logits, targets, valid):
        return torch.zeros(logits.shape[0], dtype=logits.dtype)

    try:
        out = losses.atm_loss(cls, masks, sem)
    finally:
        unplug(losses)
    assert out["dice"] == 0 and not torch.isclose(out["loss"], base["loss"])


def test_atm_loss_bad_inputs_say_what_to_do():
    cls, masks, sem = _atm_inputs(5)
    with pytest.raises(ValueError, match="stages"):
        losses.atm_loss(cls, masks[:2], sem)
    with pytest.raises(ValueError, match="K\\+1"):
        losses.atm_loss([c[..., :-1] for c in cls], masks, sem)
    with pytest.raises(ValueError, match="skip"):
        losses.atm_loss(cls, masks, sem, ignore_in_masks="drop")
    assert math.isfinite(float(losses.atm_loss(cls, masks, sem)["loss"]))
