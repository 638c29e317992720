"""ADE20K SceneParsing (ADEChallengeData2016), the SegViT benchmark of chapter 03.

Official layout (METHODS §6.1), under the data root::

    ADEChallengeData2016/
      images/{training,validation}/ADE_{train,val}_%08d.jpg
      annotations/{training,validation}/ADE_{train,val}_%08d.png   single channel, 0 = other
      objectInfo150.txt, sceneCategories.txt

Labels are 0 (other / unlabelled) and 1..150. With ``reduce_zero_label=True`` (what both SegViT
configs use) 0 becomes 255 (ignore) and v becomes v - 1, giving 150 classes 0..149.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .common import (
    IGNORE_INDEX,
    DataFormatError,
    DatasetNotFound,
    apply_transform,
    check_choice,
    locate,
    read_image_and_label,
)

__all__ = ["ADE20K", "ADE20K_CLASSES", "reduce_zero_label"]

NAME = "ade20k"
FOLDER = "ADEChallengeData2016"
SPLITS = {"training": "training", "validation": "validation", "train": "training",
          "val": "validation"}
OFFICIAL_COUNTS = {"training": 20210, "validation": 2000}  # METHODS §6.1 (mem)

# The 150 class names in label order 1..150 (as listed by mmsegmentation's ADE20KDataset).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150


def semantic_sample(ds, i: int) -> dict:
    """Sample ``i`` of a semantic-segmentation folder dataset (ADE20K, COCO-Stuff-10K).

    ``ds`` provides ``image_path(i)``, ``label_path(i)``, ``names``, ``reduce_zero_label`` and
    ``transform``. -> {"image", "semantic" (H, W) with 255 = ignore, "name"}, transformed.
    """
    image, label = read_image_and_label(ds.image_path(i), ds.label_path(i))
    if ds.reduce_zero_label:
        label = reduce_zero_label(label)
    sample = {
        "image": image,
        "semantic": tv_tensors.Mask(torch.from_numpy(label)),
        "name": ds.names[i],
    }
    return apply_transform(sample, ds.transform)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255 (ignore), v -> v - 1, 255 stays 255.

    Args:
        label: ``(H, W) uint8`` raw label map.

    Returns:
        ``(H, W) uint8``.
    """
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


def _list(folder: Path, suffix: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name[: -len(suffix)] for e in it if e.name.endswith(suffix))


class ADE20K(Dataset):
    """ADE20K scene parsing from the official ``ADEChallengeData2016`` folder.

    Args:
        root: the data root (default :func:`~vitseg_lab.data.common.data_root`) or the
            ``ADEChallengeData2016`` folder itself.
        split: ``"training"`` or ``"validation"`` (``"train"``/``"val"`` also accepted).
        reduce_zero_label: map 0 -> 255 and shift 1..150 to 0..149 (SegViT's setting).
        transform: a torchvision v2 transform applied jointly to the sample dict, where
            ``"image"`` is a uint8 ``tv_tensors.Image`` and ``"semantic"`` a ``tv_tensors.Mask``
            (see :mod:`vitseg_lab.data.transforms`).

    Each sample is a dict:
        ``image``: ``(3, H, W) float32`` in [0, 1];
        ``semantic``: ``(H, W) int64``, classes ``0..149`` (or ``0..150`` raw), 255 = ignore;
        ``name``: the file stem, e.g. ``"ADE_val_00000001"``.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "training",
        *,
        reduce_zero_label: bool = True,
        transform: Callable | None = None,
    ):
        self.split = SPLITS[check_choice(split, list(SPLITS), "ADE20K split")]
        self.base = locate(root, FOLDER, ["images", "annotations"], NAME)
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        img_dir = self.base / "images" / self.split
        ann_dir = self.base / "annotations" / self.split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise DatasetNotFound(
                    f"{d} is missing, so ADE20K's {self.split} split cannot be read: unpack "
                    "ADEChallengeData2016.zip again (`vitseg-lab data download ade20k`)."
                )
        self.img_dir, self.ann_dir = img_dir, ann_dir
        self.names = _list(img_dir, ".jpg")
        if not self.names:
            raise DatasetNotFound(
                f"{img_dir} holds no .jpg images: unpack ADEChallengeData2016.zip again "
                "(`vitseg-lab data download ade20k`)."
            )
        labels = set(_list(ann_dir, ".png"))
        missing = [n for n in self.names if n not in labels]
        if missing:
            raise DataFormatError(
                f"{len(missing)} ADE20K {self.split} images have no annotation in {ann_dir} "
                f"(first: {missing[0]}.png); the unpacking was incomplete: run "
                "`vitseg-lab data verify ade20k`."
            )
        self.class_names: tuple[str, ...] = (
            ADE20K_CLASSES if reduce_zero_label else ("other", *ADE20K_CLASSES)
        )
        self.num_classes = len(self.class_names)
        self.ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, i: int) -> Path:
        return self.img_dir / f"{self.names[i]}.jpg"

    def label_path(self, i: int) -> Path:
        return self.ann_dir / f"{self.names[i]}.png"

    def __getitem__(self, i: int) -> dict:
        return semantic_sample(self, i)
