"""COCO-Stuff-10K, SegViT's second benchmark (optional).

Raw layout of ``cocostuff-10k-v1.1.zip`` (METHODS §6.3), unpacked into ``coco_stuff10k/``::

    coco_stuff10k/images/<name>.jpg
    coco_stuff10k/annotations/<name>.mat       field S: 0 = unlabelled, COCO ids 1..182
    coco_stuff10k/imageLists/{train,test,all}.txt   9,000 / 1,000 names

``vitseg-lab data prepare coco-stuff10k`` converts it the way mmseg's ``coco_stuff10k.py`` does
(SegViT ships a copy): the 182 sparse ids are compacted to 1..171, 0 is kept, and the result is::

    coco_stuff10k/images/{train2014,test2014}/<name>.jpg       (hard links to the raw images)
    coco_stuff10k/annotations/{train2014,test2014}/<name>_labelTrainIds.png

The loader reads the converted layout with ``reduce_zero_label=True`` (SegViT's config): 171
classes 0..170, 255 = ignore.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .ade20k import semantic_sample
from .coco_zsi import COCO_CATEGORY_IDS, COCO_CLASSES
from .common import (
    IGNORE_INDEX,
    DataFormatError,
    DatasetNotFound,
    check_choice,
    data_root,
    download_hint,
    read_lines,
    save_label_png,
)

__all__ = ["COCO_STUFF_CLASSES", "COCOStuff10K", "compact_ids", "prepare_coco_stuff10k"]

NAME = "coco-stuff10k"
FOLDER = "coco_stuff10k"
SPLITS = {"train": "train2014", "test": "test2014"}
OFFICIAL_COUNTS = {"train": 9000, "test": 1000}

# The 171 used classes in compacted order 1..171 (mmseg's COCOStuffDataset names): COCO's 80
# thing classes in category-id order, then the 91 stuff classes.
COCO_STUFF_CLASSES: tuple[str, ...] = (
    *COCO_CLASSES,
    "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
    "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
assert len(COCO_STUFF_CLASSES) == 171

# Raw id -> compacted id: 0 stays 0; the 80 thing ids and the 91 stuff ids 92..182 map to 1..171
# in order (mmseg's clsID_to_trID table). Ids outside the table (never used) become 0.
_USED_IDS = (*COCO_CATEGORY_IDS, *range(92, 183))
assert len(_USED_IDS) == 171
_LUT = np.zeros(256, dtype=np.uint8)
_LUT[list(_USED_IDS)] = np.arange(1, 172, dtype=np.uint8)


def compact_ids(raw: np.ndarray) -> np.ndarray:
    """Map raw COCO-Stuff ids (0, 1..182) to the compact 0..171 of ``*_labelTrainIds.png``."""
    return _LUT[np.asarray(raw, dtype=np.uint8)]


def _base(root: str | os.PathLike | None) -> Path:
    droot = data_root(root)
    if (droot / "imageLists").is_dir() or (droot / "annotations" / "train2014").is_dir():
        return droot
    return droot / FOLDER


class COCOStuff10K(Dataset):
    """COCO-Stuff-10K semantic segmentation from the converted (mmseg) layout.

    Args:
        root: the data root, or the ``coco_stuff10k`` folder itself.
        split: ``"train"`` (9,000) or ``"test"`` (1,000).
        reduce_zero_label: 0 -> 255 and 1..171 -> 0..170 (SegViT's setting).
        transform: a torchvision v2 transform applied jointly to the sample dict.

    Each sample is a dict: ``image`` ``(3, H, W) float32`` in [0, 1], ``semantic`` ``(H, W)
    int64`` (0..170, 255 = ignore), ``name``.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        *,
        reduce_zero_label: bool = True,
        transform: Callable | None = None,
    ):
        self.split = check_choice(split, list(SPLITS), "COCO-Stuff-10K split")
        self.base = _base(root)
        sub = SPLITS[self.split]
        self.img_dir = self.base / "images" / sub
        self.ann_dir = self.base / "annotations" / sub
        if not self.ann_dir.is_dir() or not self.img_dir.is_dir():
            if (self.base / "imageLists").is_dir():
                raise DatasetNotFound(
                    f"{self.base} holds the raw COCO-Stuff-10K release but not the converted "
                    f"{sub} folders: run `vitseg-lab data prepare {NAME}`."
                )
            raise DatasetNotFound(f"{self.base} is missing: {download_hint(NAME)}.")
        labels = {}
        for n in os.listdir(self.ann_dir):
            if n.endswith("_labelTrainIds.png"):
                labels[n[: -len("_labelTrainIds.png")]] = n
            elif n.endswith(".png") and n[:-4] not in labels:
                labels[n[:-4]] = n  # older mmseg converters named test masks <name>.png
        self.names = sorted(n[:-4] for n in os.listdir(self.img_dir) if n.endswith(".jpg"))
        missing = [n for n in self.names if n not in labels]
        if not self.names or missing:
            raise DataFormatError(
                f"{self.ann_dir} lacks the masks of {len(missing)} of {len(self.names)} images"
                f"{f' (first: {missing[0]})' if missing else ''}: run "
                f"`vitseg-lab data prepare {NAME}` again."
            )
        self._label_files = labels
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        self.class_names = (
            COCO_STUFF_CLASSES if reduce_zero_label else ("unlabelled", *COCO_STUFF_CLASSES)
        )
        self.num_classes = len(self.class_names)
        self.ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, i: int) -> Path:
        return self.img_dir / f"{self.names[i]}.jpg"

    def label_path(self, i: int) -> Path:
        return self.ann_dir / self._label_files[self.names[i]]

    def __getitem__(self, i: int) -> dict:
        return semantic_sample(self, i)


