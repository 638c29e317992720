"""What every chapter's grader file is written on (instructor-only, never in the student edition,
never importable from a grading kernel).

A chapter's grader file ``vitseg_lab/_grader/chNN.py`` holds three things:

- ``naive_<exercise>(**case)``: an independent formulation (loops, the paper's equation written
  literally) that the verdict compares with;
- ``CHECKS = {"N.M": Check("module.function", cases_fn, naive_fn, ...)}``: one per exercise tag;
  ``cases_fn(g)`` builds the hidden cases from a ``torch.Generator`` (the grader draws a fresh seed
  for every submission; shapes are fixed by the case builder so every edge case is always there);
- ``BUGS = {"N.M": [Bug(old, new, mistake), ...]}``: at least three mistakes a real learner makes,
  each a text replacement in the reference solution. ``tests/unit/test_chapters.py`` proves every
  one of them fails its check and the reference passes; ``make grade-demo`` plants some of them in
  a submission and runs the whole nbgrader pipeline.

The verdict (``verdict``) runs in the grading process on the records the kernel wrote
(``vitseg_lab.recorder``), after the kernel is gone: learner code cannot reach it.
"""

from __future__ import annotations

import importlib
import inspect
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vitseg_lab.recorder import Unsupported, _clone, record_outputs

__all__ = ["Bug", "Check", "all_checks", "check_function", "check_here", "checks_of", "gen",
           "mutated", "verdict"]


@dataclass(frozen=True)
class Check:
    """The hidden check of one exercise.

    target: ``"segvit.atm_similarity"``, the exercise function under ``vitseg_lab`` · cases:
    ``cases(g) -> list of keyword-argument dicts`` (tensors, numbers, tuples, lists of tensors) ·
    reference: the naive formulation, called as ``reference(**case)`` · atol / rtol: float
    tolerances (compared in float64; integer and bool outputs must match exactly) · substitutes:
    names in the learner's globals replaced by a torch function while this check runs
    (``{"softmax": "torch.softmax"}``), so a check grades one exercise, not the ones it calls ·
    square: inputs whose last two axes are equal by contract (attention maps, C x C weights); every
    other axis of some hidden case must have a size of its own (tests/unit/test_chapters.py).
    """

    target: str
    cases: Callable[[torch.Generator], list[dict[str, Any]]]
    reference: Callable[..., Any]
    atol: float = 1e-5
    rtol: float = 1e-4
    substitutes: dict[str, str] = field(default_factory=dict)
    square: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.target.rsplit(".", 1)[1]

    @property
    def module(self) -> str:
        return "vitseg_lab." + self.target.rsplit(".", 1)[0]

    def library_function(self) -> Callable:
        """The library's own (reference) function, even while a learner's version is plugged."""
        from vitseg_lab.exercises import _ORIGINALS

        mod = importlib.import_module(self.module)
        return _ORIGINALS.get((mod.__name__, self.name), getattr(mod, self.name))


@dataclass(frozen=True)
class Bug:
    """A planted mistake: replace ``old`` (exactly once) by ``new`` in the reference solution."""

    old: str
    new: str
    mistake: str


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ------------------------------------------------------------------------------ registry of checks

def checks_of(chapter_number: int) -> dict[str, Check]:
    mod = importlib.import_module(f"vitseg_lab._grader.ch{chapter_number:02d}")
    return dict(mod.CHECKS)


def bugs_of(chapter_number: int) -> dict[str, list[Bug]]:
    mod = importlib.import_module(f"vitseg_lab._grader.ch{chapter_number:02d}")
    return dict(getattr(mod, "BUGS", {}))


def all_checks() -> dict[str, Check]:
    from vitseg_lab.chapters import CHAPTERS

    out: dict[str, Check] = {}
    for ch in CHAPTERS.values():
        out.update(checks_of(ch.number))
    return out


def check_for(tag: str) -> Check:
    checks = checks_of(int(tag.split(".")[0]))
    if tag not in checks:
        raise KeyError(f"no hidden check for Exercise {tag}")
    return checks[tag]


# ------------------------------------------------------------------------------ the verdict

def _describe(a: Any) -> str:
    if torch.is_tensor(a):
        return f"tensor of shape {tuple(a.shape)} and dtype {a.dtype}"
    if isinstance(a, Unsupported):
        return a.type_name
    if isinstance(a, (tuple, list)):
        return f"{type(a).__name__} of {len(a)}"
    return type(a).__name__


