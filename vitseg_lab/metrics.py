"""Segmentation metrics from one confusion matrix: mean IoU and pixel accuracy.

Every metric here is a function of the (K, K) confusion matrix, accumulated over a whole data set
first: mIoU is *not* the mean of per-image IoUs (an image without a class would count it as 0 or
skip it, and small images would weigh as much as large ones). This is how ADE20K, VOC and
mmsegmentation report it.

Shapes: K classes; pred and target share any shape (B, H, W), (H, W)... of integer class ids;
``ignore_index`` (255 by default) marks unlabelled pixels in target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SegMeter", "confusion_matrix", "miou", "pixel_accuracy"]


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255
) -> Tensor:
    """Count (target, pred) pairs over all labelled pixels.

    Args:
        pred: (...) int, predicted class ids in [0, K).
        target: (...) int, same shape; pixels equal to ``ignore_index`` are skipped.
        num_classes: K.
        ignore_index: label of unlabelled pixels (None: every pixel counts).

    Returns:
        (K, K) int64 on pred's device: ``conf[t, p]`` = number of pixels of class t predicted p
        (rows = target, columns = prediction).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape; "
            "take pred = logits.argmax(1) after upsampling the logits to the label size."
        )
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"{name} must hold integer class ids but has dtype {t.dtype}; "
                "use logits.argmax(1) for predictions and .long() for labels."
            )
    k = num_classes
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long().to(pred.device)
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    # Only labelled pixels are checked: a prediction under an ignored pixel never counts.
    for name, t in (("pred", pred), ("target", target)):
        bad = (t < 0) | (t >= k)
        if bool(bad.any()):
            raise ValueError(
                f"{name} holds class id {int(t[bad][0])} outside [0, {k}) at a labelled pixel; "
                f"check num_classes={k} and ignore_index={ignore_index}."
            )
    return torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)


def miou(conf: Tensor) -> tuple[float, Tensor]:
    """Mean intersection-over-union from a confusion matrix.

    conf: (K, K), rows = target, columns = prediction
    -> (mean IoU over classes whose IoU is defined, per-class IoU (K,) float64 on CPU).

    IoU_c = TP / (TP + FP + FN); a class absent from both target and prediction has no IoU
    (NaN) and does not enter the mean. All classes absent: the mean is NaN.
    """
    conf = _square(conf)
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    per_class = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    defined = per_class[~per_class.isnan()]
    mean = defined.mean().item() if defined.numel() else math.nan
    return mean, per_class


def pixel_accuracy(conf: Tensor) -> float:
    """Fraction of labelled pixels predicted right: trace / sum of conf (K, K). NaN if empty."""
    conf = _square(conf)
    total = conf.sum().item()
    return conf.diagonal().sum().item() / total if total > 0 else math.nan


def _square(conf: Tensor) -> Tensor:
    if conf.dim() != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(
            f"conf must be a (K, K) confusion matrix, got shape {tuple(conf.shape)}; "
            "build it with confusion_matrix(pred, target, num_classes)."
        )
    return conf.detach().to("cpu", torch.float64)  # CPU: MPS has no float64


class SegMeter:
    """Accumulate one confusion matrix over many batches, then report mIoU and pixel accuracy.

    Example::

        meter = SegMeter(num_classes=K)
        for batch in loader:
            meter.update(model(batch["image"]), batch["mask"])   # logits (B, K, H, W) or ids
        meter.compute()   # {"mIoU": 0.71, "pixel_acc": 0.93, "iou": [0.9, 0.5, nan, ...]}
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: (B, H, W) int class ids, or logits (B, K, H, W); target: (B, H, W) int."""
        if pred.is_floating_point() and pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {pred.shape[1]} channels at dim 1 but the meter counts "
                    f"{self.num_classes} classes; pass class ids or (B, K, H, W) logits."
                )
            pred = pred.argmax(1)
        conf = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.conf += conf.cpu()

    def compute(self) -> dict:
        """-> {"mIoU": float, "pixel_acc": float, "iou": list of K floats (NaN = class absent)}."""
        mean, per_class = miou(self.conf)
        return {"mIoU": mean, "pixel_acc": pixel_accuracy(self.conf), "iou": per_class.tolist()}
