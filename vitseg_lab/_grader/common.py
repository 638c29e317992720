"""Hidden-check plumbing shared by every chapter's grader (instructor-only).

``compare(fn, "vitseg_lab._grader.ch01:naive_softmax", cases)`` runs the learner's function on each
case in the kernel, saves inputs and outputs, and lets a *fresh* Python process compute the naive
reference and compare. Whatever the learner patched in the kernel (``torch.allclose``, numpy,
builtins) does not exist in that process, so it cannot change the verdict.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable

import torch


def _is_learner_function(fn: Any) -> bool:
    # The notebook's plugged function: plug() marks it, and it was defined in the kernel (__main__).
    inner = getattr(fn, "__vitseg_learner_fn__", None)
    return inner is not None and getattr(inner, "__module__", None) == "__main__"


def compare(
    fn: Callable,
    reference: str,
    cases: list[dict[str, Any]],
    *,
    what: str,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    timeout: float = 60.0,
    learner: Callable | None = None,
) -> None:
    """Assert that ``fn(**case)`` matches ``reference(**case)`` for every case.

    Args:
        fn: the learner's plugged function, as defined in the notebook.
        reference: ``"module:function"`` of the independent naive formulation.
        cases: keyword arguments for each call (tensors and plain values).
        what: how to name the exercise in the message, e.g. ``"softmax"``.
        learner: the plugged function to vet when ``fn`` is a wrapper around it (e.g. picking
            one output of a tuple); defaults to ``fn``.
    """
    if not _is_learner_function(learner or fn):
        raise AssertionError(
            f"{what}: no solution of yours was found; run your @plug solution cell above before "
            "this test."
        ) from None
    outs = []
    for i, case in enumerate(cases):
        args = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in case.items()}
        try:
            out = fn(**args)
        except NotImplementedError:
            raise AssertionError(f"{what}: the exercise is not done yet.") from None
        except Exception as e:  # the learner's error, reported without our frames
            raise AssertionError(f"{what} raised {type(e).__name__} on hidden case {i}: {e}") from None
        outs.append(out.detach().clone() if torch.is_tensor(out) else out)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "case.pt")
        torch.save({"cases": cases, "outs": outs}, path)
        verdict = _Verifier.ask([path, reference, str(atol), str(rtol), what], timeout)
    if not verdict["ok"]:
        raise AssertionError(verdict["msg"]) from None


class _Verifier:
    """One clean Python process per kernel, started on first use, that runs the references.

    Starting it once (not per check) keeps a notebook's hidden tests to about a second each.
    """

    proc: subprocess.Popen | None = None

    @classmethod
    def ask(cls, request: list[str], timeout: float) -> dict[str, Any]:
        if cls.proc is None or cls.proc.poll() is not None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("NBGRADER")}
            cls.proc = subprocess.Popen(
                [sys.executable, "-m", "vitseg_lab._grader.common", "--serve"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, env=env,
            )
        proc = cls.proc
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            return json.loads(line)
        except (OSError, ValueError):
            cls.proc = None
            raise AssertionError(
                "the hidden check could not run (grader process failed); tell your instructor."
            ) from None


def _describe(a: Any) -> str:
    if torch.is_tensor(a):
        return f"tensor of shape {tuple(a.shape)} and dtype {a.dtype}"
    return type(a).__name__


def _verify(path: str, reference: str, atol: float, rtol: float, what: str) -> dict[str, Any]:
    data = torch.load(path, weights_only=True)
    mod_name, fn_name = reference.split(":")
    ref_fn = getattr(importlib.import_module(mod_name), fn_name)
    for i, (case, out) in enumerate(zip(data["cases"], data["outs"])):
        want = ref_fn(**case)
        if not torch.is_tensor(out):
            return {"ok": False, "msg": f"{what} returned a {_describe(out)} on hidden case {i}; "
                                        f"expected a {_describe(want)}."}
        if out.shape != want.shape:
            return {"ok": False, "msg": f"{what} returned shape {tuple(out.shape)} on hidden case "
                                        f"{i}; expected {tuple(want.shape)}."}
        if out.dtype != want.dtype:
            return {"ok": False, "msg": f"{what} returned dtype {out.dtype} on hidden case {i}; "
                                        f"expected {want.dtype}."}
        if want.is_floating_point():
            bad = ~torch.isclose(out.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True)
        else:
            bad = out != want
        if bad.any():
            return {"ok": False, "msg": f"{what} gave wrong values on hidden case {i} "
                                        f"({int(bad.sum())} of {bad.numel()} entries differ)."}
    return {"ok": True, "msg": ""}


def _serve() -> None:
    for line in sys.stdin:
        path, ref, atol, rtol, what = json.loads(line)
        try:
            result = _verify(path, ref, float(atol), float(rtol), what)
        except Exception as e:  # noqa: BLE001 - any grader-side failure becomes a verdict
            result = {"ok": False, "msg": f"{what}: the hidden check failed: {type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _serve()
