"""COCO 2014 with the zero-shot instance segmentation splits 48/17 and 65/15 (ZSI, chapter 06).

Layout (METHODS §5.6, §6.5; the ZSI repository's ``data/coco``), under the data root::

    coco/train2014/COCO_train2014_%012d.jpg
    coco/val2014/COCO_val2014_%012d.jpg
    coco/annotations/instances_train2014_seen_{48_17,65_15}.json
    coco/annotations/instances_val2014_{seen,unseen,gzsi}_{48_17,65_15}.json
    coco/word_w2v_withbg_{48_17,65_15}.txt     300 rows x (1 + classes) columns, comma-separated

Class order (what ``instance_labels`` index): the seen classes in COCO category-id order, then the
unseen classes in COCO category-id order. That is how the ZSI code numbers its labels
(``seen_cat2label`` / ``unseen_cat2label`` iterate the sorted category ids), and so the order of
the word-vector columns after the background column. (The ``CLASSES`` tuple of the 48/17 dataset
class lists the names in another order; it only labels printed results, not the vectors.)

Instances follow mmdetection's parsing: crowd annotations and boxes narrower or lower than one
pixel are left out. Boxes are ``xyxy = (x, y, x + w, y + h)`` (torchvision's convention; mmdet 1.x
subtracted one pixel).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .common import (
    DataFormatError,
    DatasetNotFound,
    apply_transform,
    check_choice,
    close_matches,
    data_root,
    decode_coco_segmentation,
    download_hint,
    read_image,
    read_json,
    require_keys,
)

__all__ = [
    "ANN_FILES",
    "COCO_CATEGORY_IDS",
    "COCO_CLASSES",
    "COCOZeroShot",
    "ZeroShotSplit",
    "load_word_vectors",
    "make_split",
    "zsi_split",
]

NAME = "coco-zsi"

# The 80 COCO instance classes, in category-id order, with their ids.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
COCO_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)
assert len(COCO_CLASSES) == len(COCO_CATEGORY_IDS) == 80
_ORDER = {n: i for i, n in enumerate(COCO_CLASSES)}

# Unseen classes (METHODS §5.2). Seen for 48/17: the 48 names of the ZSI code's CocoDataset_48_17
# (the other 15 COCO classes are in neither set); seen for 65/15: every other COCO class.
_UNSEEN = {
    "48_17": ("bus", "dog", "cow", "elephant", "umbrella", "tie", "skateboard", "cup", "knife",
              "cake", "couch", "keyboard", "sink", "scissors", "airplane", "cat", "snowboard"),
    "65_15": ("airplane", "train", "parking meter", "cat", "bear", "suitcase", "frisbee",
              "snowboard", "fork", "sandwich", "hot dog", "toilet", "mouse", "toaster",
              "hair drier"),
}
_SEEN_48 = (
    "person", "bicycle", "car", "motorcycle", "truck", "boat", "bench", "bird", "horse", "sheep",
    "zebra", "giraffe", "backpack", "handbag", "skis", "kite", "surfboard", "bottle", "spoon",
    "bowl", "banana", "apple", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed",
    "tv", "laptop", "remote", "microwave", "oven", "refrigerator", "book", "clock", "vase",
    "toothbrush", "train", "bear", "suitcase", "frisbee", "fork", "sandwich", "toilet", "mouse",
    "toaster",
)

# subset -> (image folder, annotation file pattern)
ANN_FILES = {
    "train_seen": ("train2014", "instances_train2014_seen_{split}.json"),
    "val_seen": ("val2014", "instances_val2014_seen_{split}.json"),
    "val_unseen": ("val2014", "instances_val2014_unseen_{split}.json"),
    "val_gzsi": ("val2014", "instances_val2014_gzsi_{split}.json"),
}
WORD_VECTORS = "word_w2v_withbg_{split}.txt"
SEMANTIC_DIM = 300


def _norm(name: str) -> str:
    return " ".join(str(name).replace("_", " ").lower().split())


@dataclass(frozen=True)
class ZeroShotSplit:
    """A seen/unseen partition of COCO's classes, each tuple in COCO category-id order."""

    name: str
    seen: tuple[str, ...]
    unseen: tuple[str, ...]

    @property
    def class_names(self) -> tuple[str, ...]:
        """Seen then unseen: the order of ``instance_labels`` and of the word-vector columns."""
        return self.seen + self.unseen


