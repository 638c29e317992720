"""Shared helpers for the benchmark loaders: where the data lives, reading files with clear errors,
the sample convention, and a collate function.

The sample convention (every loader in ``vitseg_lab.data``):

- ``__getitem__`` returns a ``dict``. ``"image"`` is ``(3, H, W) float32`` in ``[0, 1]``.
- Before that, the loader builds the sample with torchvision ``tv_tensors``: the image is a
  ``uint8`` ``tv_tensors.Image``, masks are ``tv_tensors.Mask``, boxes are
  ``tv_tensors.BoundingBoxes`` (XYXY, pixels). The optional ``transform`` (a torchvision v2
  transform) sees that dict, so crops, resizes and flips move the image, masks and boxes together.
- After the transform, :func:`finish_sample` turns the ``uint8`` image into ``float32 / 255``
  (a float image, e.g. one the transform normalised, is kept as is) and every ``tv_tensor`` into a
  plain tensor with the documented dtype: semantic masks ``int64`` with ``255 = ignore``, binary
  masks ``bool``, boxes ``float32``.

Mean/std normalisation is the model's job (the backbone knows its pre-training statistics), so the
loaders never normalise; :mod:`vitseg_lab.data.transforms` records each paper's values.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where it is used, so `vitseg-lab data status` starts fast
    from torchvision import tv_tensors

__all__ = [
    "ENV_VAR",
    "IGNORE_INDEX",
    "DataFormatError",
    "DatasetNotFound",
    "apply_transform",
    "check_choice",
    "close_matches",
    "collate",
    "data_root",
    "decode_coco_segmentation",
    "download_hint",
    "finish_sample",
    "locate",
    "read_image",
    "read_json",
    "read_label_png",
    "read_lines",
    "require_keys",
    "save_label_png",
]

IGNORE_INDEX = 255
ENV_VAR = "VITSEG_DATA"

# The repository root, when the package runs from a source checkout (editable install): the
# default data folder is then ``<repo>/data`` wherever the notebook kernel was started.
_REPO_ROOT = Path(__file__).resolve().parents[2]


class DatasetNotFound(FileNotFoundError):
    """A data set (or a part of it) is not where the loader looks; the message says what to do."""


class DataFormatError(ValueError):
    """A data file exists but cannot be used: corrupt, truncated, or missing a field."""


def download_hint(name: str) -> str:
    """The one command (and the fallback) that fetches data set ``name``."""
    return (
        f"run `vitseg-lab data download {name}` (or place the files by hand as data/README.md "
        f"describes), or point {ENV_VAR} / root= at the folder that already holds them"
    )


# Layout facts that both the loaders and `fetch` (kept free of torch imports) need.
REFER_SPLIT_BY = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
}
REFER_DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}


def refer_image_dirs(root: Path, dataset: str) -> list[Path]:
    """Where the images of a ``refer`` data set may live under the data root, in search order."""
    if dataset == "refclef":
        return [root / "images" / "saiapr_tc-12"]
    return [
        root / "images" / "mscoco" / "images" / "train2014",  # the refer layout
        root / "coco" / "train2014",  # shared with ZSI
        root / "images" / "train2014",
    ]


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder that holds every benchmark.

    Order: the ``root`` argument, then the ``VITSEG_DATA`` environment variable, then ``data/`` in
    the repository (source checkout), else ``./data`` in the current directory. The folder does
    not have to exist yet (``download`` creates it).
    """
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    if (_REPO_ROOT / "pyproject.toml").is_file() and (_REPO_ROOT / "vitseg_lab").is_dir():
        return _REPO_ROOT / "data"
    return Path.cwd() / "data"


def locate(root: str | os.PathLike | None, folder: str, markers: Sequence[str], name: str) -> Path:
    """Find a data set's folder: ``root/folder``, or ``root`` itself when it is that folder.

    Args:
        root: the data root (see :func:`data_root`) or the data set's own folder.
        folder: the official folder name under the data root (``"ADEChallengeData2016"``).
        markers: entries that the data set's folder must contain (``["images", "annotations"]``).
        name: the ``vitseg-lab data`` name, for the error message.

    Raises:
        DatasetNotFound: neither candidate holds the markers.
    """
    base = data_root(root)
    for cand in (base, base / folder):
        if all((cand / m).exists() for m in markers):
            return cand
    target = base / folder
    missing = [m for m in markers if not (target / m).exists()]
    what = "is missing" if not target.exists() else f"lacks {', '.join(missing)}"
    raise DatasetNotFound(f"{target} {what}: {download_hint(name)}.")


def _corrupt(path: Path, err: BaseException, what: str) -> DataFormatError:
    return DataFormatError(
        f"{path} could not be decoded as {what} ({type(err).__name__}: {err}); the file is corrupt "
        "or truncated: delete it and unpack it again from its archive "
        "(`vitseg-lab data download NAME`), or copy it again by hand."
    )