def _compare(got: Any, want: Any, atol: float, rtol: float, where: str) -> str | None:
    """None when ``got`` matches ``want``; else what differs, in one clause."""
    if torch.is_tensor(want):
        if not torch.is_tensor(got):
            return f"returned a {_describe(got)}{where}; expected a {_describe(want)}"
        if got.shape != want.shape:
            return f"returned shape {tuple(got.shape)}{where}; expected {tuple(want.shape)}"
        if got.dtype != want.dtype:
            return f"returned dtype {got.dtype}{where}; expected {want.dtype} (the input's dtype)"
        if want.is_floating_point() or want.is_complex():
            bad = ~torch.isclose(got.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True)
        else:
            bad = got != want
        if bad.any():
            return (f"gave wrong values{where} ({int(bad.sum())} of {bad.numel()} entries "
                    "differ from the reference)")
        return None
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"returned a {_describe(got)}{where}; expected a {_describe(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            msg = _compare(g, w, atol, rtol, f"{where}, item {i}")
            if msg:
                return msg
        return None
    if isinstance(want, bool) or want is None or isinstance(want, str):
        return None if got == want and type(got) is type(want) else (
            f"returned {got!r}{where}; expected {want!r}")
    if isinstance(want, (int, float)):
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return f"returned a {_describe(got)}{where}; expected a number"
        if isinstance(want, float) and math.isnan(want):
            return None if isinstance(got, float) and math.isnan(got) else f"wrong value{where}"
        return None if math.isclose(got, want, rel_tol=rtol, abs_tol=atol) else (
            f"returned {got!r}{where}; expected a different value")
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return f"returned a {_describe(got)}{where}; expected a dict with keys {sorted(want)}"
        for k in want:
            msg = _compare(got[k], want[k], atol, rtol, f"{where}, key {k!r}")
            if msg:
                return msg
        return None
    raise TypeError(f"reference returned an unsupported {type(want).__name__}")


def _same_data(a: Any, b: Any) -> bool:
    if torch.is_tensor(a):
        return (torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
                and bool((a.isnan() == b.isnan()).all() if a.is_floating_point() else True))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            _same_data(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same_data(a[k], b[k]) for k in a)
    return True


def verdict(check: Check, cases: list[dict], rows: Any) -> str | None:
    """None when the recorded outputs pass; else one line for the learner (no hidden values)."""
    what = check.name
    if isinstance(rows, dict) and "missing" in rows:
        return f"{what}: {rows['missing']}."
    if not isinstance(rows, list) or len(rows) != len(cases):
        return (f"{what}: the hidden check's record is incomplete ({_describe(rows)} for "
                f"{len(cases)} cases): did the test cell run to the end?")
    for i, (case, row) in enumerate(zip(cases, rows)):
        if not isinstance(row, dict):
            return f"{what}: the record of hidden case {i} is malformed."
        if "error" in row:
            return f"{what} raised on hidden case {i}: {str(row['error'])[:300]}"
        if "out" not in row or "after" not in row:
            return f"{what}: the record of hidden case {i} is malformed."
        want = check.reference(**_clone(case))
        msg = _compare(row["out"], want, check.atol, check.rtol, f" on hidden case {i}")
        if msg:
            return f"{what} {msg}."
        after = row["after"]
        if not isinstance(after, dict) or set(after) != set(case):
            return f"{what}: the record of hidden case {i} is malformed."
        for name in case:
            if not _same_data(case[name], after[name]):
                return (f"{what} changed its input `{name}` in place on hidden case {i}; leave "
                        "inputs untouched (work on a copy, use out-of-place operations).")
    return None


def check_function(tag: str, fn: Callable, seed: int = 0) -> str | None:
    """Run exercise ``tag``'s hidden check on ``fn`` in this process: None or the failure line."""
    check = check_for(tag)
    cases = check.cases(gen(seed))
    rows = record_outputs(fn, cases, check.substitutes)
    return verdict(check, check.cases(gen(seed)), rows)


def check_here(tag: str, fn: Callable) -> None:
    """Instructor edition: the hidden check in the notebook's own process (raises on failure)."""
    msg = check_function(tag, fn)
    if msg:
        raise AssertionError(msg) from None


# ------------------------------------------------------------------------------ planted bugs

def mutated(check: Check, bug: Bug) -> Callable:
    """The reference solution of ``check`` with ``bug`` planted, as a function of the same module."""
    ref = check.library_function()
    src = textwrap.dedent(inspect.getsource(ref))
    if src.count(bug.old) != 1:
        raise ValueError(f"planted bug {bug.mistake!r} for {check.target} no longer applies: "
                         f"{bug.old!r} is not in the reference exactly once.")
    src = src.replace(bug.old, bug.new)
    namespace = dict(vars(importlib.import_module(check.module)))
    exec(compile(src, f"<planted bug in {check.target}: {bug.mistake}>", "exec"), namespace)  # noqa: S102
    return namespace[check.name]
