"""COCO-Stuff-10K: .mat -> *_labelTrainIds.png conversion and the loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitseg_lab.data import fixtures
from vitseg_lab.data.coco_stuff import (
    COCO_STUFF_CLASSES,
    COCOStuff10K,
    compact_ids,
    prepare_coco_stuff10k,
)
from vitseg_lab.data.common import DatasetNotFound


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = fixtures.make_coco_stuff10k(tmp_path_factory.mktemp("stuff"))
    prepare_coco_stuff10k(r, progress=False)
    return r


def _naive_compact(v):
    """mmseg's table written out: thing ids 1..90 without the 10 unused ones, then 92..182."""
    unused = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
    used = [i for i in range(1, 183) if i not in unused]
    return 0 if v == 0 else used.index(v) + 1


def test_compact_ids_matches_table():
    raw = np.array([0, 1, 11, 13, 25, 27, 90, 92, 182], np.uint8)
    assert compact_ids(raw).tolist() == [_naive_compact(int(v)) for v in raw]
    assert compact_ids(np.array([13, 92, 182], np.uint8)).tolist() == [12, 81, 171]
    assert len(COCO_STUFF_CLASSES) == 171


def test_prepare_and_load(root):
    tr, te = COCOStuff10K(root, "train"), COCOStuff10K(root, "test")
    assert (len(tr), len(te)) == (2, 1)
    s = tr[1]
    assert s["image"].shape == (3, 20, 24) and s["semantic"].dtype == torch.int64
    raw = fixtures.stuff_label(1, 20, 24)
    want = np.array([[255 if v == 0 else _naive_compact(int(v)) - 1 for v in row] for row in raw])
    assert np.array_equal(s["semantic"].numpy(), want)
    png = root / "coco_stuff10k" / "annotations" / "train2014" / f"{tr.names[1]}_labelTrainIds.png"
    assert np.array(Image.open(png)).max() == 171


def test_prepare_idempotent(root):
    assert all("converted 0 of" in ln for ln in prepare_coco_stuff10k(root, progress=False))


def test_raw_only_says_prepare(tmp_path):
    r = fixtures.make_coco_stuff10k(tmp_path)
    with pytest.raises(DatasetNotFound, match="vitseg-lab data prepare coco-stuff10k"):
        COCOStuff10K(r, "train")
    with pytest.raises(DatasetNotFound, match="download coco-stuff10k"):
        COCOStuff10K(tmp_path / "none", "train")
    with pytest.raises(ValueError, match="Did you mean 'test'"):
        COCOStuff10K(r, "tset")