def _missing(path: Path, what: str) -> FileNotFoundError:
    return DatasetNotFound(
        f"{what} {path} is missing; the download or unpacking was incomplete: "
        "run `vitseg-lab data verify NAME` to list every missing file."
    )


def read_image(path: str | os.PathLike) -> tv_tensors.Image:
    """Read an RGB image file.

    Returns:
        ``(3, H, W) uint8`` ``tv_tensors.Image``; grayscale, palette and CMYK files become RGB.

    Raises:
        DatasetNotFound: the file is missing.
        DataFormatError: the file cannot be decoded (corrupt, truncated, not an image).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here with its path
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise _missing(path, "image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _corrupt(path, e, "an image") from None
    import torch
    from torchvision import tv_tensors

    arr = np.asarray(rgb, dtype=np.uint8)
    return tv_tensors.Image(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())


def read_image_and_label(image_path: str | os.PathLike, label_path: str | os.PathLike):
    """Read an image and its label PNG, and check that they are the same size.

    Returns:
        ``(image, label)``: what :func:`read_image` and :func:`read_label_png` return.

    Raises:
        DataFormatError: the two sizes differ (the annotation does not belong to the image).
    """
    image = read_image(image_path)
    label = read_label_png(label_path)
    if label.shape != tuple(image.shape[-2:]):
        raise DataFormatError(
            f"{label_path} is {label.shape[0]}x{label.shape[1]} but its image is "
            f"{image.shape[-2]}x{image.shape[-1]}; the annotation does not belong to the image."
        )
    return image, label


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG whose pixel values are class indices.

    Palette (``P``) PNGs, like VOC's ``SegmentationClass``, are read as their palette *indices*
    (never converted to RGB); grayscale (``L``) PNGs as their values.

    Returns:
        ``(H, W) uint8``.

    Raises:
        DatasetNotFound: the file is missing.
        DataFormatError: corrupt file, or a colour (RGB) image where indices were expected.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except FileNotFoundError:
        raise _missing(path, "label file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _corrupt(path, e, "a label PNG") from None
    if mode in ("P", "L"):
        return arr.astype(np.uint8, copy=False)
    if mode == "1":
        return arr.astype(np.uint8)
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        if arr.size and int(arr.max()) > 255:
            raise DataFormatError(
                f"{path} holds label values up to {int(arr.max())}, above 255; this loader reads "
                "8-bit class indices: convert the file with `vitseg-lab data prepare NAME`."
            )
        return arr.astype(np.uint8)
    raise DataFormatError(
        f"{path} is a {mode} colour image, but a label PNG must hold class indices (palette 'P' or "
        "grayscale 'L'); use the official annotation PNGs, not a colourised copy."
    )


def read_json(path: str | os.PathLike, required: Iterable[str] = (), what: str = "") -> Any:
    """Load a JSON file and check its top-level keys.

    Raises:
        DatasetNotFound: the file is missing.
        DataFormatError: not valid JSON, or a required key is absent.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise _missing(path, what or "JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(
            f"{path} is not valid JSON ({e}); the file is truncated or corrupt: download it again."
        ) from None
    require_keys(obj, required, f"{path}")
    return obj


def require_keys(obj: Any, keys: Iterable[str], where: str) -> None:
    """Raise a one-sentence :class:`DataFormatError` if ``obj`` (a dict) lacks any of ``keys``."""
    keys = list(keys)
    if not keys:
        return
    if not isinstance(obj, Mapping):
        raise DataFormatError(
            f"{where} should be a JSON object/dict with keys {keys}, but it is a "
            f"{type(obj).__name__}; it is not the file this loader expects."
        )
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataFormatError(
            f"{where} lacks the key{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(k) for k in missing)}; it is not the official file or it is damaged: "
            "download it again."
        )


def read_lines(path: str | os.PathLike, what: str = "split list") -> list[str]:
    """Non-empty, stripped lines of a text file (split lists)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _missing(path, what) from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` entries of ``choices`` that look like ``name`` (difflib, case-insensitive)."""
    choices = list(choices)
    lower = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)
    return [lower[h] for h in hits]


