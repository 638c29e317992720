"""Tiny fakes of every benchmark, written in exactly the official on-disk layout.

Tests (and a course assistant checking a cluster install) build one of these in a temporary folder
and read it through the real loaders and the real ``vitseg-lab data verify``. Each builder takes
the *data root* (the folder ``VITSEG_DATA`` would name), writes a few small images and annotation
files, and returns that root. Content is deterministic, so tests can recompute what they expect.

``COUNTS`` gives, for each builder's default sizes, the numbers ``verify`` should find (the
official numbers' stand-ins: ``fetch.verify(name, root, expected=COUNTS[name])``).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from .ade20k import ADE20K_CLASSES
from .coco_zsi import ANN_FILES, COCO_CATEGORY_IDS, COCO_CLASSES, WORD_VECTORS, zsi_split
from .common import save_label_png
from .voc import voc_palette

__all__ = [
    "COUNTS",
    "blob_mask",
    "make_ade20k",
    "make_all",
    "make_coco2014",
    "make_coco_stuff10k",
    "make_coco_zsi",
    "make_refcoco",
    "make_voc",
    "rle_counts",
]


def _write_jpeg(path: Path, h: int, w: int, seed: int) -> None:
    """A smooth colourful image (so JPEG keeps it recognisable), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    img = np.stack([127 + 100 * np.sin(xx / 5 + yy / 7 + p) for p in phase], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=95)


