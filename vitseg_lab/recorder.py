"""Hidden checks, kernel side: call the learner's function on the grader's inputs and *record* the
outputs as data. Nothing here decides a grade.

How an exercise is graded (``docs/CONTRIBUTING.md``, "How grading works"):

1. Before the learner's notebook runs, the grading process (nbgrader's own, never the kernel) draws
   a fresh seed, builds the exercise's hidden cases from the instructor-only grader module and
   writes them as data to ``.vitseg_grading/inputs/<tag>.{json,safetensors}`` in the submission
   folder.
2. In the kernel, the test cell's hidden block is one line, ``record("3.1", atm_similarity)``: it
   loads the inputs, calls the learner's function on copies, and writes what came back — and the
   inputs as they were after the call, to catch in-place edits — to
   ``.vitseg_grading/records/<tag>.{json,safetensors}``. Never pickle: only tensors (safetensors)
   and JSON.
3. After the kernel is gone, the grading process compares the records with the naive references
   on *its own* copy of the inputs and turns a failed check into an error output on the test cell,
   so nbgrader scores it 0 and the feedback shows one line of why.

Outside grading (the instructor edition run by nbval or by hand), ``record`` runs the same check in
this process instead, so a broken reference solution fails the instructor's test suite; in the
student edition there is no hidden block at all.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["GRADING_DIR", "decode", "encode", "record", "record_outputs"]

GRADING_DIR = ".vitseg_grading"
MAX_RECORD_BYTES = 256 * 2**20   # a record larger than this is malformed (scored 0), not stored


# ------------------------------------------------------------------------------ the data codec

def encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "x") -> Any:
    """A JSON skeleton of ``obj``; its tensors go into ``tensors`` (plain, contiguous, on the CPU).

    Tensors, lists, tuples, str-keyed dicts, numbers, strings, bools and None are kept; anything
    else is recorded by its type name only (the grader reports it as a wrong return type).
    """
    if torch.is_tensor(obj):
        key = f"{prefix}"
        # as_subclass: a tensor subclass with lying comparisons becomes plain data
        tensors[key] = obj.detach().as_subclass(torch.Tensor).to("cpu").contiguous().clone()
        return {"t": key}
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return {"v": obj}
    if isinstance(obj, int):
        return {"v": int(obj)}
    if isinstance(obj, float):
        return {"v": obj} if math.isfinite(obj) else {"f": repr(obj)}
    if isinstance(obj, (list, tuple)):
        kind = "l" if isinstance(obj, list) else "u"
        return {kind: [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"d": {k: encode(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}}
    return {"x": type(obj).__module__ + "." + type(obj).__qualname__}


class Unsupported:
    """Stands for a value the codec could not record (its type name is kept)."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


def decode(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode``. Raises ``ValueError`` on a malformed skeleton."""
    if not isinstance(skel, dict) or len(skel) != 1:
        raise ValueError(f"malformed record entry {str(skel)[:60]!r}")
    (kind, val), = skel.items()
    if kind == "t":
        if val not in tensors:
            raise ValueError(f"record names a tensor {val!r} that is not stored")
        return tensors[val]
    if kind == "v":
        return val
    if kind == "f":
        return float(val)
    if kind == "l":
        return [decode(v, tensors) for v in val]
    if kind == "u":
        return tuple(decode(v, tensors) for v in val)
    if kind == "d":
        return {k: decode(v, tensors) for k, v in val.items()}
    if kind == "x":
        return Unsupported(str(val))
    raise ValueError(f"malformed record entry kind {kind!r}")


def _file(path_stem: Path, suffix: str) -> Path:
    # not Path.with_suffix: the stem of "1.4" would lose its ".4" (every tag of a chapter would
    # share one file)
    return path_stem.parent / (path_stem.name + suffix)


def save(path_stem: Path, obj: Any) -> None:
    """Write ``obj`` as ``<stem>.json`` + ``<stem>.safetensors`` (the JSON last: it marks completion)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skel = encode(obj, tensors)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(_file(path_stem, ".safetensors")))
    _file(path_stem, ".json").write_text(json.dumps(skel))