def check_choice(value: str, choices: Iterable[str], what: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError with close matches."""
    choices = list(choices)
    if value in choices:
        return value
    near = close_matches(str(value), choices)
    hint = f" Did you mean {' or '.join(repr(c) for c in near)}?" if near else ""
    raise ValueError(
        f"{value!r} is not a known {what}; choose one of {', '.join(map(repr, choices))}.{hint}"
    )


def decode_coco_segmentation(segm: Any, height: int, width: int, where: str = "") -> np.ndarray:
    """Decode a COCO ``segmentation`` field (polygons, uncompressed or compressed RLE) to a mask.

    Multi-part objects (several polygons) are merged into one mask, as the refer API does.

    Returns:
        ``(height, width) bool``.

    Raises:
        DataFormatError: the field is neither polygons nor RLE, or pycocotools cannot decode it.
    """
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segm, list):
            polys = [p for p in segm if len(p) >= 6]
            if not polys:
                raise ValueError("no polygon with at least 3 points")
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(segm, Mapping) and "counts" in segm:
            if isinstance(segm["counts"], list):  # uncompressed RLE (COCO crowd annotations)
                rle = mask_utils.frPyObjects(dict(segm), height, width)
            else:
                rle = dict(segm)
                if isinstance(rle["counts"], str):
                    rle["counts"] = rle["counts"].encode("ascii")
        else:
            raise ValueError(f"expected polygons or an RLE dict, got {type(segm).__name__}")
        with warnings.catch_warnings():  # pycocotools 2.0.x trips a NumPy 2 copy= deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            m = mask_utils.decode(rle)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise DataFormatError(
            f"the segmentation of {where or 'an annotation'} cannot be decoded ({e}); the "
            "annotation file is damaged: download it again."
        ) from None
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.shape != (height, width):
        raise DataFormatError(
            f"the segmentation of {where or 'an annotation'} decodes to {m.shape[0]}x{m.shape[1]} "
            f"but its image is {height}x{width}; the annotation file does not match the images."
        )
    return m.astype(bool)


def apply_transform(sample: dict, transform: Callable | None) -> dict:
    """Run a torchvision v2 transform jointly on the sample dict, then :func:`finish_sample`."""
    if transform is not None:
        out = transform(sample)
        if not isinstance(out, dict):
            raise TypeError(
                "the transform must return the sample dict it was given (torchvision v2 "
                f"transforms do); it returned a {type(out).__name__}."
            )
        sample = out
    return finish_sample(sample)


# Keys whose masks are binary (bool out) versus label maps (int64 out).
BINARY_MASK_KEYS = ("ref_mask", "instance_masks", "valid")


def finish_sample(sample: dict) -> dict:
    """Turn the tv_tensor sample into plain tensors with the course's dtypes.

    ``image`` uint8 -> float32 in [0, 1]; label maps -> int64; binary masks -> bool (the VOC
    ``valid`` map is ``== 1`` so that padding filled with 255 reads as invalid); boxes -> float32.
    """
    import torch
    from torchvision import tv_tensors

    out = {}
    for k, v in sample.items():
        if isinstance(v, tv_tensors.Image):
            t = v.as_subclass(torch.Tensor)
            out[k] = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
        elif isinstance(v, tv_tensors.Mask):
            t = v.as_subclass(torch.Tensor)
            if k == "valid":
                out[k] = t == 1
            elif k in BINARY_MASK_KEYS:
                out[k] = t.bool() if t.dtype != torch.uint8 else t == 1
            else:
                out[k] = t.long()
        elif isinstance(v, tv_tensors.BoundingBoxes):
            out[k] = v.as_subclass(torch.Tensor).float()
        else:
            out[k] = v
    return out


def collate(batch: Sequence[dict]) -> dict:
    """Collate samples for a DataLoader: stack tensors of equal shape, keep the rest as lists.

    Instance masks, boxes and labels differ in count per image, and strings/lists (expressions,
    sentences) should stay Python objects, so ``torch.utils.data.default_collate`` does not fit.
    """
    import torch

    if not batch:
        raise ValueError("collate() got an empty batch; check the sampler and the data set length.")
    out: dict[str, Any] = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if all(isinstance(v, torch.Tensor) for v in vals) and len({v.shape for v in vals}) == 1:
            out[k] = torch.stack(vals)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def save_label_png(
    label: np.ndarray, path: str | os.PathLike, palette: Sequence[int] | None = None
) -> None:
    """Write a ``(H, W) uint8`` index map as a PNG, atomically (temporary file, then rename).

    With ``palette`` (768 ints) the PNG is a palette image, which viewers show in colour while
    :func:`read_label_png` still reads the indices.
    """
    path = Path(path)
    arr = np.asarray(label)
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise ValueError(f"save_label_png needs (H, W) uint8, not {arr.shape} {arr.dtype}.")
    h, w = arr.shape
    if palette is not None:
        im = Image.frombytes("P", (w, h), np.ascontiguousarray(arr).tobytes())
        im.putpalette(list(palette))
    else:
        im = Image.frombytes("L", (w, h), np.ascontiguousarray(arr).tobytes())
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(tmp, format="PNG")
    os.replace(tmp, path)
