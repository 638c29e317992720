"""The papers' transform recipes: joint image/mask/box geometry, mmseg's rules, photometrics."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from vitseg_lab.data import transforms as T


def _sample(h=60, w=90, classes=5):
    """An image whose red channel encodes the mask's class (class * 40), in big blocks."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    lab = ((yy // 20) * 3 + xx // 20) % classes
    img = torch.stack([lab * 40, torch.full_like(lab, 7), torch.full_like(lab, 9)]).to(torch.uint8)
    return {"image": tv_tensors.Image(img), "semantic": tv_tensors.Mask(lab.to(torch.uint8)),
            "valid": tv_tensors.Mask(torch.ones(h, w, dtype=torch.uint8))}


def _agreement(out):
    img, lab = out["image"][0].long(), out["semantic"].long()
    real = lab != 255
    near = torch.round(img.float() / 40).long()  # the class the image colour is closest to
    return (near[real] == lab[real]).float().mean().item(), img, lab, real


def test_keep_ratio_size_matches_mmcv_rule():
    def naive(h, w, scale):
        best = None
        for f in np.linspace(0.01, 10, 100000):  # the largest factor inside both limits
            if max(h, w) * f <= max(scale) + 1e-9 and min(h, w) * f <= min(scale) + 1e-9:
                best = f
        return round(h * best), round(w * best)

    for h, w, scale in [(300, 500, (1333, 800)), (480, 640, (2048, 640)), (1000, 200, (2048, 512))]:
        got = T._keep_ratio_size(h, w, scale)
        want = naive(h, w, scale)
        assert abs(got[0] - want[0]) <= 1 and abs(got[1] - want[1]) <= 1


def test_mmseg_random_resize_bounds_and_aspect():
    torch.manual_seed(0)
    t = T.MMSegRandomResize((2048, 640), (0.5, 2.0))
    for _ in range(20):
        h, w = t._size(480, 640)
        assert abs(w / h - 640 / 480) < 0.01
        assert 0.5 * 640 - 1 <= h <= 2.0 * 640 + 1
    fixed = T.MMSegRandomResize((2048, 640), (1.0, 1.0))
    assert fixed._size(480, 640) == T.KeepRatioResize((2048, 640))._size(480, 640) == (640, 853)


@pytest.mark.parametrize("make", [
    lambda: T.segvit_train_transform(crop=48, scale=(160, 48), photometric=False),
    lambda: T.afa_train_transform(crop=48),
    lambda: T.restr_transform(40),
    lambda: T.zsi_train_transform((120, 80)),
])
def test_recipes_move_image_and_mask_together(make):
    torch.manual_seed(1)
    t = make()
    for _ in range(5):
        out = t(_sample())
        frac, img, _, real = _agreement(out)
        assert frac > 0.85  # nearest-resized mask vs bilinear image: only block borders differ
        assert out["image"].dtype == torch.uint8 and out["semantic"].shape == out["image"].shape[1:]
        assert (img[~real] == 0).all()  # padding: image 0, mask 255
        assert torch.equal(out["valid"] == 1, real)  # no 255 in the source mask
        flipped = dict(out, semantic=out["semantic"].flip(-1))  # negative control
        assert _agreement(flipped)[0] < 0.6


def test_segvit_output_size_and_padding():
    torch.manual_seed(0)
    t = T.segvit_train_transform(crop=64, scale=(128, 32), photometric=True)
    out = t(_sample(40, 50))
    assert out["image"].shape == (3, 64, 64) and out["semantic"].shape == (64, 64)
    assert (out["semantic"] == 255).any()  # a small image gets padded bottom/right
    assert (out["semantic"][-1] == 255).all() and (out["semantic"][:, -1] == 255).all()


def test_cat_ratio_rule_naive():
    def naive(win, ratio):
        vals = [v for v in win.flatten().tolist() if v != 255]
        counts = {v: vals.count(v) for v in set(vals)}
        return len(counts) > 1 and max(counts.values()) / sum(counts.values()) < ratio

    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        win = torch.randint(0, 3, (6, 6), generator=g)
        win[torch.rand(6, 6, generator=g) < 0.3] = 255
        assert T._cat_ratio_ok(win, 0.75, 255) == naive(win, 0.75)


def test_cat_max_ratio_crop_avoids_dominant_class():
    lab = torch.ones(100, 100, dtype=torch.uint8)
    lab[:, 80:] = 2
    s = {"image": tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8)),
         "semantic": tv_tensors.Mask(lab)}
    torch.manual_seed(0)
    crop = T.CatMaxRatioCrop(50, 0.75, tries=200)
    for _ in range(10):
        win = crop(s)["semantic"]
        assert win.shape == (50, 50) and (win == 1).float().mean() < 0.75


def test_random_pad_crop_places_small_image():
    torch.manual_seed(0)
    s = _sample(10, 12)
    out = T.RandomPadCrop(32)(s)
    assert out["image"].shape == (3, 32, 32)
    assert (out["valid"] == 1).sum() == 120 and (out["semantic"] != 255).sum() == 120
    ys, xs = torch.nonzero(out["valid"] == 1, as_tuple=True)
    assert ys.max() - ys.min() == 9 and xs.max() - xs.min() == 11  # one intact block


def test_photometric_maths_against_colorsys():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    img = tv_tensors.Image(torch.from_numpy(arr))
    t = T.PhotoMetricDistortion()
    base = {"brightness": None, "contrast_first": True, "contrast": None, "saturation": None,
            "hue": None}
    out = t.transform(img, {**base, "brightness": 20.0, "contrast": 1.2}).numpy().astype(float)
    assert np.abs(out - np.clip(np.clip(arr + 20.0, 0, 255) * 1.2, 0, 255)).max() <= 0.5
    for key, val in (("saturation", 1.4), ("hue", 12)):
        got = t.transform(img, {**base, key: val}).numpy().astype(float)
        want = np.zeros_like(got)
        for y in range(4):
            for x in range(5):
                hh, ss, vv = colorsys.rgb_to_hsv(*(arr[:, y, x] / 255.0))
                if key == "saturation":
                    ss = min(ss * val, 1.0)
                else:
                    hh = (hh + val / 180.0) % 1.0
                want[:, y, x] = np.array(colorsys.hsv_to_rgb(hh, ss, vv)) * 255
        assert np.abs(got - want).max() <= 2.0, key
    mask = tv_tensors.Mask(torch.ones(4, 5, dtype=torch.uint8))
    assert t.transform(mask, {**base, "brightness": 20.0}) is mask


def test_seeded_runs_repeat():
    t = T.segvit_train_transform(crop=32, scale=(96, 32))
    torch.manual_seed(5)
    a = t(_sample())
    torch.manual_seed(5)
    b = t(_sample())
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["semantic"], b["semantic"])


def test_eval_transform():
    s = _sample(30, 40)
    assert torch.equal(T.eval_transform()(s)["image"], s["image"])
    assert T.eval_transform((80, 60))(s)["image"].shape == (3, 60, 80)
    assert set(T.NORMALIZATION) >= {"segvit", "afa", "zsi"}
