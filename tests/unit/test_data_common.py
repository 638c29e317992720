"""vitseg_lab.data.common: data root, reading files with clear errors, COCO masks, collate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitseg_lab.data import common
from vitseg_lab.data.common import (
    DataFormatError,
    DatasetNotFound,
    check_choice,
    collate,
    data_root,
    decode_coco_segmentation,
    read_image,
    read_json,
    read_label_png,
)
from vitseg_lab.data.fixtures import blob_mask, rle_counts


# data_root ---------------------------------------------------------------------------------------
def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSEG_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("VITSEG_DATA")
    default = data_root()
    assert default.name == "data"
    assert (default.parent / "vitseg_lab").is_dir()  # the repository's data/ folder


def test_data_root_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_root("~/sets") == tmp_path / "sets"


# read_image --------------------------------------------------------------------------------------
def _jpeg(path, h=12, w=16, mode="RGB"):
    arr = (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, quality=95)
    return arr


def test_read_image_shape_dtype_and_values(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.shape == (3, 7, 9) and img.dtype == torch.uint8
    # naive: channel c of pixel (y, x) is arr[y, x, c]
    for y in range(7):
        for x in range(9):
            for c in range(3):
                assert img[c, y, x].item() == arr[y, x, c]


def test_read_image_grayscale_becomes_rgb(tmp_path):
    _jpeg(tmp_path / "g.jpg", mode="L")
    img = read_image(tmp_path / "g.jpg")
    assert img.shape[0] == 3 and torch.equal(img[0], img[1])


def test_read_image_missing_names_path(tmp_path):
    with pytest.raises(DatasetNotFound, match="missing") as e:
        read_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(e.value) and "verify" in str(e.value)


def test_read_image_truncated_and_garbage(tmp_path):
    _jpeg(tmp_path / "t.jpg", 64, 64)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="corrupt or truncated") as e:
        read_image(tmp_path / "t.jpg")
    assert "t.jpg" in str(e.value)
    (tmp_path / "x.jpg").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataFormatError, match="x.jpg"):
        read_image(tmp_path / "x.jpg")


# read_label_png ----------------------------------------------------------------------------------
def test_palette_png_is_read_as_indices(tmp_path):
    lab = np.array([[0, 1, 255], [1, 0, 255]], dtype=np.uint8)
    im = Image.frombytes("P", (3, 2), lab.tobytes())
    im.putpalette([255, 0, 0] * 256)  # every index has the same colour: only indices can tell
    im.save(tmp_path / "p.png")
    out = read_label_png(tmp_path / "p.png")
    assert out.dtype == np.uint8 and np.array_equal(out, lab)


def test_rgb_label_png_is_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataFormatError, match="colour image.*class indices"):
        read_label_png(tmp_path / "rgb.png")


def test_corrupt_png(tmp_path):
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataFormatError, match="c.png"):
        read_label_png(tmp_path / "c.png")


# read_json ---------------------------------------------------------------------------------------
def test_read_json_missing_key_is_one_clear_sentence(tmp_path):
    (tmp_path / "i.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataFormatError) as e:
        read_json(tmp_path / "i.json", ("images", "annotations"))
    msg = str(e.value)
    assert "'annotations'" in msg and "i.json" in msg and not isinstance(e.value, KeyError)
    assert msg.count(". ") == 0  # one sentence


def test_read_json_invalid(tmp_path):
    (tmp_path / "b.json").write_text('{"images": [')
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_json(tmp_path / "b.json")
    with pytest.raises(DatasetNotFound):
        read_json(tmp_path / "none.json")


def test_check_choice_suggests_close_matches():
    assert check_choice("val", ["train", "val"], "split") == "val"
    with pytest.raises(ValueError, match="Did you mean 'testA'"):
        check_choice("testa", ["train", "val", "testA", "testB"], "split")


# COCO segmentation decoding against naive rasterisations ----------------------------------------
def _naive_polygon(poly, h, w):
    """Even-odd rule at pixel centres: the way a polygon's area is meant."""
    xs, ys = poly[0::2], poly[1::2]
    out = np.zeros((h, w), bool)
    n = len(xs)
    for y in range(h):
        for x in range(w):
            px, py, inside = x + 0.5, y + 0.5, False
            for i in range(n):
                x1, y1, x2, y2 = xs[i], ys[i], xs[(i + 1) % n], ys[(i + 1) % n]
                if (y1 > py) != (y2 > py) and px < x1 + (py - y1) * (x2 - x1) / (y2 - y1):
                    inside = not inside
            out[y, x] = inside
    return out