def blob_mask(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic ellipse mask, ``(h, w) bool`` (the source of the fixtures' RLE masks)."""
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    ry, rx = rng.uniform(0.2, 0.3) * h, rng.uniform(0.2, 0.3) * w
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1.0


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's *uncompressed* RLE counts of a mask: column-major runs, starting with zeros."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    counts, cur, run = [], False, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return counts


def _compressed_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _rect_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# ADE20K ------------------------------------------------------------------------------------------
def ade_label(index: int, h: int, w: int) -> np.ndarray:
    """The fixture's raw ADE label map for image ``index``: blocks of 0, 1..149 and 150."""
    yy, xx = np.mgrid[0:h, 0:w]
    lab = ((yy // 6) * 7 + (xx // 6) * 13 + index * 5) % 151
    lab[: h // 3, : w // 3] = 0  # "other" -> ignore after reduce_zero_label
    lab[-(h // 4):, -(w // 4):] = 150  # the last class -> 149
    return lab.astype(np.uint8)


def make_ade20k(root: str | os.PathLike, n_train: int = 3, n_val: int = 2,
                size: tuple[int, int] = (24, 32)) -> Path:
    """``ADEChallengeData2016/`` with ``n_train`` + ``n_val`` images, annotations and info files."""
    root = Path(root)
    base = root / "ADEChallengeData2016"
    h, w = size
    for split, tag, n in (("training", "train", n_train), ("validation", "val", n_val)):
        for i in range(1, n + 1):
            stem = f"ADE_{tag}_{i:08d}"
            _write_jpeg(base / "images" / split / f"{stem}.jpg", h, w, seed=i)
            save_label_png(ade_label(i, h, w), base / "annotations" / split / f"{stem}.png")
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    rows += [f"{i}\t0.0\t0\t0\t{n}" for i, n in enumerate(ADE20K_CLASSES, start=1)]
    (base / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    scenes = [f"ADE_train_{i:08d} bathroom" for i in range(1, n_train + 1)]
    scenes += [f"ADE_val_{i:08d} street" for i in range(1, n_val + 1)]
    (base / "sceneCategories.txt").write_text("\n".join(scenes) + "\n")
    return root


# VOC + SBD ---------------------------------------------------------------------------------------
VOC_FIXTURE = {
    "train": ["2007_000032", "2007_000039", "2007_000063"],
    "val": ["2007_000033", "2007_000042"],
    "sbd_train": ["2008_000002", "2008_000003", "2007_000032", "2007_000033"],  # one VOC val id
    "sbd_val": ["2008_000008"],
}


def voc_label(index: int, h: int, w: int) -> np.ndarray:
    """The fixture's VOC mask ``index``: background 0, class 1 (and 15), void 255 borders."""
    lab = np.zeros((h, w), dtype=np.uint8)
    lab[h // 4: 3 * h // 4, w // 4: w // 2] = 1  # aeroplane
    if index % 2:
        lab[h // 4: 3 * h // 4, w // 2 + 2: -2] = 15  # person
    lab[h // 4 - 1, w // 4: w // 2] = 255  # void boundary, as in the official masks
    lab[3 * h // 4, w // 4: w // 2] = 255
    return lab


def make_voc(root: str | os.PathLike, with_sbd: bool = True,
             size: tuple[int, int] = (20, 28)) -> Path:
    """``VOCdevkit/VOC2012`` (images, palette ``SegmentationClass`` PNGs with 0/1/255, official
    lists) and, with ``with_sbd``, SBD's ``benchmark_RELEASE/dataset`` with ``.mat`` class masks.
    """
    root = Path(root)
    base = root / "VOCdevkit" / "VOC2012"
    h, w = size
    f = VOC_FIXTURE
    ids = list(dict.fromkeys(f["train"] + f["val"] + f["sbd_train"] + f["sbd_val"]))
    for k, name in enumerate(ids):
        _write_jpeg(base / "JPEGImages" / f"{name}.jpg", h, w, seed=100 + k)
    pal = voc_palette()
    for k, name in enumerate(f["train"] + f["val"]):
        save_label_png(voc_label(k, h, w), base / "SegmentationClass" / f"{name}.png", pal)
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("\n".join(f["train"]) + "\n")
    (sets / "val.txt").write_text("\n".join(f["val"]) + "\n")
    (sets / "trainval.txt").write_text("\n".join(f["train"] + f["val"]) + "\n")
    for extra in ("Annotations", "SegmentationObject"):  # present in the tar, unused
        (base / extra).mkdir(exist_ok=True)
    if with_sbd:
        from scipy.io import savemat

        sbd = root / "benchmark_RELEASE" / "dataset"
        (sbd / "cls").mkdir(parents=True, exist_ok=True)
        for k, name in enumerate(dict.fromkeys(f["sbd_train"] + f["sbd_val"])):
            lab = voc_label(k + 1, h, w)
            lab[lab == 255] = 0  # SBD masks have no void boundary
            gt = {"Segmentation": lab, "Boundaries": np.zeros((20, 1), dtype=object),
                  "CategoriesPresent": np.unique(lab[lab > 0]).astype(np.uint8)}
            savemat(str(sbd / "cls" / f"{name}.mat"), {"GTcls": gt})
            _write_jpeg(sbd / "img" / f"{name}.jpg", h, w, seed=200 + k)
        (sbd / "train.txt").write_text("\n".join(f["sbd_train"]) + "\n")
        (sbd / "val.txt").write_text("\n".join(f["sbd_val"]) + "\n")
    return root


def voc_train_aug() -> list[str]:
    """The fixture's train_aug: (SBD train + SBD val + VOC train) minus VOC val."""
    f = VOC_FIXTURE
    return sorted((set(f["sbd_train"]) | set(f["sbd_val"]) | set(f["train"])) - set(f["val"]))


# RefCOCO -----------------------------------------------------------------------------------------
REF_IMAGES = {581857: (30, 40), 9: (24, 36)}  # image_id -> (h, w)


def make_refcoco(root: str | os.PathLike, dataset: str = "refcoco",
                 split_by: str | None = None) -> Path:
    """``<dataset>/{instances.json, refs(<split_by>).p}`` and the COCO images they point at.

    Annotation 1 is a rectangle polygon, 2 an uncompressed RLE of :func:`blob_mask`, 3 a
    two-part polygon; refs cover every split of the partition.
    """
    root = Path(root)
    split_by = split_by or {"refcocog": "umd"}.get(dataset, "unc")
    splits = {"umd": ["train", "val", "test"], "google": ["train", "val"]}.get(
        split_by, ["train", "val", "testA", "testB"]
    )
    img_dir = root / "images" / "mscoco" / "images" / "train2014"
    images = []
    for k, (iid, (h, w)) in enumerate(REF_IMAGES.items()):
        name = f"COCO_train2014_{iid:012d}.jpg"
        _write_jpeg(img_dir / name, h, w, seed=300 + k)
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
    h2, w2 = REF_IMAGES[9]
    blob = blob_mask(h2, w2, seed=7)
    anns = [
        {"id": 1, "image_id": 581857, "category_id": 1, "iscrowd": 0, "area": 120.0,
         "bbox": [4.0, 6.0, 12.0, 10.0], "segmentation": [_rect_polygon(4, 6, 16, 16)]},
        {"id": 2, "image_id": 9, "category_id": 18, "iscrowd": 0, "area": float(blob.sum()),
         "bbox": [float(v) for v in _bbox(blob)],
         "segmentation": {"size": [h2, w2], "counts": rle_counts(blob)}},
        {"id": 3, "image_id": 581857, "category_id": 1, "iscrowd": 0, "area": 60.0,
         "bbox": [20.0, 2.0, 16.0, 20.0],
         "segmentation": [_rect_polygon(20, 2, 26, 8), _rect_polygon(30, 12, 36, 22)]},
    ]
    cats = [{"id": 1, "name": "person", "supercategory": "person"},
            {"id": 18, "name": "dog", "supercategory": "animal"}]
    _write_json(root / dataset / "instances.json",
                {"images": images, "annotations": anns, "categories": cats})
    refs = []
    plan = [(1, 581857, 1, ["man on the left", "left guy in red"]),
            (2, 9, 18, ["brown dog"]),
            (3, 581857, 1, ["person in two parts"]),
            (1, 581857, 1, ["the left person"])]
    sent_id = 0
    for ref_id, (ann_id, image_id, cat, sents) in enumerate(plan):
        sentences = []
        for s in sents:
            sentences.append({"sent_id": sent_id, "sent": s, "raw": s.capitalize(),
                              "tokens": s.split()})
            sent_id += 1
        refs.append({
            "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": cat,
            "split": splits[ref_id % len(splits)], "sent_ids": [t["sent_id"] for t in sentences],
            "sentences": sentences, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        })
    with open(root / dataset / f"refs({split_by}).p", "wb") as fh:
        pickle.dump(refs, fh, protocol=2)  # the official pickles come from Python 2
    return root


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


# COCO 2014 and the ZSI splits --------------------------------------------------------------------
COCO_IMAGES = {"train2014": {25: (32, 40), 30: (28, 36)}, "val2014": {42: (30, 40), 73: (26, 34)}}


def make_coco2014(root: str | os.PathLike) -> Path:
    """``coco/{train2014,val2014}/COCO_<split>_%012d.jpg``: two images each."""
    root = Path(root)
    for k, (folder, imgs) in enumerate(COCO_IMAGES.items()):
        for j, (iid, (h, w)) in enumerate(imgs.items()):
            _write_jpeg(root / "coco" / folder / f"COCO_{folder}_{iid:012d}.jpg", h, w,
                        seed=400 + 10 * k + j)
    return root


def _cat(name: str) -> dict:
    return {"id": COCO_CATEGORY_IDS[COCO_CLASSES.index(name)], "name": name,
            "supercategory": "thing"}


def make_coco_zsi(root: str | os.PathLike, split: str = "48_17") -> Path:
    """COCO 2014 images plus the ZSI split files of ``split``: the four annotation JSONs
    (categories of the subset only; one polygon, one compressed RLE, one crowd and one degenerate
    annotation) and ``word_w2v_withbg_<split>.txt`` whose column c holds ``c + row / 1000``.
    """
    root = Path(root)
    make_coco2014(root)
    sp = zsi_split(split)
    seen, unseen = sp.seen, sp.unseen
    s0, s1, u0 = seen[0], seen[1], unseen[0]

    def images(folder: str) -> list[dict]:
        return [{"id": iid, "file_name": f"COCO_{folder}_{iid:012d}.jpg", "height": h, "width": w}
                for iid, (h, w) in COCO_IMAGES[folder].items()]

    def poly_ann(aid: int, iid: int, name: str) -> dict:
        return {"id": aid, "image_id": iid, "category_id": _cat(name)["id"], "iscrowd": 0,
                "area": 96.0, "bbox": [3.0, 4.0, 12.0, 8.0],
                "segmentation": [_rect_polygon(3, 4, 15, 12)]}

    def rle_ann(aid: int, iid: int, name: str, h: int, w: int) -> dict:
        m = blob_mask(h, w, seed=aid)
        return {"id": aid, "image_id": iid, "category_id": _cat(name)["id"], "iscrowd": 0,
                "area": float(m.sum()), "bbox": [float(v) for v in _bbox(m)],
                "segmentation": _compressed_rle(m)}

    (th, tw), (vh, vw) = COCO_IMAGES["train2014"][25], COCO_IMAGES["val2014"][42]
    crowd = {"id": 90, "image_id": 30, "category_id": _cat(s0)["id"], "iscrowd": 1, "area": 50.0,
             "bbox": [1.0, 1.0, 10.0, 5.0],
             "segmentation": {"size": [28, 36], "counts": rle_counts(np.ones((28, 36), bool))}}
    thin = {**poly_ann(91, 25, s1), "bbox": [3.0, 4.0, 0.5, 8.0]}  # narrower than a pixel
    files = {
        "train_seen": ([_cat(n) for n in seen],
                       [poly_ann(1, 25, s0), rle_ann(2, 25, s1, th, tw), crowd, thin]),
        "val_seen": ([_cat(n) for n in seen], [poly_ann(3, 42, s0)]),
        "val_unseen": ([_cat(n) for n in unseen], [rle_ann(4, 42, u0, vh, vw)]),
        "val_gzsi": ([_cat(n) for n in sorted(seen + unseen, key=COCO_CLASSES.index)],
                     [poly_ann(5, 42, s0), rle_ann(6, 42, u0, vh, vw)]),
    }
    for subset, (cats, anns) in files.items():
        folder, pattern = ANN_FILES[subset]
        _write_json(root / "coco" / "annotations" / pattern.format(split=sp.name),
                    {"images": images(folder), "annotations": anns, "categories": cats})
    k = len(sp.class_names)
    vec = np.arange(1 + k, dtype=np.float64)[None, :] + np.arange(300)[:, None] / 1000.0
    np.savetxt(root / "coco" / WORD_VECTORS.format(split=sp.name), vec, delimiter=",", fmt="%.6f")
    return root


# COCO-Stuff-10K ----------------------------------------------------------------------------------
def stuff_label(index: int, h: int, w: int) -> np.ndarray:
    """The fixture's raw COCO-Stuff ``S`` map: 0, thing ids 1 and 90, stuff ids 92 and 182."""
    lab = np.zeros((h, w), dtype=np.uint8)
    lab[: h // 2, : w // 2] = 1
    lab[: h // 2, w // 2:] = 92
    lab[h // 2:, : w // 2] = 182
    lab[h // 2:, w // 2:] = 90 if index % 2 else 0
    return lab


def make_coco_stuff10k(root: str | os.PathLike, n_train: int = 2, n_test: int = 1,
                       size: tuple[int, int] = (20, 24)) -> Path:
    """The raw ``cocostuff-10k-v1.1.zip`` layout under ``coco_stuff10k/`` (``.mat`` labels)."""
    from scipy.io import savemat

    root = Path(root)
    base = root / "coco_stuff10k"
    h, w = size
    names = {"train": [f"COCO_train2014_{i:012d}" for i in range(1, n_train + 1)],
             "test": [f"COCO_train2014_{i:012d}" for i in range(500, 500 + n_test)]}
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    (base / "imageLists").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, ns in names.items():
        for n in ns:
            _write_jpeg(base / "images" / f"{n}.jpg", h, w, seed=500 + k)
            savemat(str(base / "annotations" / f"{n}.mat"), {"S": stuff_label(k, h, w)})
            k += 1
        (base / "imageLists" / f"{split}.txt").write_text("\n".join(ns) + "\n")
    (base / "imageLists" / "all.txt").write_text("\n".join(names["train"] + names["test"]) + "\n")
    return root


def make_all(root: str | os.PathLike) -> Path:
    """Every fixture under one data root (both ZSI splits, all three referring sets)."""
    root = Path(root)
    make_ade20k(root)
    make_voc(root)
    for ds in ("refcoco", "refcoco+", "refcocog"):
        make_refcoco(root, ds)
    make_coco_zsi(root, "48_17")
    make_coco_zsi(root, "65_15")
    make_coco_stuff10k(root)
    return root


# What `verify` should count in the default fixtures (stand-ins for the official numbers).
COUNTS: dict[str, dict[str, int]] = {
    "ade20k": {"training": 3, "validation": 2},
    "voc": {"JPEGImages": 8, "SegmentationClass": 5, "train_aug": len(voc_train_aug()),
            "train": 3, "val": 2},
    "refcoco": {"train": 2, "val": 1, "testA": 1, "testB": 1},
    "refcoco+": {"train": 2, "val": 1, "testA": 1, "testB": 1},
    "refcocog": {"train": 3, "val": 1, "test": 1},
    "coco2014": {"train2014": 2, "val2014": 2},
    "coco-zsi": {},
    "coco-stuff10k": {"train": 2, "test": 1},
}
