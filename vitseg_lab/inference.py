"""Sliding-window inference (mmsegmentation's "slide" test mode) for any model with ``predict``.

Semantic segmentation papers evaluate a ViT trained on square crops by scoring overlapping
crop-sized windows of a larger image and averaging the overlaps (SegViT, Zhang et al. 2022, and
most mmsegmentation configs: ADE20K at crop 640, stride 608 on the image resized to short side 640).

Shapes: B batch · K classes · H, W pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["resize_short", "slide_inference"]


@torch.no_grad()
def slide_inference(model: nn.Module, images: Tensor, *, crop: int, stride: int) -> Tensor:
    """Sliding-window inference (mmseg's "slide" mode): score windows, average the overlaps.

    images: (B, 3, H, W) -> (B, K, H, W) averaged ``model.predict`` scores. Windows are
    ``crop`` x ``crop`` every ``stride`` pixels, the last one flush with the border; a side
    smaller than ``crop`` is one window of that side (the ViT resamples its position embedding).
    """
    if not 0 < stride <= crop:
        raise ValueError(f"stride={stride} must be in 1..crop={crop}; the paper uses crop 640, "
                         "stride 608 on ADE20K.")
    B, _, H, W = images.shape
    scores, count = None, images.new_zeros(1, 1, H, W)
    for y in _window_starts(H, crop, stride):
        for x in _window_starts(W, crop, stride):
            y2, x2 = min(y + crop, H), min(x + crop, W)
            s = model.predict(images[:, :, y:y2, x:x2])
            if scores is None:
                scores = images.new_zeros(B, s.shape[1], H, W)
            scores[:, :, y:y2, x:x2] += s
            count[:, :, y:y2, x:x2] += 1
    return scores / count


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    n = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, size - crop), 0) for i in range(n)]


def resize_short(images: Tensor, short: int, long_max: int) -> Tensor:
    """Resize (B, 3, H, W) so the short side is ``short`` unless the long side would exceed
    ``long_max`` (bilinear): mmsegmentation's test-time ``Resize(keep_ratio=True)``."""
    H, W = images.shape[-2:]
    s = min(short / min(H, W), long_max / max(H, W))
    return F.interpolate(images, size=(round(H * s), round(W * s)), mode="bilinear",
                         align_corners=False)
