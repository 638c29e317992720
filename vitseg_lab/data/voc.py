"""PASCAL VOC 2012 with the SBD augmented set ("SegmentationClassAug"): AFA's data (chapter 04).

Layout read (METHODS §6.2), under the data root::

    VOCdevkit/VOC2012/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png          official palette PNGs: index = class, 255 = void
      SegmentationClassAug/<id>.png       train_aug + val masks (written by `prepare`, or AFA's zip)
      ImageSets/Segmentation/{train,val,trainval}.txt   official lists
      ImageSets/Segmentation/train_aug.txt             10,582 ids (written by `prepare`)
    benchmark_RELEASE/dataset/            SBD (only needed by `prepare`)
      cls/<id>.mat  (GTcls.Segmentation), img/<id>.jpg, train.txt, val.txt

``train_aug`` = (SBD train + SBD val + VOC train) minus VOC val: 10,582 images. ``prepare`` writes
one PNG per SBD ``.mat`` into ``SegmentationClassAug`` and copies the official VOC masks there
(the official hand-drawn mask wins where both exist), so the folder covers train_aug and val.

Label PNGs are read as palette *indices* (0 = background, 1..20, 255 = void), never as colours.
Image-level labels ("labels", what the weakly-supervised AFA trains on) are derived from the
full-image mask before any transform: class c in 1..20 present -> ``labels[c - 1] = 1``.
"""

from __future__ import annotations

import os
import shutil
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
    data_root,
    locate,
    read_image_and_label,
    read_label_png,
    read_lines,
    save_label_png,
)

__all__ = [
    "VOC",
    "VOC_CLASSES",
    "VOCAug",
    "image_labels",
    "load_sbd_mat",
    "prepare_voc_aug",
    "voc_palette",
]

