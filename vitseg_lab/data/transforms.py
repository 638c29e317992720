"""Each paper's data recipe as a torchvision v2 transform, applied jointly to image, masks, boxes.

The loaders hand a transform the sample dict with a ``uint8`` ``tv_tensors.Image``,
``tv_tensors.Mask`` label maps (255 = ignore) and ``tv_tensors.BoundingBoxes``; torchvision moves
all of them together (masks with nearest-neighbour resizing). Recipes keep the image ``uint8``;
the loader turns it into ``float32`` in [0, 1] afterwards. Mean/std normalisation belongs to the
model: :data:`NORMALIZATION` records each paper's values.

Recipes (full scale, as in the official configs):

- :func:`segvit_train_transform`: mmseg's ADE20K pipeline: random resize of scale ``(2048, crop)``
  with ratio 0.5-2.0 (keep aspect), random crop with ``cat_max_ratio=0.75``, flip, photometric
  distortion, pad to the crop with 0 / 255 (METHODS §1.4).
- :func:`afa_train_transform`: AFA's VOC pipeline: random rescale 0.5-2.0, flip, random crop 320
  with the image placed at a random offset in a zero/255-padded canvas (AFA's ``random_crop``;
  the VOC loader's ``valid`` map is its ``img_box``). Colour jitter is off in AFA's released code.
- :func:`restr_transform`: ReSTR's 480x480 input. No flip: expressions say "left"/"right".
- :func:`zsi_train_transform`: mmdet 1.x's Mask R-CNN pipeline: keep-ratio resize to
  (1333, 800), flip 0.5.
- :func:`eval_transform`: identity, or a keep-ratio resize for testing.

Randomness comes from ``torch``'s generator, so ``torch.manual_seed`` (and DataLoader worker
seeding) make a run repeatable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2 import query_size

from .common import IGNORE_INDEX

__all__ = [
    "NORMALIZATION",
    "CatMaxRatioCrop",
    "KeepRatioResize",
    "MMSegRandomResize",
    "PadToSize",
    "PhotoMetricDistortion",
    "RandomPadCrop",
    "RandomScale",
    "afa_train_transform",
    "eval_transform",
    "restr_transform",
    "segvit_train_transform",
    "zsi_train_transform",
]

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# (mean, std) in [0, 1] units, for v2.Normalize on the loaders' float images.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "segvit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # mean = std = 127.5 (METHODS §1.4)
    "afa": _IMAGENET,  # 123.675/116.28/103.53 and 58.395/57.12/57.375 (AFA normalize_img)
    "zsi": _IMAGENET,  # the same numbers in ZSI's img_norm_cfg
}


def _fill() -> dict[Any, int]:
    return {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX, "others": 0}


def _rand_uniform(lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand(()).item())


def _rand_int(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (both ends included)."""
    return int(torch.randint(lo, hi + 1, ()).item())


