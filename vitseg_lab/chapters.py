"""The chapter registry and the chapter protocol: every other list of chapters derives from here.

A plain dict, in the style of segment-anything's ``sam_model_registry``: the CLI's chapter names,
the grading assignments, the browser test's parametrisation, the README table check and the
completeness test (``tests/unit/test_chapters.py``) all read ``CHAPTERS``. Adding a chapter is one
``Chapter(...)`` line here plus the chapter's own files (``docs/CONTRIBUTING.md``, "Adding a chapter").

The protocol every chapter module (``vitseg_lab/<slug>.py``) follows, exactly:

- exercise functions at module level, each docstring starting ``Exercise N.M · ...`` (N = chapter
  number), the reference between nbgrader's solution markers; library code calls
  them through the module global at call time, so ``plug`` reaches every caller;
- ``<Config>`` dataclass with ``quick()``, ``smoke()``, ``full()``, ``for_scale(scale)`` (inherited
  from ``ScalePresets``), a
  ``train: TrainConfig`` field, ``target`` (the stated metric value) and ``target_metric`` (its key);
- ``quick_data(cfg) -> (train, val)`` ShapeScenes-backed data sets with ``num_classes`` and ``collate``;
- ``build(cfg, num_classes) -> nn.Module`` (``num_classes`` as the data set counts them); the model
  keeps ``cfg`` as ``model.cfg`` so that ``loss_fn`` and ``metric_fn`` need nothing else;
- ``loss_fn(model, batch) -> dict[str, Tensor]`` with the total under ``"loss"``;
- ``metric_fn(model, loader) -> dict[str, float]`` including ``cfg.target_metric``;
- ``full_data(cfg) -> (train, val)`` of the full-scale benchmark (``vitseg-lab eval`` uses it);
- ``run(cfg) -> RunResult`` (``train.run_chapter`` once the data is chosen: one seed, the untrained
  baseline, ``fit`` with ``checkpoint_meta``); ``full_scale_check(cfg) -> str | None`` (every
  missing piece, one line each, with the exact command: ``fullscale.check``);
  ``load(checkpoint) -> nn.Module`` (``load_model(checkpoint, SLUG)``).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CHAPTERS", "Chapter", "RunResult", "ScalePresets", "by_number", "chapter_of_tag",
           "checkpoint_meta", "config_from_dict", "get", "load_model"]


@dataclass(frozen=True)
class Chapter:
    """One chapter of the course.

    number: 1..6 (the ``N`` of exercise tags ``N.M``) · slug: the CLI name (``vitseg-lab train SLUG``)
    and the unit-test file ``tests/unit/test_<slug>.py`` · module: the flat library module learners
    import · notebook: path from the repository root · config: the config class in ``module`` ·
    explorer: ``"module:function"`` of the interactive explorer (driven by the plugged exercises) ·
    datasets: full-scale data sets, as named by ``vitseg-lab data`` · exercise_modules: modules
    holding this chapter's exercises (its own module first; shared ones such as ``losses``) ·
    browser: whether the browser test runs this notebook (each costs about a minute of CI).
    """

    number: int
    slug: str
    title: str
    module: str
    notebook: str
    config: str
    explorer: str
    datasets: tuple[str, ...] = ()
    exercise_modules: tuple[str, ...] = ()
    browser: bool = False

    @property
    def nn(self) -> str:
        """``"03"``: the two-digit number of file names and nbgrader assignments (``ch03``)."""
        return f"{self.number:02d}"

    @property
    def assignment(self) -> str:
        return f"ch{self.nn}"

    @property
    def source(self) -> str:
        """The notebook's source, ``notebooks/src/NN_name.py``."""
        return self.notebook.replace("notebooks/", "notebooks/src/").replace(".ipynb", ".py")

    @property
    def grader(self) -> str:
        """The instructor-only grader module, ``vitseg_lab._grader.chNN``."""
        return f"vitseg_lab._grader.ch{self.nn}"

    def load_module(self):
        return importlib.import_module(self.module)

    def config_class(self):
        return getattr(self.load_module(), self.config)

    def load_explorer(self) -> Callable:
        mod, fn = self.explorer.split(":")
        return getattr(importlib.import_module(mod), fn)


CHAPTERS: dict[str, Chapter] = {
    "attention": Chapter(1, "attention", "ViT tokens and attention", "vitseg_lab.attention",
                         "notebooks/01_vit_attention.ipynb", "AttentionConfig",
                         "vitseg_lab.widgets:attention_explorer", ("voc",),
                         ("vitseg_lab.attention",), browser=True),
    "tokens": Chapter(2, "tokens", "Visual Transformer tokens", "vitseg_lab.tokens",
                      "notebooks/02_visual_tokens.ipynb", "TokensConfig",
                      "vitseg_lab.tokens:token_explorer", (), ("vitseg_lab.tokens",)),
    "segvit": Chapter(3, "segvit", "SegViT: attention-to-mask", "vitseg_lab.segvit",
                      "notebooks/03_segvit_atm.ipynb", "SegViTConfig",
                      "vitseg_lab.widgets:mask_explorer", ("ade20k",),
                      ("vitseg_lab.segvit", "vitseg_lab.losses"), browser=True),
    "afa": Chapter(4, "afa", "AFA: affinity from attention", "vitseg_lab.afa", "notebooks/04_afa_affinity.ipynb", "AFAConfig", "vitseg_lab.afa:affinity_explorer", ("voc",), ("vitseg_lab.afa",), browser=True),
    "restr": Chapter(5, "restr", "ReSTR: convolution-free referring segmentation", "vitseg_lab.restr", "notebooks/05_restr_referring.ipynb", "ReSTRConfig", "vitseg_lab.restr:expression_explorer", ("refcoco", "refcoco+", "refcocog"), ("vitseg_lab.restr",), browser=False),
    "zeroshot": Chapter(6, "zeroshot", "ZSI: zero-shot instance segmentation head", "vitseg_lab.zeroshot", "notebooks/06_zero_shot_head.ipynb", "ZSIConfig", "vitseg_lab.zeroshot:instance_explorer", ("coco-zsi",), ("vitseg_lab.zeroshot",), browser=False),
    # new chapters: one line each, in chapter order (see docs/CONTRIBUTING.md, "Adding a chapter")
}


