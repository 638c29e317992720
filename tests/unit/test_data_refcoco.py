"""RefCOCO / RefCOCO+ / RefCOCOg loader on a fixture in the refer layout."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from vitseg_lab.data import fixtures
from vitseg_lab.data.common import DataFormatError, DatasetNotFound
from vitseg_lab.data.refcoco import RefCOCO
from vitseg_lab.data.transforms import restr_transform


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("refer")
    for ds in ("refcoco", "refcoco+", "refcocog"):
        fixtures.make_refcoco(r, ds)
    return r


def _rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_polygon_expression_and_contract(root):
    ds = RefCOCO(root, "refcoco", "train")
    assert len(ds) == 2  # one ref with two sentences
    s = ds[0]
    assert s["expression"] == "man on the left"
    assert s["sentences"] == ["man on the left", "left guy in red"]
    assert s["tokens"] == ["man", "on", "the", "left"]
    assert (s["ref_id"], s["ann_id"], s["image_id"], s["category_id"]) == (0, 1, 581857, 1)
    assert s["image"].shape == (3, 30, 40) and s["image"].dtype == torch.float32
    assert s["ref_mask"].dtype == torch.bool and s["ref_mask"].shape == (30, 40)
    assert np.array_equal(s["ref_mask"].numpy(), _rect(30, 40, 4, 6, 16, 16))
    assert s["bbox"].tolist() == [4.0, 6.0, 16.0, 16.0]  # xyxy
    assert ds[1]["expression"] == "left guy in red" and ds[1]["ref_id"] == 0


def test_rle_mask_decoded(root):
    ds = RefCOCO(root, "refcoco", "val")
    s = ds[0]
    assert s["expression"] == "brown dog" and s["image"].shape == (3, 24, 36)
    assert np.array_equal(s["ref_mask"].numpy(), fixtures.blob_mask(24, 36, seed=7))


def test_multi_part_mask_is_union(root):
    s = RefCOCO(root, "refcoco", "testA")[0]
    want = _rect(30, 40, 20, 2, 26, 8) | _rect(30, 40, 30, 12, 36, 22)
    assert np.array_equal(s["ref_mask"].numpy(), want)


def test_splits_per_partition(root):
    assert [len(RefCOCO(root, "refcoco+", sp)) for sp in ("train", "val", "testA", "testB")] == [
        2, 1, 1, 1]
    g = RefCOCO(root, "refcocog", "test")
    assert g.split_by == "umd" and len(g) == 1
    with pytest.raises(ValueError, match="Did you mean 'testA'"):
        RefCOCO(root, "refcoco", "testa")
    with pytest.raises(ValueError, match="'val'"):
        RefCOCO(root, "refcocog", "testA")
    with pytest.raises(ValueError, match="Did you mean 'refcocog'"):
        RefCOCO(root, "refcocoG", "val")


def test_transform_moves_mask_and_box_together(root):
    ds = RefCOCO(root, "refcoco", "train", transform=restr_transform(60))
    s = ds[0]
    assert s["image"].shape == (3, 60, 60) and s["ref_mask"].shape == (60, 60)
    ys, xs = torch.nonzero(s["ref_mask"], as_tuple=True)
    box = s["bbox"]
    # the resized mask lies inside the resized box (60/40 wide, 60/30 high)
    assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1
    assert box.tolist() == pytest.approx([6.0, 12.0, 24.0, 32.0])


def test_missing_refs_pickle_and_images(tmp_path):
    fixtures.make_refcoco(tmp_path, "refcoco")
    with pytest.raises(DatasetNotFound, match=r"refs\(google\).p is missing.*refs\(unc\).p"):
        RefCOCO(tmp_path, "refcoco", "train", split_by="google")
    import shutil

    shutil.rmtree(tmp_path / "images")
    with pytest.raises(DatasetNotFound, match="vitseg-lab data download coco2014"):
        RefCOCO(tmp_path, "refcoco", "train")


def test_refs_missing_key_and_bad_instances(tmp_path):
    fixtures.make_refcoco(tmp_path, "refcoco")
    p = tmp_path / "refcoco" / "refs(unc).p"
    refs = pickle.loads(p.read_bytes())
    del refs[2]["ann_id"]
    p.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(DataFormatError, match="entry 2 lacks the key 'ann_id'"):
        RefCOCO(tmp_path, "refcoco", "train")
    fixtures.make_refcoco(tmp_path, "refcoco")
    inst = tmp_path / "refcoco" / "instances.json"
    obj = json.loads(inst.read_text())
    del obj["annotations"]
    inst.write_text(json.dumps(obj))
    with pytest.raises(DataFormatError, match="lacks the key 'annotations'"):
        RefCOCO(tmp_path, "refcoco", "train")
    p.write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match="not a readable refs pickle"):
        RefCOCO(tmp_path, "refcoco", "train")