NAME = "voc"
FOLDER = "VOCdevkit/VOC2012"
SBD_FOLDER = "benchmark_RELEASE/dataset"
SPLITS = ("train_aug", "train", "val", "trainval")
# train_aug is verified against AFA's list (METHODS §6.2); the others are VOC's published sizes.
OFFICIAL_COUNTS = {"train_aug": 10582, "train": 1464, "val": 1449, "trainval": 2913}

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
NUM_FG = len(VOC_CLASSES) - 1  # 20


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map (768 ints) used by the official palette PNGs."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def image_labels(label: np.ndarray, where: str = "") -> np.ndarray:
    """Multi-hot image-level labels from a VOC mask.

    Args:
        label: ``(H, W) uint8`` with 0 = background, 1..20 = classes, 255 = void.

    Returns:
        ``(20,) float32``: 1 where the foreground class is present.
    """
    values = np.unique(label)
    bad = values[(values > NUM_FG) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataFormatError(
            f"{where or 'a VOC mask'} holds value {int(bad[0])}, outside 0..20 and 255; it is not "
            "a VOC index mask (was a colour PNG converted to grayscale?): write it again with "
            "`vitseg-lab data prepare voc`."
        )
    out = np.zeros(NUM_FG, dtype=np.float32)
    fg = values[(values >= 1) & (values <= NUM_FG)]
    out[fg.astype(np.int64) - 1] = 1.0
    return out


class VOCAug(Dataset):
    """PASCAL VOC 2012 semantic segmentation, with the SBD-augmented ``train_aug`` split.

    Args:
        root: the data root, or the ``VOCdevkit/VOC2012`` folder itself.
        split: ``"train_aug"`` (10,582), ``"train"`` (1,464), ``"val"`` (1,449) or ``"trainval"``.
        transform: a torchvision v2 transform applied jointly to the sample dict (uint8
            ``tv_tensors.Image`` and ``tv_tensors.Mask`` values).
        label_dir: ``"SegmentationClassAug"`` or ``"SegmentationClass"``; default: the Aug folder
            for ``train_aug``, the official folder for the others (the Aug folder if it is absent).

    Each sample is a dict:
        ``image``: ``(3, H, W) float32`` in [0, 1];
        ``semantic``: ``(H, W) int64``, 0 = background, 1..20, 255 = void/ignore;
        ``labels``: ``(20,) float32`` multi-hot image-level labels (from the untransformed mask;
        index ``c - 1`` for class ``c``, names in ``dataset.foreground_class_names``);
        ``valid``: ``(H, W) bool``, False on padding a transform added (AFA's ``img_box``);
        ``name``: the image id, e.g. ``"2007_000032"``.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train_aug",
        *,
        transform: Callable | None = None,
        label_dir: str | None = None,
    ):
        self.split = check_choice(split, SPLITS, "VOC split")
        self.base = locate(root, FOLDER, ["JPEGImages"], NAME)
        self.transform = transform
        if label_dir is None:
            aug = self.base / "SegmentationClassAug"
            if self.split == "train_aug" or not (self.base / "SegmentationClass").is_dir():
                label_dir = "SegmentationClassAug"
            else:
                label_dir = "SegmentationClass"
            if label_dir == "SegmentationClassAug" and not aug.is_dir():
                raise DatasetNotFound(
                    f"{aug} is missing: build it from SBD with `vitseg-lab data prepare voc` "
                    "(after `vitseg-lab data download voc`), or unzip AFA's "
                    "SegmentationClassAug.zip there."
                )
        self.label_dir = self.base / check_choice(
            label_dir, ["SegmentationClassAug", "SegmentationClass"], "VOC label folder"
        )
        list_path = self.base / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        how = (
            "write it with `vitseg-lab data prepare voc`"
            if self.split == "train_aug"
            else "unpack VOCtrainval_11-May-2012.tar again (`vitseg-lab data download voc`)"
        )
        if not list_path.is_file():
            raise DatasetNotFound(f"the split list {list_path} is missing: {how}.")
        self.names = read_lines(list_path)
        if not self.names:
            raise DataFormatError(f"the split list {list_path} is empty: write it again ({how}).")
        have_img = {n[:-4] for n in os.listdir(self.base / "JPEGImages") if n.endswith(".jpg")}
        have_lab = (
            {n[:-4] for n in os.listdir(self.label_dir) if n.endswith(".png")}
            if self.label_dir.is_dir()
            else set()
        )
        miss_img = [n for n in self.names if n not in have_img]
        miss_lab = [n for n in self.names if n not in have_lab]
        if miss_img:
            raise DataFormatError(
                f"{len(miss_img)} images of VOC {self.split} are missing from "
                f"{self.base / 'JPEGImages'} (first: {miss_img[0]}.jpg): unpack "
                "VOCtrainval_11-May-2012.tar again (`vitseg-lab data download voc`)."
            )
        if miss_lab:
            raise DataFormatError(
                f"{len(miss_lab)} masks of VOC {self.split} are missing from {self.label_dir} "
                f"(first: {miss_lab[0]}.png): run `vitseg-lab data prepare voc`."
            )
        self.class_names = VOC_CLASSES
        self.foreground_class_names = VOC_CLASSES[1:]
        self.num_classes = len(VOC_CLASSES)
        self.ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, i: int) -> Path:
        return self.base / "JPEGImages" / f"{self.names[i]}.jpg"

    def label_path(self, i: int) -> Path:
        return self.label_dir / f"{self.names[i]}.png"

    def __getitem__(self, i: int) -> dict:
        image, label = read_image_and_label(self.image_path(i), self.label_path(i))
        labels = image_labels(label, str(self.label_path(i)))
        h, w = label.shape
        sample = {
            "image": image,
            "semantic": tv_tensors.Mask(torch.from_numpy(label)),
            "valid": tv_tensors.Mask(torch.ones(h, w, dtype=torch.uint8)),
            "labels": torch.from_numpy(labels),
            "name": self.names[i],
        }
        return apply_transform(sample, self.transform)


VOC = VOCAug


def load_sbd_mat(path: str | os.PathLike) -> np.ndarray:
    """Read an SBD ``cls/<id>.mat`` class mask (``GTcls.Segmentation``) as ``(H, W) uint8``."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(str(path))
        seg = mat["GTcls"][0]["Segmentation"][0]
    except FileNotFoundError:
        raise DatasetNotFound(
            f"{path} is missing; SBD was not fully unpacked: `vitseg-lab data download voc`."
        ) from None
    except (KeyError, IndexError, ValueError, TypeError, OSError) as e:
        raise DataFormatError(
            f"{path} is not a readable SBD class mask ({type(e).__name__}: {e}); unpack "
            "benchmark.tgz again (`vitseg-lab data download voc`)."
        ) from None
    return np.asarray(seg, dtype=np.uint8)


def prepare_voc_aug(root: str | os.PathLike | None = None, progress: bool = True) -> list[str]:
    """Build ``SegmentationClassAug`` and ``train_aug.txt`` (idempotent: existing files are kept).

    Needs VOC 2012 and, unless ``SegmentationClassAug`` is already complete (AFA's prebuilt zip),
    SBD's ``benchmark_RELEASE``.

    Returns:
        Human-readable lines saying what was done.
    """
    from tqdm.auto import tqdm

    droot = data_root(root)
    base = locate(root, FOLDER, ["JPEGImages"], NAME)
    sets = base / "ImageSets" / "Segmentation"
    voc_train = read_lines(sets / "train.txt", "VOC split list")
    voc_val = read_lines(sets / "val.txt", "VOC split list")
    aug = base / "SegmentationClassAug"
    aug.mkdir(exist_ok=True)
    palette = voc_palette()
    lines: list[str] = []

    copied = 0
    seg = base / "SegmentationClass"
    for name in voc_train + voc_val:
        dst = aug / f"{name}.png"
        if dst.exists():
            continue
        src = seg / f"{name}.png"
        if not src.is_file():
            raise DatasetNotFound(
                f"{src} is missing; unpack VOCtrainval_11-May-2012.tar again "
                "(`vitseg-lab data download voc`)."
            )
        read_label_png(src)  # refuse to propagate a corrupt file
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        copied += 1
    lines.append(f"copied {copied} official VOC masks into {aug}")

    sbd = droot / SBD_FOLDER
    if sbd.is_dir():
        sbd_train = read_lines(sbd / "train.txt", "SBD split list")
        sbd_val = read_lines(sbd / "val.txt", "SBD split list")
        todo = [n for n in dict.fromkeys(sbd_train + sbd_val) if not (aug / f"{n}.png").exists()]
        for name in tqdm(todo, desc="SBD .mat -> PNG", disable=not progress or not todo):
            save_label_png(load_sbd_mat(sbd / "cls" / f"{name}.mat"), aug / f"{name}.png", palette)
        lines.append(f"converted {len(todo)} SBD masks into {aug}")
        train_aug = sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))
    else:
        have = sorted(n[:-4] for n in os.listdir(aug) if n.endswith(".png"))
        if len(have) <= len(voc_train) + len(voc_val):
            raise DatasetNotFound(
                f"SBD ({sbd}) is missing and {aug} holds only the VOC masks, so train_aug cannot "
                "be built: run `vitseg-lab data download voc` (it fetches benchmark.tgz), or unzip "
                "AFA's SegmentationClassAug.zip into that folder."
            )
        train_aug = sorted(set(have) - set(voc_val))
        lines.append(f"SBD not found; train_aug taken from the {len(have)} masks in {aug}")

    out = sets / "train_aug.txt"
    text = "\n".join(train_aug) + "\n"
    if not out.is_file() or out.read_text() != text:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
        lines.append(f"wrote {out} ({len(train_aug):,} ids)")
    else:
        lines.append(f"{out} is up to date ({len(train_aug):,} ids)")
    if len(train_aug) != OFFICIAL_COUNTS["train_aug"]:
        lines.append(
            f"note: train_aug has {len(train_aug):,} ids, not the official "
            f"{OFFICIAL_COUNTS['train_aug']:,}; `vitseg-lab data verify voc` will report it."
        )
    return lines