def get(name: str | int) -> Chapter:
    """A chapter by slug (``"segvit"``), number (``3``) or assignment (``"ch03"``)."""
    if isinstance(name, int) or str(name).isdigit():
        return by_number(int(name))
    if str(name).startswith("ch") and str(name)[2:].isdigit():
        return by_number(int(str(name)[2:]))
    if name not in CHAPTERS:
        raise KeyError(f"unknown chapter {name!r}; choose one of: {', '.join(CHAPTERS)}.")
    return CHAPTERS[name]


def by_number(number: int) -> Chapter:
    for ch in CHAPTERS.values():
        if ch.number == number:
            return ch
    raise KeyError(f"no chapter {number:02d}; the course has "
                   f"{', '.join(f'{c.number:02d}' for c in CHAPTERS.values())}.")


def chapter_of_tag(tag: str) -> Chapter | None:
    """The chapter of exercise tag ``"3.5"`` (None when the tag names no chapter)."""
    try:
        return by_number(int(str(tag).split(".")[0]))
    except (KeyError, ValueError):
        return None


class ScalePresets:
    """Base of every chapter's config dataclass: ``for_scale(name)`` returns the preset of that
    name, a classmethod of the config (``"full-large"`` -> ``full_large()``). A config with more
    presets than quick / smoke / full lists them in ``SCALES``."""

    SCALES: typing.ClassVar[tuple[str, ...]] = ("quick", "smoke", "full")

    @classmethod
    def for_scale(cls, scale: str) -> typing.Self:
        if scale not in cls.SCALES:
            raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(cls.SCALES)}.")
        return getattr(cls, scale.replace("-", "_"))()


@dataclass
class RunResult:
    """What every chapter's ``run(cfg)`` returns.

    model: the trained model (None when the run was skipped) · history: ``train.History`` ·
    metrics: final evaluation (``metric_fn``'s dict) · baseline: the same metrics for the baseline
    measured in the same run (e.g. an untrained model or a trivial predictor) · target_metric /
    target: the stated goal, ``reached`` whether the final metric met it · seconds: wall time ·
    config: ``dataclasses.asdict(cfg)`` · checkpoint: path of the saved checkpoint · skipped: the
    full-scale check's message when the run could not start (then ``model`` is None).
    """

    model: Any
    history: Any
    metrics: dict[str, float]
    target_metric: str
    target: float
    seconds: float
    config: dict[str, Any]
    baseline: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    skipped: str | None = None
    val: Any = None

    @property
    def reached(self) -> bool:
        value = self.metrics.get(self.target_metric)
        return value is not None and value >= self.target

    @property
    def value(self) -> float:
        return float(self.metrics.get(self.target_metric, float("nan")))

    def summary(self) -> str:
        """One line: metric, baseline from the same run, target, time."""
        if self.skipped:
            return f"skipped: {self.skipped}"
        base = self.baseline.get(self.target_metric)
        base_s = f" (baseline in the same run: {base:.3f})" if base is not None else ""
        mark = "reached" if self.reached else "NOT reached"
        return (f"{self.target_metric} = {self.value:.3f}{base_s}; target ≥ {self.target:g} "
                f"{mark}; {self.seconds:.0f} s")


# ------------------------------------------------------------------------------ checkpoints

def checkpoint_meta(slug: str, cfg: Any, num_classes: int) -> dict[str, Any]:
    """What ``fit(..., meta=...)`` stores so ``load_model`` can rebuild the model."""
    return {"chapter": slug, "config": dataclasses.asdict(cfg), "num_classes": int(num_classes)}


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from ``dataclasses.asdict`` output."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v, tp = values[f.name], hints.get(f.name)
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = config_from_dict(tp, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def load_model(checkpoint: str | Any, chapter: str | None = None, map_location: Any = "cpu"):
    """Rebuild a chapter's model from a checkpoint written by ``fit(..., meta=checkpoint_meta(...))``.

    ``chapter`` (a slug) is checked against the checkpoint's. Returns the model in eval mode, with
    ``model.cfg`` the run's config.
    """
    from .train import CheckpointError, load_checkpoint

    ck = load_checkpoint(checkpoint, map_location=map_location)
    meta = ck.get("meta")
    if not meta:
        raise CheckpointError(f"{checkpoint} has no chapter information (written before the "
                              "chapter protocol, or by fit() without meta=); retrain it.")
    if chapter is not None and meta["chapter"] != chapter:
        raise CheckpointError(f"{checkpoint} is a checkpoint of chapter {meta['chapter']!r}, "
                              f"not {chapter!r}; use `vitseg-lab eval {meta['chapter']}`.")
    ch = get(meta["chapter"])
    mod = ch.load_module()
    cfg = config_from_dict(getattr(mod, ch.config), meta["config"])
    model = mod.build(cfg, meta["num_classes"])
    model.load_state_dict(ck["model"])
    return model.eval()