def _load_stuff_mat(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        return np.asarray(loadmat(str(path))["S"]).astype(np.uint8)
    except FileNotFoundError:
        raise DatasetNotFound(
            f"{path} is missing; unpack cocostuff-10k-v1.1.zip again "
            f"(`vitseg-lab data download {NAME}`)."
        ) from None
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise DataFormatError(
            f"{path} is not a readable COCO-Stuff label file ({type(e).__name__}: {e}); unpack "
            f"cocostuff-10k-v1.1.zip again (`vitseg-lab data download {NAME}`)."
        ) from None


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def prepare_coco_stuff10k(
    root: str | os.PathLike | None = None, progress: bool = True
) -> list[str]:
    """Convert the raw release into the mmseg layout (idempotent: existing outputs are kept)."""
    from tqdm.auto import tqdm

    base = _base(root)
    lists = base / "imageLists"
    if not lists.is_dir():
        if (base / "annotations" / "train2014").is_dir():
            return [f"{base} is already in the converted layout; nothing to do"]
        raise DatasetNotFound(f"{lists} is missing: {download_hint(NAME)}.")
    lines = []
    for split, sub in SPLITS.items():
        names = read_lines(lists / f"{split}.txt", "COCO-Stuff-10K image list")
        names = [n.removesuffix(".jpg") for n in names]
        (base / "images" / sub).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / sub).mkdir(parents=True, exist_ok=True)
        todo = [
            n for n in names
            if not (base / "annotations" / sub / f"{n}_labelTrainIds.png").exists()
            or not (base / "images" / sub / f"{n}.jpg").exists()
        ]
        for n in tqdm(todo, desc=f"COCO-Stuff-10K {split}", disable=not progress or not todo):
            src = base / "images" / f"{n}.jpg"
            dst = base / "images" / sub / f"{n}.jpg"
            if not dst.exists():
                if not src.is_file():
                    raise DatasetNotFound(
                        f"{src} is missing; unpack cocostuff-10k-v1.1.zip again "
                        f"(`vitseg-lab data download {NAME}`)."
                    )
                _link_or_copy(src, dst)
            out = base / "annotations" / sub / f"{n}_labelTrainIds.png"
            if not out.exists():
                save_label_png(compact_ids(_load_stuff_mat(base / "annotations" / f"{n}.mat")), out)
        lines.append(f"{split}: converted {len(todo)} of {len(names)} images into {sub}/")
    return lines
