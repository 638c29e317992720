"""ShapeScenes: field contract, determinism, label consistency against naive loops, errors."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.ops import masks_to_boxes

from vitseg_lab.data.shapes import COLORS, IGNORE_INDEX, MAX_OBJECTS, SHAPES, ShapeScenes

FIELDS = (
    "image",
    "semantic",
    "instance_masks",
    "instance_labels",
    "boxes",
    "labels",
    "expression",
    "ref_index",
    "ref_mask",
    "index",
)


@pytest.fixture(scope="module")
def default() -> ShapeScenes:
    return ShapeScenes(48, seed=3)


@pytest.fixture(scope="module")
def crowded() -> ShapeScenes:
    # Another size, every colour and shape, more objects: more occlusion and more same-class pairs.
    return ShapeScenes(
        24, size=40, colors=tuple(COLORS), shapes=SHAPES, min_objects=3, max_objects=6, seed=1
    )


@pytest.fixture(scope="module")
def ambiguous() -> ShapeScenes:
    # Four classes, up to six objects: most scenes repeat a class, so expressions need modifiers.
    return ShapeScenes(
        64,
        colors=("red", "green"),
        shapes=("circle", "square"),
        min_objects=3,
        max_objects=6,
        seed=2,
    )


@pytest.fixture(params=["default", "crowded"])
def scenes(request) -> ShapeScenes:
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------------ field contract
def test_fields_shapes_dtypes(scenes):
    S, K = scenes.size, scenes.num_classes
    for i in range(len(scenes)):
        s = scenes[i]
        assert set(s) == set(FIELDS)
        n = len(s["instance_labels"])
        assert scenes.min_objects <= n <= scenes.max_objects
        assert s["image"].shape == (3, S, S) and s["image"].dtype == torch.float32
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert s["semantic"].shape == (S, S) and s["semantic"].dtype == torch.int64
        assert set(s["semantic"].unique().tolist()) <= set(range(K)) | {IGNORE_INDEX}
        assert s["instance_masks"].shape == (n, S, S) and s["instance_masks"].dtype == torch.bool
        assert s["instance_labels"].shape == (n,) and s["instance_labels"].dtype == torch.int64
        assert ((s["instance_labels"] >= 1) & (s["instance_labels"] < K)).all()
        assert s["boxes"].shape == (n, 4) and s["boxes"].dtype == torch.float32
        assert s["labels"].shape == (K - 1,) and s["labels"].dtype == torch.float32
        assert isinstance(s["expression"], str) and s["expression"].startswith("the ")
        assert isinstance(s["ref_index"], int) and 0 <= s["ref_index"] < n
        assert s["ref_mask"].shape == (S, S) and s["ref_mask"].dtype == torch.bool
        assert s["index"] == i


def test_class_bookkeeping():
    ds = ShapeScenes(
        4,
        colors=("cyan", "red"),
        shapes=("cross", "circle", "square"),
        unseen=("red circle", "cyan cross"),
    )
    assert ds.class_names == [
        "background",
        "cyan cross",
        "cyan circle",
        "cyan square",
        "red cross",
        "red circle",
        "red square",
    ]
    assert ds.num_classes == 7 and ds.ignore_index == 255
    assert ds.unseen_class_ids == [1, 5] and ds.seen_class_ids == [2, 3, 4, 6]
    assert [ds.class_id(name) for name in ds.class_names] == list(range(7))
    with pytest.raises(ValueError, match="valid names are: background, cyan cross"):
        ds.class_id("blue circle")


def test_class_vectors_from_attributes():
    ds = ShapeScenes(4, colors=("red", "green", "yellow", "blue"), shapes=("circle", "triangle"))
    vec = ds.class_vectors()
    D = len(ds.colors) + len(ds.shapes) + 1
    assert vec.shape == (ds.num_classes, D) and vec.dtype == torch.float32
    assert len(ds.attribute_names) == D
    assert len({tuple(row.tolist()) for row in vec}) == ds.num_classes  # distinct per class
    assert vec[0].tolist() == [0.0] * (D - 1) + [1.0]  # background: the flag alone
    for k, name in enumerate(ds.class_names[1:], start=1):  # naive: read the name's two words
        colour, shape = name.split()
        expected = [float(a in (colour, shape)) for a in ds.attribute_names]
        assert vec[k].tolist() == expected, name


# --------------------------------------------------------------------------------- determinism
def _assert_same(a: dict, b: dict):
    for k in FIELDS:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_deterministic_regardless_of_order_and_cache():
    a = ShapeScenes(20, seed=7)
    b = ShapeScenes(20, seed=7, cache=False)
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    for x, y in zip(forward, backward):
        _assert_same(x, y)
    _assert_same(a[5], b[5])  # cached access, fresh generation
    other = ShapeScenes(20, seed=8)
    assert all(not torch.equal(a[i]["image"], other[i]["image"]) for i in range(20))
    # Scene i does not depend on n.
    _assert_same(ShapeScenes(3, seed=7)[2], forward[2])


def test_cached_scene_survives_in_place_edits():
    ds = ShapeScenes(2)
    first = ds[0]
    reference = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in first.items()}
    first["image"].zero_()
    first["semantic"].fill_(3)
    first["instance_masks"].fill_(False)
    _assert_same(ds[0], reference)


def test_dataloader_workers_see_the_same_scenes():
    ds = ShapeScenes(12, seed=4)
    loader = DataLoader(
        ds,
        batch_size=4,
        num_workers=2,
        collate_fn=ShapeScenes.collate,
        multiprocessing_context="fork",
    )
    batches = list(loader)
    fresh = ShapeScenes(12, seed=4)
    for b, batch in enumerate(batches):
        for j in range(4):
            i = 4 * b + j
            assert batch["index"][j].item() == i
            assert torch.equal(batch["image"][j], fresh[i]["image"])
            assert torch.equal(batch["instance_masks"][j], fresh[i]["instance_masks"])
            assert batch["expression"][j] == fresh[i]["expression"]


# ------------------------------------------------------------------------ label consistency
def _naive_semantic(masks: torch.Tensor, labels: torch.Tensor, ring: bool) -> torch.Tensor:
    """Paint with loops: instance k is drawn k-th, a pixel is ignore when a 4-neighbour belongs to
    an earlier-drawn region (background counts as drawn first)."""
    N, H, W = masks.shape
    order = torch.zeros(H, W, dtype=torch.int64)
    for k in range(N):
        for y, x in masks[k].nonzero().tolist():
            assert order[y, x] == 0, "instance masks overlap"
            order[y, x] = k + 1
    sem = torch.zeros(H, W, dtype=torch.int64)
    for y in range(H):
        for x in range(W):
            r = order[y, x].item()
            if r == 0:
                continue
            sem[y, x] = labels[r - 1]
            nbrs = [(y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)]
            if ring and any(0 <= v < H and 0 <= u < W and order[v, u] < r for v, u in nbrs):
                sem[y, x] = IGNORE_INDEX
    return sem


def test_semantic_matches_instances_naive_loops(scenes):
    for i in range(6):
        s = scenes[i]
        expected = _naive_semantic(s["instance_masks"], s["instance_labels"], ring=True)
        assert torch.equal(s["semantic"], expected), i
        union = s["instance_masks"].any(0)
        assert (s["semantic"][~union] == 0).all()
        for m, label in zip(s["instance_masks"], s["instance_labels"]):
            inside = s["semantic"][m]
            assert ((inside == label) | (inside == IGNORE_INDEX)).all()
            assert (inside == label).any()  # something left to learn besides the outline


def test_semantic_without_boundary_ignore():
    ds = ShapeScenes(6, size=36, boundary_ignore=False, max_objects=4, seed=5)
    for s in ds:
        assert (s["semantic"] != IGNORE_INDEX).all()
        expected = _naive_semantic(s["instance_masks"], s["instance_labels"], ring=False)
        assert torch.equal(s["semantic"], expected)


def test_instances_visible_and_sized(scenes):
    S = scenes.size
    for s in scenes:
        masks = s["instance_masks"]
        assert (masks.sum(0) <= 1).all()  # visible parts never overlap
        assert (masks.flatten(1).sum(1) >= 12).all()  # tiny leftovers are dropped
        span = s["boxes"][:, 2:] - s["boxes"][:, :2] + 1
        assert (span <= 28 / 64 * S + 1).all()


def test_same_colour_objects_never_touch():
    # Touching same-coloured shapes would merge into one blob whose instance split is invisible.
    ds = ShapeScenes(32, colors=("red", "blue"), min_objects=4, max_objects=6, seed=6)
    for s in ds:
        masks, labels = s["instance_masks"], s["instance_labels"].tolist()
        for a in range(len(labels)):
            ys, xs = masks[a].nonzero(as_tuple=True)
            for b in range(len(labels)):
                if a == b or ds.class_names[labels[a]][:4] != ds.class_names[labels[b]][:4]:
                    continue
                for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                    v, u = (ys + dy).clamp(0, ds.size - 1), (xs + dx).clamp(0, ds.size - 1)
                    assert not masks[b][v, u].any(), (s["index"], a, b)


def test_boxes_tightly_bound_masks(scenes):
    for s in scenes:
        torch.testing.assert_close(s["boxes"], masks_to_boxes(s["instance_masks"]))


def test_image_level_labels_are_the_instance_classes(scenes):
    for s in scenes:
        expected = torch.zeros(scenes.num_classes - 1)
        for c in s["instance_labels"].tolist():
            expected[c - 1] = 1.0
        assert torch.equal(s["labels"], expected)


def test_objects_wear_their_colour(scenes):
    # The image is what the labels say: each instance's mean colour is nearest its own colour.
    palette = torch.tensor(list(COLORS.values()))
    for s in list(scenes)[:8]:
        for m, c in zip(s["instance_masks"], s["instance_labels"]):
            mean = s["image"][:, m].mean(1)
            mean = mean / mean.norm()
            nearest = list(COLORS)[(palette / palette.norm(dim=1, keepdim=True) @ mean).argmax()]
            assert scenes.class_names[c].split()[0] == nearest


# ------------------------------------------------------------------------- referring expressions
_EXPR = re.compile(
    r"^the (?:(?P<pre>leftmost|rightmost|topmost|bottommost|largest|smallest|larger|smaller) )?"
    r"(?P<colour>\w+) (?P<shape>\w+)(?: (?P<post>on the left|on the right|at the top|at the bottom))?$"
)


def _resolve(expression: str, s: dict, ds: ShapeScenes) -> list[int]:
    """Independent reader of an expression: the indices of every instance it describes."""
    m = _EXPR.match(expression)
    assert m, f"unexpected expression {expression!r}"
    target = ds.class_id(f"{m['colour']} {m['shape']}")
    cands = [k for k, c in enumerate(s["instance_labels"].tolist()) if c == target]
    modifier = m["pre"] or m["post"]
    if modifier is None:
        return cands
    pair = modifier in ("larger", "smaller") or modifier.startswith(("on ", "at "))
    # "on the left"/"larger" compare two instances, "leftmost"/"largest" three or more.
    assert len(cands) == 2 if pair else len(cands) >= 3, expression
    masks = s["instance_masks"].float()
    area = masks.sum((1, 2))
    ys, xs = torch.meshgrid(torch.arange(ds.size), torch.arange(ds.size), indexing="ij")
    cx, cy = (masks * xs).sum((1, 2)) / area, (masks * ys).sum((1, 2)) / area
    key = {"left": cx, "right": -cx, "top": cy, "bottom": -cy, "small": area, "larg": -area}
    score = next(v for word, v in key.items() if word in modifier)
    return [k for k in cands if all(score[k] < score[j] for j in cands if j != k)]


@pytest.mark.parametrize("name", ["default", "crowded", "ambiguous"])
def test_expression_names_its_instance_uniquely(name, request):
    ds = request.getfixturevalue(name)
    kinds = {"plain": 0, "pair": 0, "superlative": 0}
    for s in ds:
        expr, k = s["expression"], s["ref_index"]
        assert torch.equal(s["ref_mask"], s["instance_masks"][k])
        assert ds.class_names[s["instance_labels"][k]] in expr
        assert _resolve(expr, s, ds) == [k], expr
        assert set(expr.split()) <= set(ds.vocabulary)
        words = expr.split()
        plain = len(words) == 3
        kinds["plain" if plain else "superlative" if words[1].endswith("st") else "pair"] += 1
    if name == "ambiguous":
        assert min(kinds.values()) >= 5, kinds  # every branch really ran


# ---------------------------------------------------------------------------------- zero-shot
def test_exclude_unseen_really_excludes():
    unseen = ("blue triangle", "red square", "green circle")
    train = ShapeScenes(96, unseen=unseen, exclude_unseen=True, max_objects=4)
    ids = train.unseen_class_ids
    assert sorted(ids + train.seen_class_ids) == list(range(1, train.num_classes))
    for s in train:
        assert not any(c in ids for c in s["instance_labels"].tolist())
        assert not any(c in ids for c in s["semantic"].unique().tolist())
        assert s["labels"][[c - 1 for c in ids]].sum() == 0
    # Without the flag the same classes do appear, so the check above can fail.
    full = ShapeScenes(96, unseen=unseen, max_objects=4)
    assert full.class_names == train.class_names
    assert any(c in ids for s in full for c in s["instance_labels"].tolist())


# ------------------------------------------------------------------------------------ collate
def test_collate():
    ds = ShapeScenes(8, size=48)
    batch = ShapeScenes.collate([ds[i] for i in (2, 5, 7)])
    assert batch["image"].shape == (3, 3, 48, 48)
    assert batch["semantic"].shape == (3, 48, 48) and batch["semantic"].dtype == torch.int64
    assert batch["labels"].shape == (3, ds.num_classes - 1)
    assert batch["ref_mask"].shape == (3, 48, 48) and batch["ref_mask"].dtype == torch.bool
    assert batch["index"].tolist() == [2, 5, 7]
    for k in ("instance_masks", "instance_labels", "boxes", "expression", "ref_index"):
        assert isinstance(batch[k], list) and len(batch[k]) == 3
    assert torch.equal(batch["instance_masks"][1], ds[5]["instance_masks"])
    with pytest.raises(ValueError, match="empty batch"):
        ShapeScenes.collate([])


def test_indexing_and_repr():
    ds = ShapeScenes(5, unseen=("red circle",))
    assert len(ds) == 5 and len(list(ds)) == 5
    _assert_same(ds[-1], ds[4])
    assert ds[torch.tensor(3)]["index"] == 3
    with pytest.raises(IndexError):
        ds[5]
    text = repr(ds)
    assert text.startswith("ShapeScenes(n=5, size=64") and "red circle" in text


# ------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"colors": ("red", "teal")}, "choose colors from red, green"),
        ({"shapes": ("circle", "hexagon")}, "choose shapes from circle"),
        ({"colors": ()}, "at least one name"),
        ({"colors": ("red", "red")}, "give each name once"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects <= max_objects"),
        ({"min_objects": 0}, "at least one object"),
        ({"max_objects": MAX_OBJECTS + 1}, f"max_objects <= {MAX_OBJECTS}"),
        ({"unseen": ("purple circle",)}, "use names from class_names"),
        ({"unseen": ("background",)}, "background cannot be unseen"),
        ({"size": 16}, "at least 32 pixels"),
        ({"size": 64.0}, "at least 32 pixels"),
        ({"n": -1}, "non-negative int"),
        ({"seed": -3}, "non-negative int"),
        (
            {
                "colors": ("red",),
                "shapes": ("circle",),
                "unseen": ("red circle",),
                "exclude_unseen": True,
            },
            "hold out fewer classes",
        ),
    ],
)
def test_bad_arguments_say_how_to_fix(kwargs, fix):
    with pytest.raises(ValueError, match=re.escape(fix)) as err:
        ShapeScenes(**{"n": 4, **kwargs})
    msg = str(err.value)
    assert msg.endswith(".") and ". " not in msg  # one sentence


def test_a_single_string_is_one_name():
    ds = ShapeScenes(2, colors="red", shapes=("circle", "square"), unseen="red square")
    assert ds.class_names == ["background", "red circle", "red square"]
    assert ds.unseen_class_ids == [2]


# ------------------------------------------------------------------------------- speed sanity
def test_generation_is_fast():
    # A generous bound only (the real number lives in benchmarks/): about 0.05 s on 2 idle cores.
    ds = ShapeScenes(64)
    start = time.perf_counter()
    for i in range(64):
        ds[i]
    assert time.perf_counter() - start < 5.0


def test_shape_textures_mark_each_shape_and_can_be_turned_off():
    from vitseg_lab.data.shapes import TEXTURES

    xx, yy = np.meshgrid(np.arange(8) + 0.5, np.arange(8) + 0.5)
    patterns = {name: f(xx, yy) for name, f in TEXTURES.items()}
    assert not patterns["circle"].any()
    for a in patterns:                       # every 8x8 patch pattern differs between shapes
        for b in patterns:
            if a != b:
                assert (patterns[a] != patterns[b]).any(), (a, b)
    ds = ShapeScenes(8, seed=3, shapes=("square",), colors=("red",), max_objects=1)
    plain = ShapeScenes(8, seed=3, shapes=("square",), colors=("red",), max_objects=1,
                        shape_texture=False)
    for i in range(4):
        m = ds[i]["instance_masks"][0]
        assert torch.equal(m, plain[i]["instance_masks"][0])     # texture changes pixels only
        red = ds[i]["image"][0][m]
        assert red.std() > 2 * plain[i]["image"][0][m].std()    # stripes add variation
