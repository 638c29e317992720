"""RefCOCO, RefCOCO+ and RefCOCOg (and ReferIt) in the ``refer`` layout: ReSTR's data (chapter 05).

Layout (METHODS §6.4; the one ``REFER(data_root, dataset, splitBy)`` reads), under the data root::

    refcoco/{instances.json, refs(unc).p, refs(google).p}
    refcoco+/{instances.json, refs(unc).p}
    refcocog/{instances.json, refs(umd).p, refs(google).p}
    refclef/{instances.json, refs(unc).p, refs(berkeley).p}
    images/mscoco/images/train2014/COCO_train2014_%012d.jpg    (or coco/train2014/, shared with ZSI)
    images/saiapr_tc-12/...                                     (ReferIt only)

``refs(*).p`` is a pickled list of dicts (``ref_id, ann_id, image_id, category_id, split,
sent_ids, sentences[{sent_id, sent, raw, tokens}], file_name``). The referred mask is the
annotation's ``segmentation`` in ``instances.json`` (polygons for refcoco*, RLE for refclef),
decoded with pycocotools; multi-part objects are merged, as the API's ``getMask`` does.

One sample per *expression* (sentence), the unit that referring-segmentation metrics average over.
The pickles are the official format; unpickling runs code, so only load files from the official
archives.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .common import (
    REFER_DEFAULT_SPLIT_BY as DEFAULT_SPLIT_BY,
)
from .common import (
    REFER_SPLIT_BY as SPLIT_BY,
)
from .common import (
    DataFormatError,
    DatasetNotFound,
    apply_transform,
    check_choice,
    data_root,
    decode_coco_segmentation,
    download_hint,
    read_image,
    read_json,
    require_keys,
)
from .common import (
    refer_image_dirs as image_dirs,
)

__all__ = ["DEFAULT_SPLIT_BY", "SPLIT_BY", "RefCOCO", "image_dirs", "load_refs"]

# Expressions per split (mem: the numbers usually quoted from the refer/MAttNet papers; verify
# reports a difference as a warning, not a failure).
OFFICIAL_EXPRESSIONS = {
    ("refcoco", "unc"): {"train": 120624, "val": 10834, "testA": 5657, "testB": 5095},
    ("refcoco+", "unc"): {"train": 120191, "val": 10758, "testA": 5726, "testB": 4889},
    ("refcocog", "umd"): {"train": 80512, "val": 4896, "test": 9602},
}
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
ANN_KEYS = ("id", "image_id", "segmentation", "bbox")


def load_refs(path: str | os.PathLike) -> list[dict]:
    """Unpickle a ``refs(<splitBy>).p`` file (written by Python 2; strings may need latin-1)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            try:
                refs = pickle.load(f)
            except UnicodeDecodeError:
                f.seek(0)
                refs = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise DatasetNotFound(f"{path} is missing: {download_hint('refcoco')}.") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
        raise DataFormatError(
            f"{path} is not a readable refs pickle ({type(e).__name__}: {e}); it is truncated or "
            "corrupt: download the data set's zip again."
        ) from None
    if not isinstance(refs, list):
        raise DataFormatError(
            f"{path} holds a {type(refs).__name__}, not the list of refs the refer API writes; "
            "download the data set's zip again."
        )
    return refs


