"""ADE20K loader on a fixture in the official ADEChallengeData2016 layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitseg_lab.data import fixtures
from vitseg_lab.data.ade20k import ADE20K, ADE20K_CLASSES, reduce_zero_label
from vitseg_lab.data.common import DataFormatError, DatasetNotFound


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fixtures.make_ade20k(tmp_path_factory.mktemp("ade"))


def _naive_reduce(raw):
    out = np.empty_like(raw)
    for idx, v in np.ndenumerate(raw):
        out[idx] = 255 if v in (0, 255) else v - 1
    return out


def test_lengths_shapes_dtypes(root):
    tr, va = ADE20K(root, "training"), ADE20K(root, "val")
    assert (len(tr), len(va)) == (3, 2)
    s = tr[0]
    assert s["image"].shape == (3, 24, 32) and s["image"].dtype == torch.float32
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["semantic"].shape == (24, 32) and s["semantic"].dtype == torch.int64
    assert s["name"] == "ADE_train_00000001"
    assert tr.num_classes == 150 and tr.class_names == ADE20K_CLASSES


def test_reduce_zero_label_matches_naive(root):
    ds = ADE20K(root, "training")
    for i in range(len(ds)):
        raw = np.array(Image.open(ds.label_path(i)))
        got = ds[i]["semantic"].numpy()
        assert np.array_equal(got, _naive_reduce(raw))
        assert (raw == 0).any() and (got == 255).sum() == (raw == 0).sum()
        assert got[raw == 150].tolist() == [149] * int((raw == 150).sum())
        assert got[got != 255].max() <= 149


def test_raw_labels_without_reduce(root):
    ds = ADE20K(root, "validation", reduce_zero_label=False)
    raw = np.array(Image.open(ds.label_path(1)))
    assert np.array_equal(ds[1]["semantic"].numpy(), raw)
    assert ds.num_classes == 151 and ds.class_names[0] == "other"


def test_reduce_keeps_255():
    out = reduce_zero_label(np.array([[0, 1, 255, 150]], np.uint8))
    assert out.tolist() == [[255, 0, 255, 149]]


def test_root_may_be_the_dataset_folder(root):
    assert len(ADE20K(root / "ADEChallengeData2016", "training")) == 3


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(DatasetNotFound, match="vitseg-lab data download ade20k"):
        ADE20K(tmp_path, "training")


def test_unknown_split_suggests(root):
    with pytest.raises(ValueError, match="Did you mean 'training'"):
        ADE20K(root, "trainig")


def test_missing_annotation_and_corrupt_png(tmp_path):
    r = fixtures.make_ade20k(tmp_path, n_train=2, n_val=1)
    ann = r / "ADEChallengeData2016" / "annotations" / "training"
    (ann / "ADE_train_00000002.png").write_bytes(b"\x89PNG garbage")
    ds = ADE20K(r, "training")
    with pytest.raises(DataFormatError, match="ADE_train_00000002.png"):
        ds[1]
    (ann / "ADE_train_00000002.png").unlink()
    with pytest.raises(DataFormatError, match="have no annotation.*ADE_train_00000002"):
        ADE20K(r, "training")
