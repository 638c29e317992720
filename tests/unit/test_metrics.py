"""Tests for vitseg_lab.metrics against per-pixel Python loops (no bincount, no matrix algebra)."""

from __future__ import annotations

import math

import pytest
import torch

from vitseg_lab.metrics import SegMeter, confusion_matrix, miou, pixel_accuracy

K, IGNORE = 5, 255


def _random_pair(shape=(2, 7, 9), k=K, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, shape, generator=g)
    target[torch.rand(shape, generator=g) < ignore_frac] = IGNORE
    pred = torch.randint(0, k, shape, generator=g)
    return pred, target


def _naive_conf(pred, target, k, ignore=IGNORE):
    conf = [[0] * k for _ in range(k)]
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t != ignore:
            conf[t][p] += 1
    return torch.tensor(conf)


def _naive_iou(pred, target, k, ignore=IGNORE):
    """IoU_c = |pred=c and target=c| / |pred=c or target=c| over labelled pixels, literally."""
    pairs = [(p, t) for p, t in zip(pred.flatten().tolist(), target.flatten().tolist())
             if t != ignore]
    ious = []
    for c in range(k):
        inter = sum(1 for p, t in pairs if p == c and t == c)
        union = sum(1 for p, t in pairs if p == c or t == c)
        ious.append(inter / union if union else math.nan)
    present = [v for v in ious if not math.isnan(v)]
    acc = sum(p == t for p, t in pairs) / len(pairs) if pairs else math.nan
    return ious, (sum(present) / len(present) if present else math.nan), acc


@pytest.mark.parametrize("seed, shape, k", [(0, (2, 7, 9), 5), (1, (3, 4, 6), 3), (2, (11,), 7)])
def test_confusion_matrix_matches_pixel_loop(seed, shape, k):
    pred, target = _random_pair(shape, k, seed)
    conf = confusion_matrix(pred, target, k)
    assert conf.shape == (k, k) and conf.dtype == torch.int64
    assert torch.equal(conf, _naive_conf(pred, target, k))
    assert conf.sum() == (target != IGNORE).sum()  # ignored pixels are skipped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_and_pixel_accuracy_match_pixel_loop(seed):
    pred, target = _random_pair(seed=seed)
    target[target == 3] = 1  # class 3 never in the target, still predicted: IoU 0, not NaN
    conf = confusion_matrix(pred, target, K)
    mean, per_class = miou(conf)
    ious, naive_mean, naive_acc = _naive_iou(pred, target, K)
    assert per_class.shape == (K,) and per_class[3] == 0.0
    torch.testing.assert_close(per_class, torch.tensor(ious, dtype=torch.float64))
    assert mean == pytest.approx(naive_mean)
    assert pixel_accuracy(conf) == pytest.approx(naive_acc)


def test_class_absent_from_target_and_pred_is_nan_and_left_out_of_the_mean():
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 3]])  # class 3 only under an ignored pixel
    mean, per_class = miou(confusion_matrix(pred, target, 4))
    assert math.isnan(per_class[3])
    torch.testing.assert_close(per_class[:3], torch.tensor([1 / 2, 2 / 3, 1.0], dtype=torch.float64))
    assert mean == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_perfect_prediction_is_one():
    _, target = _random_pair()
    pred = torch.where(target == IGNORE, torch.zeros_like(target), target)
    conf = confusion_matrix(pred, target, K)
    assert miou(conf)[0] == 1.0 and pixel_accuracy(conf) == 1.0


def test_all_ignored_gives_empty_matrix_and_nan():
    pred = torch.zeros(2, 3, 4, dtype=torch.long)
    conf = confusion_matrix(pred, torch.full((2, 3, 4), IGNORE), K)
    assert torch.equal(conf, torch.zeros(K, K, dtype=torch.int64))
    mean, per_class = miou(conf)
    assert math.isnan(mean) and per_class.isnan().all() and math.isnan(pixel_accuracy(conf))


def test_no_ignore_index_counts_every_pixel():
    pred, target = _random_pair(ignore_frac=0.0)
    assert confusion_matrix(pred, target, K, ignore_index=None).sum() == pred.numel()


def test_bad_inputs_are_one_clear_error():
    pred, target = _random_pair()
    with pytest.raises(ValueError, match=r"class id 7 outside \[0, 5\)"):
        confusion_matrix(torch.where(target == 2, 7, pred), target, K)
    with pytest.raises(ValueError, match="pred holds class id -1"):
        confusion_matrix(torch.full_like(pred, -1), torch.zeros_like(target), K)
    with pytest.raises(ValueError, match="target holds class id 9"):
        confusion_matrix(pred, torch.full_like(target, 9), K)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(pred[:1], target, K)
    with pytest.raises(ValueError, match="argmax"):
        confusion_matrix(pred.float(), target, K)
    with pytest.raises(ValueError, match=r"\(K, K\)"):
        miou(torch.zeros(3, 4))


def test_segmeter_accumulates_batches_and_takes_logits():
    meter = SegMeter(K)
    preds, targets = zip(*(_random_pair((2, 5, 6), seed=s) for s in range(3)))
    for i, (p, t) in enumerate(zip(preds, targets)):
        if i == 1:  # logits (B, K, H, W) whose argmax is p
            p = torch.nn.functional.one_hot(p, K).permute(0, 3, 1, 2).float() * 3.0
        meter.update(p, t)
    whole_p, whole_t = torch.cat(preds), torch.cat(targets)
    ious, naive_mean, naive_acc = _naive_iou(whole_p, whole_t, K)
    out = meter.compute()
    assert set(out) == {"mIoU", "pixel_acc", "iou"} and isinstance(out["iou"], list)
    assert out["mIoU"] == pytest.approx(naive_mean) and out["pixel_acc"] == pytest.approx(naive_acc)
    assert out["iou"] == pytest.approx(ious, nan_ok=True)
    meter.reset()
    assert meter.conf.sum() == 0 and math.isnan(meter.compute()["mIoU"])
    with pytest.raises(ValueError, match="3 channels"):
        meter.update(torch.randn(2, 3, 5, 6), targets[0])
