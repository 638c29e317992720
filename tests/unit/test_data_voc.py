"""VOC 2012 + SBD: prepare (SBD .mat -> SegmentationClassAug, train_aug.txt) and the loader."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from vitseg_lab.data import fixtures
from vitseg_lab.data.common import DataFormatError, DatasetNotFound
from vitseg_lab.data.voc import VOC_CLASSES, VOCAug, image_labels, load_sbd_mat, prepare_voc_aug


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = fixtures.make_voc(tmp_path_factory.mktemp("voc"))
    prepare_voc_aug(r, progress=False)
    return r


def _naive_labels(mask):
    out = [0.0] * 20
    for v in mask.flatten().tolist():
        if 1 <= v <= 20:
            out[v - 1] = 1.0
    return out


def test_prepare_writes_train_aug_and_masks(root):
    base = root / "VOCdevkit" / "VOC2012"
    lst = (base / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert lst == fixtures.voc_train_aug()
    assert "2007_000033" not in lst  # in SBD train but in VOC val: excluded
    aug = base / "SegmentationClassAug"
    for name in lst + fixtures.VOC_FIXTURE["val"]:
        assert (aug / f"{name}.png").is_file()
    # an SBD-only id carries the .mat mask exactly; a VOC id keeps the official mask (with 255)
    sbd = root / "benchmark_RELEASE" / "dataset" / "cls"
    got = np.array(Image.open(aug / "2008_000002.png"))
    assert np.array_equal(got, load_sbd_mat(sbd / "2008_000002.mat"))
    official = np.array(Image.open(base / "SegmentationClass" / "2007_000032.png"))
    assert np.array_equal(np.array(Image.open(aug / "2007_000032.png")), official)
    assert Image.open(aug / "2008_000002.png").mode == "P"


def test_prepare_is_idempotent(root):
    aug = root / "VOCdevkit" / "VOC2012" / "SegmentationClassAug"
    before = {p.name: p.stat().st_mtime_ns for p in aug.iterdir()}
    lines = prepare_voc_aug(root, progress=False)
    assert any("converted 0 SBD" in ln for ln in lines) and any("up to date" in ln for ln in lines)
    assert {p.name: p.stat().st_mtime_ns for p in aug.iterdir()} == before


def test_sample_contract_and_ignore(root):
    ds = VOCAug(root, "val")
    assert len(ds) == 2 and ds.class_names == VOC_CLASSES
    s = ds[0]
    assert s["image"].shape == (3, 20, 28) and s["image"].dtype == torch.float32
    assert s["semantic"].dtype == torch.int64 and s["semantic"].shape == (20, 28)
    raw = np.array(Image.open(ds.label_path(0)))
    assert np.array_equal(s["semantic"].numpy(), raw)  # palette indices, void kept
    assert {0, 1, 255} <= set(s["semantic"].unique().tolist())
    assert s["labels"].shape == (20,) and s["labels"].dtype == torch.float32
    assert s["valid"].dtype == torch.bool and s["valid"].all()


def test_labels_derived_from_mask_match_naive(root):
    ds = VOCAug(root, "train_aug")
    assert len(ds) == len(fixtures.voc_train_aug())
    for i in range(len(ds)):
        raw = np.array(Image.open(ds.label_path(i)))
        assert ds[i]["labels"].tolist() == _naive_labels(raw)
    assert ds.label_dir.name == "SegmentationClassAug"


def test_image_labels_rejects_colour_values():
    with pytest.raises(DataFormatError, match="value 128"):
        image_labels(np.array([[0, 128]], np.uint8))


def test_train_aug_needs_prepare(tmp_path):
    r = fixtures.make_voc(tmp_path, with_sbd=True)
    with pytest.raises(DatasetNotFound, match="vitseg-lab data prepare voc"):
        VOCAug(r, "train_aug")
    assert len(VOCAug(r, "train")) == 3  # official split works without prepare


def test_prebuilt_aug_without_sbd(tmp_path):
    r = fixtures.make_voc(tmp_path, with_sbd=False)
    with pytest.raises(DatasetNotFound, match="SBD"):
        prepare_voc_aug(r, progress=False)
    # AFA's prebuilt SegmentationClassAug.zip holds more masks than VOC: train_aug = all - val
    base = r / "VOCdevkit" / "VOC2012"
    (base / "SegmentationClassAug").mkdir(exist_ok=True)
    for name in ("2008_000002", "2008_000003", "2008_000008"):
        Image.fromarray(np.zeros((20, 28), np.uint8)).save(
            base / "SegmentationClassAug" / f"{name}.png"
        )
    prepare_voc_aug(r, progress=False)
    assert len(VOCAug(r, "train_aug")) == 6


def test_missing_mask_and_unknown_split(tmp_path):
    r = fixtures.make_voc(tmp_path)
    os.remove(r / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000042.png")
    with pytest.raises(DataFormatError, match="2007_000042"):
        VOCAug(r, "val")
    with pytest.raises(ValueError, match="Did you mean 'train_aug'"):
        VOCAug(r, "trainaug")
    with pytest.raises(DatasetNotFound, match="vitseg-lab data download voc"):
        VOCAug(tmp_path / "elsewhere", "val")