class RefCOCO(Dataset):
    """Referring expressions with their referred masks, from the ``refer`` files.

    Args:
        root: the data root (holding ``refcoco/``, ``images/``...) or the data set's folder.
        dataset: ``"refcoco"``, ``"refcoco+"``, ``"refcocog"`` or ``"refclef"``.
        split: a split of the chosen partition: unc ``train/val/testA/testB``, umd
            ``train/val/test``, google ``train/val``.
        split_by: the partition (``refs(<split_by>).p``); default unc, umd for refcocog.
        transform: a torchvision v2 transform applied jointly to ``image`` (uint8
            ``tv_tensors.Image``), ``ref_mask`` (``tv_tensors.Mask``) and ``bbox``
            (``tv_tensors.BoundingBoxes``). Do not flip: expressions say "left" and "right".
        image_dir: the folder of the images, if not one of :func:`image_dirs`.

    Each sample is a dict:
        ``image``: ``(3, H, W) float32`` in [0, 1];
        ``ref_mask``: ``(H, W) bool``, the referred object;
        ``bbox``: ``(4,) float32`` xyxy pixels of the referred object;
        ``expression``: ``str``, this sample's sentence; ``tokens``: its tokens;
        ``sentences``: ``list[str]``, every expression of the same object;
        ``ref_id``, ``sent_id``, ``ann_id``, ``image_id``, ``category_id``: ``int``.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        dataset: str = "refcoco",
        split: str = "train",
        *,
        split_by: str | None = None,
        transform: Callable | None = None,
        image_dir: str | os.PathLike | None = None,
    ):
        self.dataset = check_choice(dataset, list(SPLIT_BY), "referring data set")
        self.split_by = check_choice(
            split_by or DEFAULT_SPLIT_BY[self.dataset], SPLIT_BY[self.dataset],
            f"{self.dataset} partition (splitBy)",
        )
        droot = data_root(root)
        folder = droot / self.dataset
        if not (folder / "instances.json").exists() and (droot / "instances.json").exists():
            folder, droot = droot, droot.parent  # root pointed at the data set's own folder
        if not folder.is_dir():
            raise DatasetNotFound(f"{folder} is missing: {download_hint(self.dataset)}.")
        refs_path = folder / f"refs({self.split_by}).p"
        if not refs_path.is_file():
            present = sorted(p.name for p in folder.glob("refs(*).p"))
            raise DatasetNotFound(
                f"{refs_path} is missing (present: {', '.join(present) or 'none'}): "
                f"{download_hint(self.dataset)}."
            )
        self.folder = folder
        self.transform = transform

        refs = load_refs(refs_path)
        for j, r in enumerate(refs):
            require_keys(r, REF_KEYS, f"{refs_path} entry {j}")
        splits = sorted({r["split"] for r in refs})
        self.split = check_choice(split, splits, f"split of {self.dataset} ({self.split_by})")
        self.refs = [r for r in refs if r["split"] == self.split]

        inst_path = folder / "instances.json"
        inst = read_json(inst_path, ("images", "annotations"), "annotation file")
        self.images = {}
        for j, im in enumerate(inst["images"]):
            require_keys(im, ("id", "height", "width"), f"{inst_path} images[{j}]")
            self.images[im["id"]] = im
        self.anns = {}
        for j, a in enumerate(inst["annotations"]):
            require_keys(a, ANN_KEYS, f"{inst_path} annotations[{j}]")
            self.anns[a["id"]] = a
        self.categories = {c["id"]: c.get("name", str(c["id"])) for c in inst.get("categories", [])}

        self.items: list[tuple[int, int]] = []
        for k, r in enumerate(self.refs):
            if r["ann_id"] not in self.anns:
                raise DataFormatError(
                    f"{refs_path}: ref {r['ref_id']} points at annotation {r['ann_id']}, which "
                    f"{inst_path} does not have; the two files are from different releases: "
                    "download the data set's zip again."
                )
            if r["image_id"] not in self.images:
                raise DataFormatError(
                    f"{refs_path}: ref {r['ref_id']} points at image {r['image_id']}, which "
                    f"{inst_path} does not list; download the data set's zip again."
                )
            for s, sent in enumerate(r["sentences"]):
                require_keys(sent, ("sent",), f"{refs_path} ref {r['ref_id']} sentence {s}")
                self.items.append((k, s))

        candidates = [Path(image_dir)] if image_dir is not None else image_dirs(droot, self.dataset)
        found = [d for d in candidates if d.is_dir()]
        if not found:
            what = "COCO train2014" if self.dataset != "refclef" else "ReferIt saiapr_tc-12"
            cmd = "coco2014" if self.dataset != "refclef" else self.dataset
            raise DatasetNotFound(
                f"the {what} images are not in {' or '.join(str(c) for c in candidates)}: run "
                f"`vitseg-lab data download {cmd}` (and `vitseg-lab data prepare "
                f"{self.dataset}`), or pass image_dir=."
            )
        self.image_dir = found[0]

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, image_id: int) -> Path:
        info = self.images[image_id]
        name = info.get("file_name") or f"COCO_train2014_{image_id:012d}.jpg"
        return self.image_dir / name

    def ref_mask(self, ref: dict) -> np.ndarray:
        """The referred object's mask, ``(H, W) bool``."""
        ann = self.anns[ref["ann_id"]]
        info = self.images[ref["image_id"]]
        return decode_coco_segmentation(
            ann["segmentation"], int(info["height"]), int(info["width"]),
            where=f"annotation {ann['id']} (ref {ref['ref_id']}) in "
            f"{self.folder / 'instances.json'}",
        )

    def __getitem__(self, i: int) -> dict:
        k, s = self.items[i]
        ref = self.refs[k]
        image = read_image(self.image_path(ref["image_id"]))
        mask = self.ref_mask(ref)
        if mask.shape != tuple(image.shape[-2:]):
            raise DataFormatError(
                f"{self.image_path(ref['image_id'])} is {image.shape[-2]}x{image.shape[-1]} but "
                f"instances.json says {mask.shape[0]}x{mask.shape[1]}; the image is not the one "
                "the annotations were made on."
            )
        x, y, w, h = (float(v) for v in self.anns[ref["ann_id"]]["bbox"])
        sent = ref["sentences"][s]
        sample = {
            "image": image,
            "ref_mask": tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))),
            "bbox": tv_tensors.BoundingBoxes(
                torch.tensor([[x, y, x + w, y + h]]), format="XYXY", canvas_size=mask.shape
            ),
            "expression": str(sent["sent"]),
            "tokens": list(sent.get("tokens", str(sent["sent"]).split())),
            "sentences": [str(t["sent"]) for t in ref["sentences"]],
            "ref_id": int(ref["ref_id"]),
            "sent_id": int(sent.get("sent_id", -1)),
            "ann_id": int(ref["ann_id"]),
            "image_id": int(ref["image_id"]),
            "category_id": int(
                ref.get("category_id", self.anns[ref["ann_id"]].get("category_id", -1))
            ),
        }
        out = apply_transform(sample, self.transform)
        out["bbox"] = out["bbox"].reshape(4)
        return out