def _check_names(names: Iterable[str], what: str) -> list[str]:
    out = []
    for n in names:
        k = _norm(n)
        if k not in _ORDER:
            near = close_matches(k, COCO_CLASSES)
            hint = f"; did you mean {' or '.join(repr(c) for c in near)}?" if near else "."
            raise ValueError(f"{n!r} in the {what} classes is not a COCO class name{hint}")
        out.append(k)
    return out


def make_split(name: str, seen: Iterable[str], unseen: Iterable[str]) -> ZeroShotSplit:
    """Build a custom split, checking every name against COCO's 80 classes.

    Raises:
        ValueError: an unknown name (with close matches), or a class both seen and unseen.
    """
    s = _check_names(seen, "seen")
    u = _check_names(unseen, "unseen")
    both = sorted(set(s) & set(u))
    if both:
        raise ValueError(f"{', '.join(both)} cannot be both seen and unseen in split {name!r}.")
    return ZeroShotSplit(
        name, tuple(sorted(set(s), key=_ORDER.get)), tuple(sorted(set(u), key=_ORDER.get))
    )


def zsi_split(name: str) -> ZeroShotSplit:
    """The published split ``"48_17"`` or ``"65_15"`` (``"48/17"`` also accepted)."""
    key = check_choice(str(name).replace("/", "_"), list(_UNSEEN), "ZSI split")
    unseen = _UNSEEN[key]
    seen = _SEEN_48 if key == "48_17" else [c for c in COCO_CLASSES if c not in unseen]
    return make_split(key, seen, unseen)


