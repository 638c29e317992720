"""The learner-facing machinery: plug a notebook function into the library, name unfinished
exercises, and check tensor shapes with messages a learner can act on.

An exercise function lives in a chapter module (``vitseg_lab.attention``, ``vitseg_lab.segvit``...)
and its first docstring line carries its tag: ``"Exercise 1.2 · ..."``; the tag's chapter number
names the notebook (``vitseg_lab.chapters``), so a shared module can hold any chapter's exercises.
``plug`` replaces the module global; library code calls exercise functions through that global at
call time, so the learner's version runs everywhere.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
import types
from collections.abc import Callable
from typing import Any

from .chapters import CHAPTERS, chapter_of_tag

__all__ = [
    "ExerciseNotDone",
    "NotATensor",
    "PlugNameError",
    "PlugSignatureError",
    "ShapeError",
    "exercise_tag",
    "expect_shape",
    "expect_tensor",
    "plug",
    "unplug",
]

_TAG = re.compile(r"Exercise\s+(\d+\.\d+)")


class ExerciseNotDone(NotImplementedError):
    """Raised by an exercise that has not been written yet.

    Carries the exercise number and notebook so the message says where to go, not where it failed.
    """

    def __init__(self, exercise: str, notebook: str | None = None, what: str = ""):
        self.exercise = exercise.replace("Exercise", "").strip()
        self.notebook = notebook or notebook_of(self.exercise)
        msg = f"Exercise {self.exercise} ({self.notebook}) is not done yet"
        msg += f": {what}" if what else ": write its solution cell and run it."
        super().__init__(msg)


class ShapeError(ValueError):
    """A tensor does not have the shape an exercise's contract asks for."""


class NotATensor(ShapeError, TypeError):
    """A learner's function returned something other than a torch.Tensor (numpy, a list...)."""


class PlugNameError(NameError):
    """``@plug(module)`` on a function whose name is not an exercise of ``module``."""


class PlugSignatureError(TypeError):
    """``@plug(module)`` on a function whose parameters differ from the exercise's."""


def notebook_of(tag: str) -> str:
    """The notebook of exercise ``tag`` (``"3.5"`` -> ``notebooks/03_segvit_atm.ipynb``)."""
    ch = chapter_of_tag(tag)
    return ch.notebook if ch is not None else "its chapter notebook"


def exercise_tag(fn: Callable) -> str | None:
    """The ``"1.2"`` of a function whose docstring starts with ``Exercise 1.2 · ...``."""
    doc = inspect.getdoc(fn) or ""
    m = _TAG.match(doc.strip())
    return m.group(1) if m else None


def _signature_names(fn: Callable) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


# Originals per (module name, function name), so ``unplug`` can restore them and repeated plugs
# in one kernel compare against the library's signature, not the previous learner version.
_ORIGINALS: dict[tuple[str, str], Callable] = {}