def _naive_rle_decode(counts, h, w):
    flat, v = [], 0
    for c in counts:
        flat += [v] * c
        v = 1 - v
    return np.array(flat, bool).reshape((h, w), order="F")


def test_polygon_rectangle_matches_naive_exactly():
    poly = [2.0, 3.0, 9.0, 3.0, 9.0, 7.0, 2.0, 7.0]
    m = decode_coco_segmentation([poly], 10, 12)
    assert m.dtype == bool and m.shape == (10, 12)
    assert np.array_equal(m, _naive_polygon(poly, 10, 12))


def test_polygon_triangle_close_to_naive():
    poly = [1.0, 1.0, 20.0, 4.0, 6.0, 17.0]
    m = decode_coco_segmentation([poly], 19, 23)
    ref = _naive_polygon(poly, 19, 23)
    iou = (m & ref).sum() / (m | ref).sum()
    assert iou > 0.85


def test_multi_part_polygons_are_merged():
    a, b = [0, 0, 4, 0, 4, 4, 0, 4], [6, 6, 9, 6, 9, 9, 6, 9]
    m = decode_coco_segmentation([a, b], 10, 10)
    assert np.array_equal(m, _naive_polygon(a, 10, 10) | _naive_polygon(b, 10, 10))


def test_uncompressed_and_compressed_rle():
    src = blob_mask(13, 17, seed=3)
    counts = rle_counts(src)
    assert np.array_equal(_naive_rle_decode(counts, 13, 17), src)  # the fixture's encoder
    m = decode_coco_segmentation({"size": [13, 17], "counts": counts}, 13, 17)
    assert np.array_equal(m, src)
    from pycocotools import mask as mu

    rle = mu.encode(np.asfortranarray(src.astype(np.uint8)))
    rle_str = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    assert np.array_equal(decode_coco_segmentation(rle_str, 13, 17), src)


def test_bad_segmentation_is_clear():
    with pytest.raises(DataFormatError, match="cannot be decoded"):
        decode_coco_segmentation({"bogus": 1}, 4, 4, where="annotation 7")
    with pytest.raises(DataFormatError, match="annotation 7"):
        decode_coco_segmentation([[1, 2]], 4, 4, where="annotation 7")
    with pytest.raises(DataFormatError, match="does not match"):
        decode_coco_segmentation({"size": [3, 3], "counts": [9]}, 4, 4)


# finish_sample / collate -------------------------------------------------------------------------
def test_collate_stacks_equal_shapes_and_keeps_lists():
    b = [{"image": torch.zeros(3, 4, 5), "boxes": torch.zeros(k, 4), "expression": f"e{k}",
          "ref_id": k} for k in (1, 2)]
    out = collate(b)
    assert out["image"].shape == (2, 3, 4, 5)
    assert isinstance(out["boxes"], list) and [t.shape[0] for t in out["boxes"]] == [1, 2]
    assert out["expression"] == ["e1", "e2"] and torch.equal(out["ref_id"], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_finish_sample_dtypes():
    from torchvision import tv_tensors

    s = common.finish_sample({
        "image": tv_tensors.Image(torch.full((3, 2, 2), 255, dtype=torch.uint8)),
        "semantic": tv_tensors.Mask(torch.tensor([[0, 255], [3, 1]], dtype=torch.uint8)),
        "ref_mask": tv_tensors.Mask(torch.tensor([[0, 1], [255, 1]], dtype=torch.uint8)),
    })
    assert s["image"].dtype == torch.float32 and s["image"].max() == 1.0
    assert s["semantic"].dtype == torch.int64 and s["semantic"][0, 1] == 255
    assert s["ref_mask"].tolist() == [[False, True], [False, True]]  # padding (255) is not object