def load_word_vectors(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Read a ZSI word-vector file: ``300`` rows x ``(1 + num_classes)`` columns.

    Returns:
        ``(1 + num_classes, 300) float32``: row 0 is the background vector, then the classes.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DatasetNotFound(
            f"the word vectors {path} are missing: {download_hint(NAME)} (the files are in the ZSI "
            "repository's data/coco/ folder)."
        ) from None
    try:
        rows = [ln for ln in text.splitlines() if ln.strip()]
        sep = "," if "," in rows[0] else None
        vec = np.array([[float(v) for v in ln.split(sep) if v.strip()] for ln in rows],
                       dtype=np.float32)
    except (ValueError, IndexError) as e:
        raise DataFormatError(
            f"{path} is not a table of numbers ({e}); download the word-vector file again."
        ) from None
    want = (SEMANTIC_DIM, 1 + num_classes)
    if vec.ndim != 2 or vec.shape != want:
        raise DataFormatError(
            f"{path} is {'x'.join(map(str, vec.shape))}, but this split needs {want[0]} rows x "
            f"{want[1]} columns (background + {num_classes} classes); it belongs to another split "
            "or is truncated."
        )
    return np.ascontiguousarray(vec.T)


class COCOZeroShot(Dataset):
    """COCO 2014 instances under a zero-shot split, read from the ZSI split annotation files.

    Args:
        root: the data root (holding ``coco/``) or the ``coco`` folder itself.
        split: ``"48_17"``, ``"65_15"``, or a :class:`ZeroShotSplit` from :func:`make_split`
            (then pass ``ann_file`` and ``word_vectors``).
        subset: ``"train_seen"``, ``"val_seen"``, ``"val_unseen"`` (ZSI) or ``"val_gzsi"`` (GZSI).
        transform: a torchvision v2 transform applied jointly to ``image``, ``instance_masks``
            (``tv_tensors.Mask``) and ``boxes`` (``tv_tensors.BoundingBoxes``).
        ann_file, image_dir, word_vectors: override the official paths.
        filter_empty: drop images without a usable instance or under 32 px (mmdet's training
            filter); default True for ``train_seen`` only.

    Attributes:
        class_names, seen_class_names, unseen_class_names: see the module docstring for the order.
        class_vectors: ``(K, 300) float32`` word vectors of ``class_names`` (read on first use).
        background_vector: ``(300,) float32``, column 0 of the word-vector file.

    Each sample is a dict:
        ``image``: ``(3, H, W) float32`` in [0, 1];
        ``instance_masks``: ``(N, H, W) bool``; ``boxes``: ``(N, 4) float32`` xyxy pixels;
        ``instance_labels``: ``(N,) int64`` indices into ``class_names``;
        ``image_id``: ``int``.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str | ZeroShotSplit = "48_17",
        subset: str = "train_seen",
        *,
        transform: Callable | None = None,
        ann_file: str | os.PathLike | None = None,
        image_dir: str | os.PathLike | None = None,
        word_vectors: str | os.PathLike | None = None,
        filter_empty: bool | None = None,
    ):
        self.split = split if isinstance(split, ZeroShotSplit) else zsi_split(split)
        self.subset = check_choice(subset, list(ANN_FILES), "ZSI subset")
        droot = data_root(root)
        base = droot if (droot / "annotations").is_dir() and not (droot / "coco").is_dir() \
            else droot / "coco"
        self.base = base
        folder, pattern = ANN_FILES[self.subset]
        if ann_file is None:
            if self.split.name not in _UNSEEN:
                raise ValueError(
                    f"split {self.split.name!r} is custom, so there is no official annotation file "
                    "for it: pass ann_file= (and word_vectors=)."
                )
            ann_file = base / "annotations" / pattern.format(split=self.split.name)
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise DatasetNotFound(
                f"the split annotation file {self.ann_file} is missing: {download_hint(NAME)} "
                "(the ZSI authors share these JSONs on Google Drive; data/README.md has the link)."
            )
        self.image_dir = Path(image_dir) if image_dir is not None else base / folder
        if not self.image_dir.is_dir():
            raise DatasetNotFound(
                f"the COCO {folder} images are not in {self.image_dir}: "
                "run `vitseg-lab data download coco2014`, or pass image_dir=."
            )
        self.word_vectors_path = (
            Path(word_vectors) if word_vectors is not None
            else base / WORD_VECTORS.format(split=self.split.name)
        )
        self.transform = transform

        self.class_names = self.split.class_names
        self.seen_class_names = self.split.seen
        self.unseen_class_names = self.split.unseen
        self.num_classes = len(self.class_names)
        index = {n: i for i, n in enumerate(self.class_names)}

        coco = read_json(self.ann_file, ("images", "annotations", "categories"), "annotation file")
        self.cat_to_label: dict[int, int] = {}
        self.ignored_categories: list[str] = []
        for j, c in enumerate(coco["categories"]):
            require_keys(c, ("id", "name"), f"{self.ann_file} categories[{j}]")
            n = _norm(c["name"])
            if n in index:
                self.cat_to_label[int(c["id"])] = index[n]
            elif n in _ORDER:
                self.ignored_categories.append(n)  # a COCO class outside this split
            else:
                near = close_matches(n, self.class_names)
                hint = f"; did you mean {' or '.join(repr(x) for x in near)}?" if near else "."
                raise ValueError(
                    f"category {c['name']!r} (id {c['id']}) in {self.ann_file} is not a class of "
                    f"split {self.split.name}{hint}"
                )
        self.images: dict[int, dict] = {}
        for j, im in enumerate(coco["images"]):
            require_keys(im, ("id", "file_name", "height", "width"), f"{self.ann_file} images[{j}]")
            self.images[int(im["id"])] = im
        self.anns_by_image: dict[int, list[dict]] = {i: [] for i in self.images}
        known_cats = {int(c["id"]) for c in coco["categories"]}
        for j, a in enumerate(coco["annotations"]):
            require_keys(a, ("id", "image_id", "category_id", "bbox", "segmentation"),
                         f"{self.ann_file} annotations[{j}]")
            if int(a["category_id"]) not in known_cats:
                raise DataFormatError(
                    f"{self.ann_file} annotation {a['id']} has category_id {a['category_id']}, "
                    "which its 'categories' list does not define; the file is damaged: download "
                    "it again."
                )
            if int(a["image_id"]) not in self.images:
                raise DataFormatError(
                    f"{self.ann_file} annotation {a['id']} points at image {a['image_id']}, which "
                    "its 'images' list does not have; download the file again."
                )
            if self._usable(a):
                self.anns_by_image[int(a["image_id"])].append(a)
        if filter_empty is None:
            filter_empty = self.subset.startswith("train")
        ids = sorted(self.images)
        if filter_empty:
            ids = [
                i for i in ids
                if self.anns_by_image[i]
                and min(self.images[i]["width"], self.images[i]["height"]) >= 32
            ]
        self.image_ids = ids
        self._vectors: np.ndarray | None = None

    def _usable(self, a: dict) -> bool:
        if a.get("iscrowd", 0) or a.get("ignore", False):
            return False
        if int(a["category_id"]) not in self.cat_to_label:
            return False
        _, _, w, h = a["bbox"]
        return a.get("area", w * h) > 0 and w >= 1 and h >= 1

    # Word vectors -------------------------------------------------------------------------------
    def _load_vectors(self) -> np.ndarray:
        if self._vectors is None:
            self._vectors = load_word_vectors(self.word_vectors_path, self.num_classes)
        return self._vectors

    @property
    def class_vectors(self) -> torch.Tensor:
        """``(K, 300) float32``: one word2vec vector per entry of ``class_names``."""
        return torch.from_numpy(self._load_vectors()[1:])

    @property
    def background_vector(self) -> torch.Tensor:
        """``(300,) float32``: the file's background column (BA-RPN's initial background)."""
        return torch.from_numpy(self._load_vectors()[0])

    @property
    def seen_mask(self) -> torch.Tensor:
        """``(K,) bool``: True for the seen entries of ``class_names``."""
        return torch.arange(self.num_classes) < len(self.seen_class_names)

    # Samples ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.images[image_id]["file_name"]

    def __getitem__(self, i: int) -> dict:
        image_id = self.image_ids[i]
        info = self.images[image_id]
        image = read_image(self.image_path(image_id))
        h, w = int(info["height"]), int(info["width"])
        if (h, w) != tuple(image.shape[-2:]):
            raise DataFormatError(
                f"{self.image_path(image_id)} is {image.shape[-2]}x{image.shape[-1]} but "
                f"{self.ann_file.name} says {h}x{w}; the image is not the annotated one."
            )
        anns = self.anns_by_image[image_id]
        masks = np.zeros((len(anns), h, w), dtype=np.uint8)
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        labels = np.zeros(len(anns), dtype=np.int64)
        for k, a in enumerate(anns):
            masks[k] = decode_coco_segmentation(
                a["segmentation"], h, w, where=f"annotation {a['id']} in {self.ann_file}"
            )
            x, y, bw, bh = (float(v) for v in a["bbox"])
            boxes[k] = (x, y, x + bw, y + bh)
            labels[k] = self.cat_to_label[int(a["category_id"])]
        sample = {
            "image": image,
            "instance_masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes), format="XYXY", canvas_size=(h, w)
            ),
            "instance_labels": torch.from_numpy(labels),
            "image_id": image_id,
        }
        return apply_transform(sample, self.transform)
