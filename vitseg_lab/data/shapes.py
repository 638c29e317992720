"""ShapeScenes: deterministic, seeded, procedural scenes that carry every label the course needs.

A scene is a ``size x size`` RGB image with ``min_objects..max_objects`` coloured shapes on a mild
noisy gradient. Classes are compositional: ``"red circle"`` is the pair (colour, shape), index 0 is
``"background"``, then one class per ``colors x shapes`` combination in that order. Scene ``i``
depends only on ``(seed, i)`` (``np.random.default_rng([seed, i])``), so access order, DataLoader
workers and machines all see the same pixels. Later objects occlude earlier ones; every object
keeps at least half of its own area (and at least ~12 pixels at size 64) visible, so every mask is
a recognisable part of its shape, and objects of the same colour never touch, so every instance
boundary can be seen in the image.

What each label is for:

- ``image`` (3, H, W) in [0, 1]: the input of every chapter (ch01 shows ViT attention on it).
- ``labels`` (K-1,) multi-hot: image-level labels, ch01's classification target and ch04's (AFA)
  only supervision for weakly supervised segmentation.
- ``semantic`` (H, W) int64, 255 = ignore: the dense target of ch02/ch03 (SegViT ATM); 255 marks a
  1-px outline of each object, the VOC convention for uncertain boundary pixels.
- ``instance_masks`` / ``instance_labels`` / ``boxes``: visible masks, class ids and xyxy boxes per
  object, for mask-query decoders (ch03) and zero-shot instance segmentation (ch06).
- ``expression`` / ``ref_index`` / ``ref_mask``: a referring expression that singles out one
  instance, and its mask: ch05 (ReSTR).
- ``class_names``, ``seen_class_ids`` / ``unseen_class_ids``, ``class_vectors()``: ch06's zero-shot
  split and the attribute vectors that let a head name a (colour, shape) pair it never saw.

Shapes: H, W pixels · N instances in a scene · K classes, background included · D attributes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["COLORS", "IGNORE_INDEX", "MAX_OBJECTS", "MIN_SIZE", "SHAPES", "ShapeScenes"]

#: Colour name -> RGB in [0, 1]. Saturated enough to stand out from the grey background.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.50, 0.15, 0.75),
}

#: Shapes the rasteriser draws (``s`` = the object's side / diameter in pixels).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

#: Surface pattern of each shape (``shape_texture=True``), as a function of pixel coordinates:
#: 1 where the object is drawn darker. Outlines alone need a receptive field across the whole
#: object, which a from-scratch tiny ViT takes minutes to learn; a pattern makes every 8x8 patch
#: of an object say which shape it belongs to, so the quick-scale chapters learn in a minute.
TEXTURES: dict[str, Any] = {
    "circle": lambda xx, yy: np.zeros_like(xx),                          # plain
    "square": lambda xx, yy: (yy // 2) % 2,                              # horizontal stripes
    "triangle": lambda xx, yy: ((xx // 2) + (yy // 2)) % 2,              # checkerboard
    "diamond": lambda xx, yy: (xx // 2) % 2,                             # vertical stripes
    "cross": lambda xx, yy: ((xx + yy) // 2) % 2,                        # diagonal stripes
}
_TEXTURE_DEPTH = 0.4  # how much darker the patterned pixels are

IGNORE_INDEX = 255
MIN_SIZE = 32  # below this the smallest objects are a few pixels and shapes stop being shapes
# Objects scale with the image, so how many fit does not depend on ``size``: 8 always fit half
# visible; from about 10 on, placements start to fail and scenes come out with fewer objects.
MAX_OBJECTS = 8

_OBJECT_SIDE = (12 / 64, 28 / 64)  # object side / diameter as a fraction of the image side
_MIN_PIXELS_AT_64 = 12  # fewest visible pixels an instance may keep, scaled by area
_MIN_VISIBLE = 0.5  # fraction of its own area an occluded object must keep visible
_PLACEMENT_TRIES = 50  # random placements tried per object before it is left out
_LAYOUT_TRIES = 20  # layouts tried before falling back to one object (never needed in practice)
_AREA_RATIO = 1.3  # "larger"/"smaller" only when visible areas differ by this factor


def _rasterise(shape: str, cx: float, cy: float, s: float, xx: np.ndarray, yy: np.ndarray):
    """One shape on pixel centres. xx, yy: (H, W) pixel-centre coordinates -> (H, W) bool."""
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    h = s / 2
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (dx <= h) & (dy <= h)
    if shape == "triangle":  # apex up, base and height s
        top = cy - h
        return (yy <= cy + h) & (dx <= (yy - top) / 2)
    if shape == "diamond":
        return dx + dy <= h
    if shape == "cross":  # a plus sign, arms s/3 thick
        t = s / 6
        return ((dx <= t) & (dy <= h)) | ((dy <= t) & (dx <= h))
    raise AssertionError(f"no rasteriser for {shape!r}")  # SHAPES and this function disagree


def _names(value: str | Sequence[str], what: str) -> tuple[str, ...]:
    # A single string is one name, not a sequence of letters.
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(
            f"{what}={value!r} is not a sequence of names; pass a tuple of strings, "
            f"such as {what}=('red', 'green')."
        ) from None
    for v in names:
        if not isinstance(v, str):
            raise TypeError(f"{what} holds {v!r}, which is not a string; pass names as strings.")
    return names


def _check_int(value: Any, what: str, lo: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{what}={value!r} is not valid; {hint}.")
    return int(value)


class ShapeScenes(Dataset):
    """Procedural scenes of coloured shapes with semantic, instance, image-level and referring labels.

    Args:
        n: number of scenes (indices ``0..n-1``).
        size: image side H = W in pixels (>= 32). Objects are 12/64 to 28/64 of it across.
        colors: colour names from ``COLORS``.
        shapes: shape names from ``SHAPES``.
        min_objects, max_objects: objects drawn per scene (uniform in between, inclusive;
            ``max_objects <= MAX_OBJECTS``). An object that finds no place after 50 tries is left
            out: this never happens with the defaults, and rarely once many objects share one or
            two colours (same-coloured objects may not touch).
        seed: non-negative int; scene ``i`` depends only on ``(seed, i)``.
        boundary_ignore: put 255 on a 1-px outline of every object in ``semantic``.
        unseen: class names held out for the zero-shot chapter (e.g. ``("blue triangle",)``).
        shape_texture: draw each shape with its own surface pattern (``TEXTURES``) so that a
            single patch can tell the shape; False leaves only the outline.
        exclude_unseen: never draw unseen classes (the zero-shot training split). Class ids stay
            the same with or without it, so splits share ``class_names``.
        cache: keep generated scenes in memory (lazily, per process); each access returns copies.

    ``ds[i]`` is a dict (N instances, K = ``num_classes``):

    - ``"image"``: (3, H, W) float32 in [0, 1]
    - ``"semantic"``: (H, W) int64, 0 background, 1..K-1 classes, 255 ignore
    - ``"instance_masks"``: (N, H, W) bool visible masks, in drawing order (later on top)
    - ``"instance_labels"``: (N,) int64 class ids >= 1
    - ``"boxes"``: (N, 4) float32 xyxy pixel indices of the mask's extreme pixels, inclusive
      (``torchvision.ops.masks_to_boxes`` convention)
    - ``"labels"``: (K-1,) float32 multi-hot; class c -> index c-1
    - ``"expression"``: str naming one instance uniquely, ``"the red circle"``, or with a
      disambiguator among same-class instances: ``"the red circle on the left"``,
      ``"the larger green square"``, ``"the topmost blue cross"``. Modifiers compare the
      instance with the others of its class, by visible centroid (left/right/top/bottom, with a
      margin of size/16 px) or by visible area (at least 1.3x apart)
    - ``"ref_index"``: int index into the instances; ``"ref_mask"``: (H, W) bool, its visible mask
    - ``"index"``: int, ``i``
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        n: int = 256,
        *,
        size: int = 64,
        colors: Sequence[str] = ("red", "green", "blue"),
        shapes: Sequence[str] = ("circle", "square", "triangle"),
        min_objects: int = 1,
        max_objects: int = 3,
        seed: int = 0,
        boundary_ignore: bool = True,
        unseen: Sequence[str] = (),
        exclude_unseen: bool = False,
        cache: bool = True,
        shape_texture: bool = True,
    ):
        self.n = _check_int(
            n, "n", 0, "pass the number of scenes as a non-negative int such as n=256"
        )
        self.size = _check_int(
            size,
            "size",
            MIN_SIZE,
            f"use an int image side of at least {MIN_SIZE} pixels (64 is the course default)",
        )
        self.colors = _names(colors, "colors")
        self.shapes = _names(shapes, "shapes")
        for what, names, known in (
            ("colors", self.colors, COLORS),
            ("shapes", self.shapes, SHAPES),
        ):
            if not names:
                raise ValueError(
                    f"{what} is empty; give at least one name from {', '.join(known)}."
                )
            for name in names:
                if name not in known:
                    raise ValueError(
                        f"Unknown {what[:-1]} {name!r}; choose {what} from {', '.join(known)}."
                    )
            if len(set(names)) != len(names):
                dup = next(x for x in names if names.count(x) > 1)
                raise ValueError(f"{what} lists {dup!r} twice; give each name once.")
        self.min_objects = _check_int(
            min_objects, "min_objects", 1, "draw at least one object per scene (min_objects >= 1)"
        )
        self.max_objects = _check_int(
            max_objects, "max_objects", 1, "draw at least one object per scene (max_objects >= 1)"
        )
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"min_objects={self.min_objects} is greater than max_objects={self.max_objects}; "
                "pass min_objects <= max_objects."
            )
        if self.max_objects > MAX_OBJECTS:
            raise ValueError(
                f"max_objects={self.max_objects} is more than fit in one scene with every object "
                f"at least half visible; use max_objects <= {MAX_OBJECTS}."
            )
        self.seed = _check_int(seed, "seed", 0, "pass a non-negative int such as seed=0")
        self.boundary_ignore = bool(boundary_ignore)
        self.exclude_unseen = bool(exclude_unseen)
        self.cache = bool(cache)

        self.class_names: list[str] = ["background"] + [
            f"{c} {s}" for c in self.colors for s in self.shapes
        ]
        self.num_classes: int = len(self.class_names)
        self._index = {name: k for k, name in enumerate(self.class_names)}
        self._attrs = [(None, None)] + [(c, s) for c in self.colors for s in self.shapes]

        self.unseen: tuple[str, ...] = _names(unseen, "unseen")
        for name in self.unseen:
            if name not in self._index or name == "background":
                raise ValueError(
                    f"unseen names {name!r}, which is not an object class of this dataset; use "
                    f"names from class_names such as {self.class_names[1]!r} (background cannot "
                    "be unseen)."
                )
        unseen_set = {self._index[name] for name in self.unseen}
        self.unseen_class_ids: list[int] = sorted(unseen_set)
        self.seen_class_ids: list[int] = [
            k for k in range(1, self.num_classes) if k not in unseen_set
        ]
        if self.exclude_unseen and not self.seen_class_ids:
            raise ValueError(
                "exclude_unseen=True with every class unseen leaves nothing to draw; "
                "hold out fewer classes."
            )
        self._drawable = np.array(
            self.seen_class_ids if self.exclude_unseen else range(1, self.num_classes), np.int64
        )

        self.shape_texture = bool(shape_texture)
        centres = np.arange(self.size, dtype=np.float64) + 0.5
        self._yy, self._xx = np.meshgrid(centres, centres, indexing="ij")  # (H, W) each
        self._min_pixels = max(_MIN_PIXELS_AT_64, round(_MIN_PIXELS_AT_64 * (self.size / 64) ** 2))
        self._cache: dict[int, dict[str, Any]] = {}

    # ----------------------------------------------------------------------------------- classes
    def class_id(self, name: str) -> int:
        """Class id of ``"red circle"`` (or ``"background"`` -> 0)."""
        if name not in self._index:
            raise ValueError(
                f"{name!r} is not a class of this dataset; valid names are: "
                f"{', '.join(self.class_names)}."
            )
        return self._index[name]

    @property
    def attribute_names(self) -> list[str]:
        """The D names of the ``class_vectors()`` dimensions: colours, shapes, ``"background"``."""
        return [*self.colors, *self.shapes, "background"]

    def class_vectors(self) -> torch.Tensor:
        """Attribute vector per class: one-hot colour ⊕ one-hot shape ⊕ background flag.

        -> (K, D) float32 with D = len(colors) + len(shapes) + 1 (7 for the defaults). Background
        is the flag alone; ``"red circle"`` has a 1 at ``red`` and at ``circle``. An unseen class
        shares its colour with some seen classes and its shape with others, which is what lets a
        zero-shot head place it.
        """
        nc, ns = len(self.colors), len(self.shapes)
        vec = torch.zeros(self.num_classes, nc + ns + 1, dtype=torch.float32)
        vec[0, -1] = 1.0
        for k, (c, s) in enumerate(self._attrs[1:], start=1):
            vec[k, self.colors.index(c)] = 1.0
            vec[k, nc + self.shapes.index(s)] = 1.0
        return vec

    @property
    def vocabulary(self) -> list[str]:
        """Every word an ``expression`` may contain, sorted (for a learned text vocabulary)."""
        words = {"the", "on", "at", "left", "right", "top", "bottom", "larger", "smaller"}
        words |= {f"{w}most" for w in ("left", "right", "top", "bottom")} | {"largest", "smallest"}
        return sorted(words | set(self.colors) | set(self.shapes))

    # ----------------------------------------------------------------------------------- dataset
    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        unseen = f", unseen={list(self.unseen)}, exclude_unseen={self.exclude_unseen}"
        return (
            f"ShapeScenes(n={self.n}, size={self.size}, classes={self.num_classes - 1}+background, "
            f"colors={list(self.colors)}, shapes={list(self.shapes)}, "
            f"objects={self.min_objects}..{self.max_objects}, seed={self.seed}, "
            f"boundary_ignore={self.boundary_ignore}{unseen if self.unseen else ''})"
        )

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"ShapeScenes indices are ints, not {type(i).__name__}.") from None
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"scene index out of range for a dataset of {self.n} scenes")
        if not self.cache:
            return self._generate(i)
        sample = self._cache.get(i)
        if sample is None:
            sample = self._cache[i] = self._generate(i)
        # Copies, so a transform that works in place cannot corrupt the cache.
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}

    @staticmethod
    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch samples of different instance counts (B samples).

        -> ``image`` (B, 3, H, W), ``semantic`` (B, H, W), ``labels`` (B, K-1),
        ``ref_mask`` (B, H, W), ``index`` (B,) int64 as tensors; ``instance_masks``,
        ``instance_labels``, ``boxes``, ``expression``, ``ref_index`` as lists of length B.
        """
        if not batch:
            raise ValueError("collate got an empty batch; pass at least one sample.")
        out: dict[str, Any] = {
            k: torch.stack([b[k] for b in batch])
            for k in ("image", "semantic", "labels", "ref_mask")
        }
        out["index"] = torch.tensor([b["index"] for b in batch], dtype=torch.int64)
        for k in ("instance_masks", "instance_labels", "boxes", "expression", "ref_index"):
            out[k] = [b[k] for b in batch]
        return out

    # -------------------------------------------------------------------------------- generation
    def _layout(self, rng: np.random.Generator, count: int):
        """Place ``count`` objects -> (ids (H, W) int64 with 0 = background and k+1 = k-th object
        in drawing order, classes (N,), sides (N,)).

        A placement is redrawn when it would leave an earlier object less than half (or fewer
        than ~12 pixels) visible, or when it touches an object of the same colour (two touching
        same-coloured shapes merge into one blob, and their instance masks could not be told
        apart from the image).
        """
        S = self.size
        lo, hi = (f * S for f in _OBJECT_SIDE)
        ids = np.zeros((S, S), np.int64)
        classes: list[int] = []
        sides: list[float] = []
        colour = np.zeros(1, np.int64)  # colour index per id, -1 for background
        colour[0] = -1
        visible = np.zeros(0, np.int64)  # visible pixels of each placed object
        need = np.zeros(0, np.int64)  # the fewest it may keep
        for _ in range(count):
            cls = int(self._drawable[rng.integers(len(self._drawable))])
            col, shape = self._attrs[cls]
            col_id = self.colors.index(col)
            for t in range(_PLACEMENT_TRIES):
                # Later tries draw smaller objects, so crowded scenes still find room.
                s = rng.uniform(lo, hi - (hi - lo) * t / _PLACEMENT_TRIES)
                cx, cy = rng.uniform(s / 2, S - s / 2, size=2)
                # Rasterise in the object's bounding window (1-px margin) only: cheap at any size.
                win = (
                    slice(max(0, int(cy - s / 2) - 1), min(S, int(cy + s / 2) + 2)),
                    slice(max(0, int(cx - s / 2) - 1), min(S, int(cx + s / 2) + 2)),
                )
                m = _rasterise(shape, cx, cy, s, self._xx[win], self._yy[win])
                under = ids[win]  # a view: writing to it paints ids
                p = np.pad(m, 1)
                near = m | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]  # m + 1-px ring
                if np.any(colour[under[near]] == col_id):
                    continue
                covered = np.bincount(under[m], minlength=len(classes) + 1)[1:]
                if np.all(visible - covered >= need):
                    area = int(m.sum())
                    under[m] = len(classes) + 1
                    visible = np.append(visible - covered, area)
                    need = np.append(need, max(self._min_pixels, math.ceil(_MIN_VISIBLE * area)))
                    colour = np.append(colour, col_id)
                    classes.append(cls)
                    sides.append(s)
                    break
        return ids, np.array(classes, np.int64), np.array(sides)

    def _refer(self, rng: np.random.Generator, masks: np.ndarray, classes: np.ndarray, sides):
        """Pick an instance that can be named uniquely -> (index, expression), or None.

        masks: (N, H, W) bool. A disambiguator compares the target with the other instances of
        its class only: visible centroids (with a margin) or visible area and drawn size.
        """
        area = masks.sum((1, 2))
        cx = (masks * self._xx).sum((1, 2)) / area
        cy = (masks * self._yy).sum((1, 2)) / area
        margin = max(2.0, self.size / 16)
        found = []
        for t in range(len(classes)):
            name = self.class_names[classes[t]]
            o = [j for j in range(len(classes)) if j != t and classes[j] == classes[t]]
            if not o:
                found.append((t, [f"the {name}"]))
                continue
            two = len(o) == 1
            opts = []
            tests = (
                (cx[t] <= cx[o] - margin, "on the left", "leftmost"),
                (cx[t] >= cx[o] + margin, "on the right", "rightmost"),
                (cy[t] <= cy[o] - margin, "at the top", "topmost"),
                (cy[t] >= cy[o] + margin, "at the bottom", "bottommost"),
            )
            for ok, pair, many in tests:
                if np.all(ok):
                    opts.append(f"the {name} {pair}" if two else f"the {many} {name}")
            if np.all((area[t] >= _AREA_RATIO * area[o]) & (sides[t] > sides[o])):
                opts.append(f"the {'larger' if two else 'largest'} {name}")
            if np.all((_AREA_RATIO * area[t] <= area[o]) & (sides[t] < sides[o])):
                opts.append(f"the {'smaller' if two else 'smallest'} {name}")
            if opts:
                found.append((t, opts))
        if not found:
            return None
        t, opts = found[rng.integers(len(found))]
        return t, opts[rng.integers(len(opts))]

    def _generate(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, i])
        S = self.size
        for attempt in range(_LAYOUT_TRIES + 1):
            # A scene where no instance can be named uniquely is redrawn; a single object can
            # always be named, so the last attempt settles for one.
            count = (
                1
                if attempt == _LAYOUT_TRIES
                else rng.integers(self.min_objects, self.max_objects + 1)
            )
            ids, classes, sides = self._layout(rng, int(count))
            masks = ids[None] == np.arange(1, len(classes) + 1)[:, None, None]  # (N, H, W)
            ref = self._refer(rng, masks, classes, sides)
            if ref is not None:
                break
        ref_index, expression = ref

        # Background: tinted grey, a random linear gradient, pixel noise. Objects: their colour at
        # a random brightness, plus the same noise.
        base = rng.uniform(0.35, 0.6) + rng.uniform(-0.05, 0.05, size=3)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (math.cos(angle) * self._xx + math.sin(angle) * self._yy) / S - 0.5  # (H, W)
        image = base[:, None, None] + rng.uniform(0.05, 0.2) * ramp[None]  # (3, H, W)
        rgb = np.array([COLORS[self._attrs[c][0]] for c in classes]).reshape(-1, 3)
        rgb = rgb * rng.uniform(0.8, 1.0, size=(len(classes), 1))  # (N, 3)
        fg = ids > 0
        image[:, fg] = rgb[ids[fg] - 1].T
        if self.shape_texture:
            for n, c in enumerate(classes):
                on = ids == n + 1
                pattern = TEXTURES[self._attrs[c][1]](self._xx[on], self._yy[on])
                image[:, on] *= 1.0 - _TEXTURE_DEPTH * pattern
        image += rng.normal(0.0, 0.05, size=image.shape)
        np.clip(image, 0.0, 1.0, out=image)

        semantic = np.concatenate([[0], classes])[ids]  # (H, W)
        if self.boundary_ignore:
            # Each edge between two regions is marked once, on the side drawn later (objects over
            # background, occluder over occluded): a 1-px outline of the visible shapes.
            p = np.pad(ids, 1, mode="edge")
            lowest = np.minimum.reduce([p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
            semantic[lowest < ids] = IGNORE_INDEX

        rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)
        boxes = np.stack(
            [
                cols.argmax(1),
                rows.argmax(1),
                S - 1 - cols[:, ::-1].argmax(1),
                S - 1 - rows[:, ::-1].argmax(1),
            ],
            axis=1,
        ).reshape(-1, 4)
        labels = np.zeros(self.num_classes - 1, np.float32)
        labels[classes - 1] = 1.0

        return {
            "image": torch.from_numpy(image.astype(np.float32)),
            "semantic": torch.from_numpy(semantic.astype(np.int64)),
            "instance_masks": torch.from_numpy(masks),
            "instance_labels": torch.from_numpy(classes),
            "boxes": torch.from_numpy(boxes.astype(np.float32)),
            "labels": torch.from_numpy(labels),
            "expression": expression,
            "ref_index": int(ref_index),
            "ref_mask": torch.from_numpy(masks[ref_index].copy()),
            "index": i,
        }