def load(path_stem: Path) -> Any:
    """Read what ``save`` wrote. Raises ``FileNotFoundError`` / ``ValueError`` when it is missing
    or malformed."""
    from safetensors.torch import load_file

    js, st = _file(path_stem, ".json"), _file(path_stem, ".safetensors")
    if not js.exists() or not st.exists():
        raise FileNotFoundError(str(js))
    if st.stat().st_size > MAX_RECORD_BYTES or js.stat().st_size > MAX_RECORD_BYTES:
        raise ValueError("record too large")
    try:
        skel = json.loads(js.read_text())
        tensors = load_file(str(st))
    except Exception as e:  # noqa: BLE001 - any unreadable file is a malformed record
        raise ValueError(f"unreadable record ({type(e).__name__})") from None
    return decode(skel, tensors)


# ------------------------------------------------------------------------------ recording

def _clone(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _substitute(fn: Callable, substitutes: dict[str, str]):
    """Swap names in the learner function's globals (e.g. ``softmax`` -> ``torch.softmax``) so a
    check grades one exercise, not the earlier exercises it calls. Only torch functions qualify."""
    inner = getattr(fn, "__vitseg_learner_fn__", fn)
    glb = getattr(inner, "__globals__", None)
    if not substitutes or glb is None:
        return lambda: None
    saved = {name: glb.get(name, _MISSING) for name in substitutes}
    for name, dotted in substitutes.items():
        mod, _, attr = dotted.rpartition(".")
        if mod not in ("torch", "torch.nn.functional"):
            raise ValueError(f"substitute {dotted!r}: only torch functions can stand in")
        target = torch if mod == "torch" else torch.nn.functional
        glb[name] = getattr(target, attr)

    def restore() -> None:
        for name, value in saved.items():
            if value is _MISSING:
                glb.pop(name, None)
            else:
                glb[name] = value
    return restore


_MISSING = object()


def record_outputs(fn: Callable, cases: list[dict], substitutes: dict[str, str] | None = None
                   ) -> list[dict]:
    """Call ``fn(**case)`` on a copy of each case: ``[{"out": ..., "after": inputs after the call}``
    or ``{"error": "TypeName: message"}``]."""
    rows = []
    restore = _substitute(fn, substitutes or {})
    try:
        for case in cases:
            args = _clone(case)
            try:
                out = fn(**args)
            except NotImplementedError:
                rows.append({"error": "the exercise is not done yet"})
                continue
            except Exception as e:  # noqa: BLE001 - the learner's error becomes the record
                rows.append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            rows.append({"out": out, "after": args})
    finally:
        restore()
    return rows


def _is_learner_function(fn: Any) -> bool:
    # the notebook's plugged function: plug() marks it, and it was defined in the kernel (__main__)
    inner = getattr(fn, "__vitseg_learner_fn__", None)
    return inner is not None and getattr(inner, "__module__", None) == "__main__"


def record(tag: str, fn: Callable) -> None:
    """The hidden block of exercise ``tag``'s test cell: record ``fn``'s outputs on the grader's
    inputs (during autograde), or check them right here (instructor edition)."""
    root = Path(os.getcwd()) / GRADING_DIR
    stem = root / "inputs" / tag
    if _file(stem, ".json").exists():
        try:
            spec = load(stem)
        except (FileNotFoundError, ValueError):
            return                        # the grader will score the missing record 0
        if not _is_learner_function(fn):
            rows: Any = {"missing": "no solution of yours was found (run your @plug cell)"}
        else:
            rows = record_outputs(fn, spec["cases"], spec.get("substitutes"))
        save(root / "records" / tag, {"tag": tag, "rows": rows})
        return
    try:
        from vitseg_lab._grader import common
    except ImportError:                   # student edition outside grading: nothing to check
        return
    common.check_here(tag, fn)