def _keep_ratio_size(h: int, w: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv's ``imrescale``: the largest size whose long side <= max(scale), short <= min(scale)."""
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(h, w), short_max / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


class _Resize(v2.Transform):
    """Resize every image/mask/box to a size chosen once per call from the input size."""

    def _size(self, h: int, w: int) -> tuple[int, int]:
        raise NotImplementedError

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        nh, nw = self._size(h, w)
        return {"size": [max(1, nh), max(1, nw)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class MMSegRandomResize(_Resize):
    """mmseg ``Resize(img_scale=scale, ratio_range=..., keep_ratio=True)``.

    A ratio r is drawn from ``ratio_range``; the image is rescaled, keeping its aspect, to the
    largest size with long side <= r * max(scale) and short side <= r * min(scale).
    """

    def __init__(
        self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0)
    ):
        super().__init__()
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def _size(self, h: int, w: int) -> tuple[int, int]:
        r = _rand_uniform(*self.ratio_range)
        return _keep_ratio_size(h, w, (int(self.scale[0] * r), int(self.scale[1] * r)))


class KeepRatioResize(_Resize):
    """Deterministic keep-aspect resize into ``scale`` (mmdet/mmseg ``keep_ratio=True``)."""

    def __init__(self, scale: Sequence[int] = (1333, 800)):
        super().__init__()
        self.scale = tuple(scale)

    def _size(self, h: int, w: int) -> tuple[int, int]:
        return _keep_ratio_size(h, w, self.scale)


class RandomScale(_Resize):
    """AFA's ``random_scaling``: both sides times r ~ U(ratio_range), truncated to ints."""

    def __init__(self, ratio_range: Sequence[float] = (0.5, 2.0)):
        super().__init__()
        self.ratio_range = tuple(ratio_range)

    def _size(self, h: int, w: int) -> tuple[int, int]:
        r = _rand_uniform(*self.ratio_range)
        return int(r * h), int(r * w)


def _label_map(flat_inputs: list[Any]) -> torch.Tensor | None:
    """The sample's semantic label map: the first 2-D ``tv_tensors.Mask`` (loaders put it first)."""
    for x in flat_inputs:
        if isinstance(x, tv_tensors.Mask) and x.ndim == 2:
            return x.as_subclass(torch.Tensor)
    return None


def _cat_ratio_ok(label: torch.Tensor | None, ratio: float | None, ignore_index: int) -> bool:
    """mmseg's test: more than one class in the crop and none above ``ratio`` of its pixels."""
    if label is None or ratio is None or ratio >= 1.0:
        return True
    vals, cnt = torch.unique(label, return_counts=True)
    cnt = cnt[vals != ignore_index]
    return len(cnt) > 1 and (cnt.max().item() / cnt.sum().item()) < ratio


class CatMaxRatioCrop(v2.Transform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``: a crop inside the image (no padding).

    Up to ``tries`` random windows of ``size`` (clipped to the image) are drawn; the first whose
    label map has more than one class and no class above ``cat_max_ratio`` of the non-ignored
    pixels is kept (else the last one). Pad afterwards with :class:`PadToSize`.
    """

    def __init__(self, size: int | Sequence[int], cat_max_ratio: float | None = 0.75,
                 ignore_index: int = IGNORE_INDEX, tries: int = 10):
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.cat_max_ratio, self.ignore_index, self.tries = cat_max_ratio, ignore_index, tries

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        label = _label_map(flat_inputs)
        for _ in range(max(1, self.tries)):
            top, left = _rand_int(0, h - ch), _rand_int(0, w - cw)
            win = None if label is None else label[top:top + ch, left:left + cw]
            if _cat_ratio_ok(win, self.cat_max_ratio, self.ignore_index):
                break
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class PadToSize(v2.Transform):
    """Pad bottom/right up to ``size`` (mmseg ``Pad``): image with 0, masks with 255 (ignore)."""

    def __init__(self, size: int | Sequence[int], fill: dict | None = None):
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.fill = fill or _fill()

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - w), max(0, self.size[0] - h)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.fill.get(type(inpt), self.fill.get("others", 0))
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


class RandomPadCrop(v2.Transform):
    """AFA's ``random_crop``: place the image at a random offset in a canvas of at least ``size``
    (image 0, masks 255), then take a random ``size`` window (optionally with ``cat_max_ratio``).
    """

    def __init__(self, size: int, cat_max_ratio: float | None = None,
                 ignore_index: int = IGNORE_INDEX, tries: int = 10):
        super().__init__()
        self.size, self.cat_max_ratio = int(size), cat_max_ratio
        self.ignore_index, self.tries = ignore_index, tries

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        H, W = max(self.size, h), max(self.size, w)
        pad_top, pad_left = _rand_int(0, H - h), _rand_int(0, W - w)
        label = _label_map(flat_inputs)
        if label is not None and self.cat_max_ratio is not None:
            canvas = torch.full((H, W), self.ignore_index, dtype=label.dtype)
            canvas[pad_top:pad_top + h, pad_left:pad_left + w] = label
        for _ in range(max(1, self.tries)):
            top, left = _rand_int(0, H - self.size), _rand_int(0, W - self.size)
            if label is None or self.cat_max_ratio is None:
                break
            win = canvas[top:top + self.size, left:left + self.size]
            if _cat_ratio_ok(win, self.cat_max_ratio, self.ignore_index):
                break
        padding = [pad_left, pad_top, W - w - pad_left, H - h - pad_top]
        return {"padding": padding, "top": top, "left": left}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = _fill().get(type(inpt), 0)
        if any(params["padding"]):
            inpt = self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)
        return self._call_kernel(F.crop, inpt, params["top"], params["left"], self.size, self.size)


class PhotoMetricDistortion(v2.Transform):
    """mmseg's ``PhotoMetricDistortion`` on the uint8 image (masks and boxes pass through).

    Each step happens with probability 1/2, in mmseg's order: brightness ``+U(-32, 32)``;
    contrast ``*U(0.5, 1.5)`` (before or after the colour steps, at random); saturation: HSV
    ``S *= U(0.5, 1.5)`` (clipped at 1); hue: ``H += randint(-18, 18)`` on OpenCV's 0..180 circle.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)
        self.hue_delta = hue_delta

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        def coin() -> bool:
            return bool(torch.randint(0, 2, ()).item())

        d = self.brightness_delta
        return {
            "brightness": _rand_uniform(-d, d) if coin() else None,
            "contrast_first": coin(),
            "contrast": _rand_uniform(*self.contrast_range) if coin() else None,
            "saturation": _rand_uniform(*self.saturation_range) if coin() else None,
            # mmseg draws np.random.randint(-delta, delta): the upper end is excluded
            "hue": _rand_int(-self.hue_delta, self.hue_delta - 1) if coin() else None,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        img = inpt.as_subclass(torch.Tensor)
        was_uint8 = img.dtype == torch.uint8
        x = img.float() if was_uint8 else img.float() * 255.0
        if params["brightness"] is not None:
            x = (x + params["brightness"]).clamp_(0, 255)
        if params["contrast_first"] and params["contrast"] is not None:
            x = (x * params["contrast"]).clamp_(0, 255)
        if params["saturation"] is not None:
            v = x.amax(dim=-3, keepdim=True)
            s = (v - x.amin(dim=-3, keepdim=True)) / v.clamp_min(1e-6)
            k = torch.minimum(torch.full_like(s, params["saturation"]), 1.0 / s.clamp_min(1e-6))
            x = (v - (v - x) * k).clamp_(0, 255)
        if params["hue"] is not None:
            x = F.adjust_hue(x / 255.0, params["hue"] / 180.0) * 255.0
        if not params["contrast_first"] and params["contrast"] is not None:
            x = (x * params["contrast"]).clamp_(0, 255)
        out = x.round_().to(torch.uint8) if was_uint8 else x / 255.0
        return tv_tensors.wrap(out, like=inpt)


# Recipes -----------------------------------------------------------------------------------------
def segvit_train_transform(
    crop: int = 640,
    scale: Sequence[int] | None = None,
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
) -> v2.Compose:
    """SegViT's training pipeline (mmseg ADE20K / COCO-Stuff configs).

    Args:
        crop: 640 for ADE20K (ViT-L), 512 for COCO-Stuff-10K.
        scale: the resize scale; default ``(2048, crop)`` as in the configs.
    """
    steps: list[Any] = [
        MMSegRandomResize(scale or (2048, crop), ratio_range),
        CatMaxRatioCrop(crop, cat_max_ratio),
        v2.RandomHorizontalFlip(flip_prob),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(PadToSize(crop))
    return v2.Compose(steps)


def afa_train_transform(
    crop: int = 320, ratio_range: Sequence[float] = (0.5, 2.0), flip_prob: float = 0.5
) -> v2.Compose:
    """AFA's VOC training pipeline (``VOC12ClsDataset`` with ``aug=True``; crop 320: the yaml)."""
    return v2.Compose([
        RandomScale(ratio_range),
        v2.RandomHorizontalFlip(flip_prob),
        RandomPadCrop(crop),
    ])


def restr_transform(size: int = 480) -> v2.Compose:
    """ReSTR's input: the image (and mask, box) resized to ``size`` x ``size``; never flipped."""
    return v2.Compose([v2.Resize((size, size), antialias=True)])


def zsi_train_transform(scale: Sequence[int] = (1333, 800), flip_prob: float = 0.5) -> v2.Compose:
    """ZSI's (mmdet 1.x Mask R-CNN) training pipeline: keep-ratio resize to 1333x800, flip."""
    return v2.Compose([KeepRatioResize(scale), v2.RandomHorizontalFlip(flip_prob)])


def eval_transform(scale: Sequence[int] | None = None) -> v2.Compose:
    """Test-time transform: identity (``scale=None``), or a keep-ratio resize into ``scale``.

    Papers score at the original resolution: keep ``scale=None`` and let the model resize its
    input and its prediction back (SegViT tests at ``(2048, 640)`` with a 640 sliding window;
    ZSI at ``(1333, 800)``). With a ``scale`` the label map is resized too (nearest), which is
    handy for quick checks but moves the numbers slightly.
    """
    return v2.Compose([KeepRatioResize(scale)] if scale is not None else [v2.Identity()])
