"""COCO 2014 zero-shot splits: class lists, word vectors, instances from the split JSONs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitseg_lab.data import fixtures
from vitseg_lab.data.coco_zsi import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    COCOZeroShot,
    make_split,
    zsi_split,
)
from vitseg_lab.data.common import DataFormatError, DatasetNotFound
from vitseg_lab.data.transforms import zsi_train_transform


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("zsi")
    fixtures.make_coco_zsi(r, "48_17")
    fixtures.make_coco_zsi(r, "65_15")
    return r


def test_split_class_lists():
    s48, s65 = zsi_split("48_17"), zsi_split("65/15")
    assert (len(s48.seen), len(s48.unseen), len(s65.seen), len(s65.unseen)) == (48, 17, 65, 15)
    for sp in (s48, s65):
        assert not set(sp.seen) & set(sp.unseen)
        ids = [COCO_CATEGORY_IDS[COCO_CLASSES.index(n)] for n in sp.class_names]
        k = len(sp.seen)
        assert ids[:k] == sorted(ids[:k]) and ids[k:] == sorted(ids[k:])  # COCO id order
    assert set(s65.seen) | set(s65.unseen) == set(COCO_CLASSES)
    assert "cat" in s48.unseen and "cat" in s65.unseen and "hair drier" in s65.unseen
    assert len(set(s48.seen) | set(s48.unseen)) == 65


def test_unknown_class_name_suggests():
    with pytest.raises(ValueError, match="'umbrela'.*not a COCO class.*'umbrella'"):
        make_split("mine", ["person"], ["umbrela"])
    with pytest.raises(ValueError, match="both seen and unseen"):
        make_split("mine", ["person", "dog"], ["dog"])
    sp = make_split("mine", ["hot_dog", "person"], ["Hair Drier"])
    assert sp.seen == ("person", "hot dog") and sp.unseen == ("hair drier",)


def test_train_subset_contract(root):
    ds = COCOZeroShot(root, "48_17", "train_seen")
    assert len(ds) == 1  # the image with only a crowd annotation is filtered for training
    s = ds[0]
    assert s["image"].shape == (3, 32, 40) and s["image"].dtype == torch.float32
    m, b, lab = s["instance_masks"], s["boxes"], s["instance_labels"]
    assert m.shape == (2, 32, 40) and m.dtype == torch.bool
    assert b.shape == (2, 4) and b.dtype == torch.float32
    assert lab.dtype == torch.int64 and lab.tolist() == [0, 1]  # person, bicycle (seen order)
    assert b[0].tolist() == [3.0, 4.0, 15.0, 12.0]
    want = np.zeros((32, 40), bool)
    want[4:12, 3:15] = True
    assert np.array_equal(m[0].numpy(), want)
    assert np.array_equal(m[1].numpy(), fixtures.blob_mask(32, 40, seed=2))  # compressed RLE
    assert ds.class_names[:2] == ("person", "bicycle")


def test_unseen_labels_index_the_full_class_list(root):
    ds = COCOZeroShot(root, "65_15", "val_unseen")
    s = ds[0]
    k = s["instance_labels"].item()
    assert ds.class_names[k] == ds.unseen_class_names[0] == "airplane" and k == 65
    assert ds.seen_mask.sum() == 65 and not ds.seen_mask[k]
    gz = COCOZeroShot(root, "65_15", "val_gzsi")[0]["instance_labels"].tolist()
    assert gz == [0, 65]
    assert len(COCOZeroShot(root, "48_17", "val_seen")) == 2  # eval keeps every image


def test_word_vectors_transposed(root):
    ds = COCOZeroShot(root, "48_17", "val_seen")
    v = ds.class_vectors
    assert v.shape == (65, 300) and v.dtype == torch.float32
    # fixture: column c of the file holds c + row/1000; column 0 is the background
    for k in (0, 47, 48, 64):
        assert v[k, 0].item() == pytest.approx(k + 1) and v[k, 299].item() == pytest.approx(
            k + 1 + 0.299)
    assert ds.background_vector.shape == (300,) and ds.background_vector[5] == pytest.approx(0.005)
    assert COCOZeroShot(root, "65_15", "val_seen").class_vectors.shape == (80, 300)


def test_transform_flips_boxes_with_masks(root):
    torch.manual_seed(0)
    t = zsi_train_transform(scale=(80, 64), flip_prob=1.0)
    s = COCOZeroShot(root, "48_17", "train_seen", transform=t)[0]
    assert s["image"].shape == (3, 64, 80)
    for mask, box in zip(s["instance_masks"], s["boxes"], strict=True):
        xs = torch.nonzero(mask, as_tuple=True)[1]
        assert abs(xs.min().item() - box[0].item()) <= 2
        assert abs(xs.max().item() + 1 - box[2].item()) <= 2
    assert s["boxes"][0].tolist() == pytest.approx([80 - 30.0, 8.0, 80 - 6.0, 24.0])


def test_bad_inputs(tmp_path):
    fixtures.make_coco_zsi(tmp_path, "48_17")
    ann = tmp_path / "coco" / "annotations" / "instances_val2014_unseen_48_17.json"
    obj = json.loads(ann.read_text())
    obj["categories"][0]["name"] = "sofa_bed"
    ann.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="'sofa_bed'.*not a class of split 48_17"):
        COCOZeroShot(tmp_path, "48_17", "val_unseen")
    del obj["categories"]
    ann.write_text(json.dumps(obj))
    with pytest.raises(DataFormatError, match="lacks the key 'categories'"):
        COCOZeroShot(tmp_path, "48_17", "val_unseen")
    ann.unlink()
    with pytest.raises(DatasetNotFound, match="Google Drive"):
        COCOZeroShot(tmp_path, "48_17", "val_unseen")
    w2v = tmp_path / "coco" / "word_w2v_withbg_48_17.txt"
    w2v.write_text("\n".join(",".join(["0.1"] * 81) for _ in range(300)))
    ds = COCOZeroShot(tmp_path, "48_17", "val_seen")
    with pytest.raises(DataFormatError, match="300x81.*300 rows x 66 columns"):
        _ = ds.class_vectors
    with pytest.raises(ValueError, match="Did you mean 'val_unseen'"):
        COCOZeroShot(tmp_path, "48_17", "val_unsen")
    with pytest.raises(ValueError, match="ann_file="):
        COCOZeroShot(tmp_path, make_split("x", ["person"], ["cat"]), "val_seen")