def plug(module: types.ModuleType, *, quiet: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: put a learner's function into ``module`` under the same name.

    Checks that the name is an exercise of that module and that the parameters match (names and
    order), then replaces the module global. A ``NotImplementedError`` escaping the learner's
    function becomes an ``ExerciseNotDone`` naming the exercise and notebook.

    Example::

        @plug(attention)
        def softmax(logits, dim=-1): ...
    """
    if not isinstance(module, types.ModuleType):
        raise TypeError(
            f"plug() takes a module, e.g. @plug(attention), not {type(module).__name__}: "
            "write `from vitseg_lab import attention` and then `@plug(attention)`."
        )

    def decorate(fn: Callable) -> Callable:
        name = fn.__name__
        key = (module.__name__, name)
        current = getattr(module, name, None)
        if key not in _ORIGINALS:
            if current is None or not callable(current):
                known = sorted(
                    n for n, v in vars(module).items()
                    if callable(v) and not n.startswith("_") and exercise_tag(v)
                )
                raise PlugNameError(
                    f"{module.__name__} has no exercise called {name!r}; "
                    f"rename your function to one of: {', '.join(known) or '(none)'}."
                )
            _ORIGINALS[key] = current
        original = _ORIGINALS[key]
        tag = exercise_tag(original) or "?"
        notebook = notebook_of(tag)
        want, got = _signature_names(original), _signature_names(fn)
        if [n for n, _ in want] != [n for n, _ in got]:
            msg = (f"{name} must take the parameters ({', '.join(n for n, _ in want)}) "
                   f"but yours takes ({', '.join(n for n, _ in got)}); keep the signature given "
                   "in the exercise.")
            # A previous attempt must not keep running silently: the library and the notebook
            # name now both say that this plug was rejected.
            rejected = _rejected(tag, notebook, f"your last version was rejected: {msg}")
            setattr(module, name, rejected)
            caller = sys._getframe(1).f_globals
            if getattr(caller.get(name), "__vitseg_plugged__", False):
                caller[name] = rejected
            raise PlugSignatureError(msg)

        @functools.wraps(fn)
        def plugged(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ExerciseNotDone:
                raise
            except NotImplementedError:
                raise ExerciseNotDone(tag, notebook) from None

        plugged.__vitseg_plugged__ = True  # type: ignore[attr-defined]
        plugged.__vitseg_learner_fn__ = fn  # type: ignore[attr-defined]
        setattr(module, name, plugged)
        if not quiet and _is_stub(fn):
            print(f"plugged: {module.__name__}.{name} (Exercise {tag}) is still the stub; write "
                  "its body where it says YOUR CODE HERE and rerun this cell")
        elif not quiet:
            print(f"plugged: {module.__name__}.{name} now runs your code (Exercise {tag})")
        return plugged

    return decorate


def _rejected(tag: str, notebook: str, what: str) -> Callable:
    def rejected(*args, **kwargs):
        raise ExerciseNotDone(tag, notebook, what)

    rejected.__vitseg_plugged__ = True  # type: ignore[attr-defined]
    return rejected


def _is_stub(fn: Callable) -> bool:
    """True for a body that only raises NotImplementedError (the student edition's stub)."""
    code = getattr(fn, "__code__", None)
    return code is not None and set(code.co_names) == {"NotImplementedError"}


def unplug(module: types.ModuleType, name: str | None = None) -> None:
    """Restore the library's own version of one exercise (or of all exercises of ``module``)."""
    for (mod, fn_name), original in list(_ORIGINALS.items()):
        if mod == module.__name__ and (name is None or name == fn_name):
            setattr(module, fn_name, original)
            del _ORIGINALS[(mod, fn_name)]


def expect_shape(t: Any, spec: str, *, name: str = "tensor", **sizes: int) -> Any:
    """Check that ``t.shape`` matches ``spec`` and return ``t``.

    ``spec`` names the axes, e.g. ``"B K L"``; sizes given as keywords must match, and a letter
    used twice must have the same size both times. ``_`` matches any size.

        expect_shape(masks, "B K L", B=2, K=3, L=5)

    Raises ``ShapeError`` saying, per axis, what was expected and what came back.
    """
    if not hasattr(t, "shape"):
        raise ShapeError(
            f"{name} should be a tensor of shape ({spec.replace(' ', ', ')}), "
            f"but it is a {type(t).__name__}; return a torch.Tensor."
        )
    axes = spec.split()
    shape = tuple(t.shape)
    expected = ", ".join(f"{a}={sizes[a]}" if a in sizes else a for a in axes)
    if len(shape) != len(axes):
        raise ShapeError(
            f"{name} should have {len(axes)} axes ({expected}) but has {len(shape)}: "
            f"shape {shape}."
        )
    seen: dict[str, int] = {}
    problems = []
    for a, n in zip(axes, shape):
        if a == "_":
            continue
        want = sizes.get(a, seen.get(a))
        if want is not None and want != n:
            problems.append(f"axis {a}: expected {want}, got {n}")
        seen.setdefault(a, n)
    if problems:
        raise ShapeError(
            f"{name} should have shape ({expected}) but has {shape}: " + "; ".join(problems) + "."
        )
    return t


def expect_tensor(t: Any, *, name: str = "your function") -> Any:
    """Return ``t`` if it is a torch.Tensor (or a tuple of them); else raise ``NotATensor``.

    Called where library code receives an exercise's result, so a numpy array or a list is named
    at once instead of failing deep in the model (``'numpy.ndarray' has no attribute 'softmax'``).
    """
    import torch  # here: importing vitseg_lab stays light (see __init__)

    items = t if isinstance(t, tuple) else (t,)
    for i, x in enumerate(items):
        if isinstance(x, torch.Tensor):
            continue
        what = f"{name}'s output {i}" if isinstance(t, tuple) else name
        kind = f"{type(x).__module__}.{type(x).__name__}".replace("builtins.", "")
        fix = {"numpy.ndarray": "compute it with torch operations (or torch.from_numpy(...)) so "
                                "gradients can flow",
               "list": "torch.stack(...) the list, or build the tensor without a Python list"}
        raise NotATensor(f"{what} returned a {kind}, not a torch.Tensor; return a tensor: "
                         f"{fix.get(kind, 'use torch operations only')}.")
    return t


def _short_exercise_traceback(shell, etype, value, tb, tb_offset=None):
    """IPython handler: show an unfinished exercise as one line, not a traceback into the library.

    The line is sent as the cell's error output (so the cell still fails, and nbgrader's
    Validate shows the message instead of an empty traceback).
    """
    stb = [f"{etype.__name__}: {value}"]
    show = getattr(shell, "_showtraceback", None)
    if show is not None:
        show(etype, value, stb)
    else:
        print(stb[0], file=sys.stderr)
    return stb


def _exercise_named(name: str | None) -> tuple[str, str, str] | None:
    """(module, tag, notebook) of the registered exercise called ``name``, or None."""
    if not name:
        return None
    for ch in CHAPTERS.values():
        for mod in ch.exercise_modules:
            fn = getattr(importlib.import_module(mod), name, None)
            tag = exercise_tag(fn) if callable(fn) else None
            if tag:
                return mod.rsplit(".", 1)[-1], tag, notebook_of(tag)
    return None


def _notebook_exception(shell, etype, value, tb, tb_offset=None):
    """IPython handler: course errors as one line; a NameError naming an exercise says which
    cell defines it; any other NameError gets IPython's usual traceback."""
    if issubclass(etype, NameError) and not issubclass(etype, PlugNameError):
        found = _exercise_named(getattr(value, "name", None))
        if found is None:
            shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
            return None
        mod, tag, notebook = found
        value = NameError(f"{value.name} is Exercise {tag} ({notebook}): run its solution cell "
                          f"(the one starting with @plug({mod})) before this one.")
    return _short_exercise_traceback(shell, etype, value, tb, tb_offset)


def install_notebook_hooks() -> None:
    """In IPython, print the course's errors (unfinished exercise, shape, rejected plug) as one
    line, and name the cell to run for a NameError on an exercise (the cell still fails)."""
    try:
        from IPython import get_ipython
    except ImportError:  # plain Python: nothing to install
        return
    ip = get_ipython()
    if ip is not None:
        ip.set_custom_exc((ExerciseNotDone, ShapeError, PlugNameError, PlugSignatureError,
                           NameError), _notebook_exception)
