"""Command line: ``vitseg-lab train|eval|data|bench`` (also ``python -m vitseg_lab``).

No logic of its own: the chapters are the registry's (``vitseg_lab.chapters.CHAPTERS``), flags are
generated from each chapter's config dataclass (``--img_size 64``, ``--train.steps 2000``) and
handed to the chapter's ``run(cfg)``. Under ``torchrun`` the same command trains on every GPU
(``fit()`` sets up DDP from the environment):

    torchrun --nproc_per_node 4 -m vitseg_lab.cli train segvit --scale full

``train`` exits with status 2, printing every missing piece, when a full-scale run cannot start;
``eval CHAPTER --ckpt PATH`` rebuilds the model with the chapter's ``load`` and prints its
``metric_fn`` on the validation data the checkpoint's config names.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

from . import chapters, fastpath
from .data import common, fetch
from .train import CheckpointError, evaluate, num_threads, process_group

CHAPTERS = chapters.CHAPTERS  # slug -> Chapter: the registry is the one list of chapters
BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
EXIT_MISSING = 2  # `train` could not start: pieces are missing (a batch job must not count it done)


def _chapter(name: str):
    if name not in CHAPTERS:
        raise SystemExit(f"unknown chapter {name!r}; choose one of: {', '.join(CHAPTERS)}.")
    ch = CHAPTERS[name]
    return ch.load_module(), ch.config_class()


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _field_type(tp):
    """The argparse converter for a dataclass field type (None: not settable from the CLI).

    Scalars as themselves (``true``/``false`` for bools); ``X | None`` as ``X``; a union of
    scalars (``bool | str``) tries each in turn, strings last. Tuples: comma-separated
    (``--out_layers 5,7,11``); a fixed-length tuple checks the count; a tuple of tuples separates
    its members with ``;`` (``--anchor_sizes 12,16;24;40`` -> ``((12, 16), (24,), (40,))``).
    A Python literal works for any tuple (``--anchor_sizes "((12, 16), (24,), (40,))"``).
    """
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if len(args) == 1:
            return _field_type(args[0])
        convs = [_field_type(a) for a in sorted(args, key=lambda a: a is str)]  # str: last resort
        if not args or any(c is None or typing.get_origin(a) is tuple
                           for a, c in zip(args, convs)):
            return None
        return _named(lambda s: _first_that_parses(convs, s), " | ".join(
            getattr(a, "__name__", str(a)) for a in args))
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if typing.get_origin(tp) is tuple:
        return _named(lambda s: _parse_tuple(tp, s), _type_name(tp))
    return None


def _named(fn, name: str):
    fn.__name__ = name  # argparse names the type in its "invalid ... value" message
    return fn


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "")


def _first_that_parses(convs, s: str):
    for conv in convs:
        try:
            return conv(s)
        except (ValueError, argparse.ArgumentTypeError):
            continue
    raise ValueError(s)


def _tuple_members(tp) -> tuple[list, bool]:
    """(member types, variadic) of a tuple type: tuple[int, ...] -> ([int], True)."""
    targs = typing.get_args(tp)
    if not targs:
        return [str], True
    if len(targs) == 2 and targs[1] is Ellipsis:
        return [targs[0]], True
    return list(targs), False


def _parse_tuple(tp, value):
    """``value`` (a CLI string, or a parsed literal's list/tuple) -> a tuple of type ``tp``."""
    import ast

    members, variadic = _tuple_members(tp)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("(", "[")):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as e:
                raise argparse.ArgumentTypeError(f"{value!r} is not a Python tuple literal") from e
            if not isinstance(value, (list, tuple)):
                raise argparse.ArgumentTypeError(f"{text!r} is not a tuple")
        else:
            nested = any(typing.get_origin(m) is tuple for m in members)
            value = [] if not text else [x.strip() for x in text.split(";" if nested else ",")]
    if not isinstance(value, (list, tuple)):
        value = [value]
    if not variadic and len(value) != len(members):
        raise argparse.ArgumentTypeError(
            f"{_type_name(tp)} takes {len(members)} values, got {len(value)}: {value!r}")
    out = []
    for i, x in enumerate(value):
        m = members[0] if variadic else members[i]
        if typing.get_origin(m) is tuple:
            out.append(_parse_tuple(m, x))
            continue
        conv = _field_type(m)
        if conv is None:
            raise argparse.ArgumentTypeError(f"{_type_name(tp)} cannot be set from the CLI")
        out.append(conv(str(x)))  # a literal's 12 / 0.5 / True parse as the CLI's text would
    return tuple(out)


def eval_field(key: str) -> bool:
    """Whether `eval` may change config field ``key`` (dotted): how a trained model is evaluated
    (test-time scales and flip, sliding windows, CRF, batch, device, threads), never what the
    checkpoint's model is."""
    return (key.startswith(("test_", "eval_", "slide_"))
            or key in {"crf", "num_threads", "train.batch_size", "train.device", "train.amp",
                       "train.num_workers", "train.fast"})


def _add_config_flags(p: argparse.ArgumentParser, cls, prefix: str = "",
                      keep=lambda key: True) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            _add_config_flags(p, tp, prefix=f"{prefix}{f.name}.", keep=keep)
            continue
        conv = _field_type(tp)
        if conv is not None and keep(f"{prefix}{f.name}"):
            p.add_argument(f"--{prefix}{f.name}", type=conv, default=None,
                           metavar=getattr(tp, "__name__", "V"))


def _apply(cfg, values: dict, prefix: str = ""):
    changes = {}
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            new = _apply(sub, values, prefix=f"{key}.")
            if new is not sub:
                changes[f.name] = new
        elif values.get(key) is not None:
            changes[f.name] = values[key]
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _config(args):
    mod, cls = _chapter(args.chapter)
    cfg = cls.for_scale(args.scale)
    return mod, _apply(cfg, vars(args))


def cmd_train(args) -> int:
    from .fastpath import single_gpu_on_mig

    trains, mig = single_gpu_on_mig()  # torchrun on a MIG slice: rank 0 alone, single-GPU
    if mig:
        print(mig, file=sys.stderr)
    if not trains:
        return 0
    mod, cfg = _config(args)
    if args.scale.startswith("full"):  # before any weight or data set is touched: every piece
        missing = mod.full_scale_check(cfg)
        if missing:
            print(missing, file=sys.stderr)
            return EXIT_MISSING
    result = mod.run(cfg)
    if result.skipped:
        print(result.skipped, file=sys.stderr)
        return EXIT_MISSING
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports (same metrics)
        return 0
    print(result.summary())
    print({k: round(v, 4) if isinstance(v, float) else v
           for k, v in result.metrics.items() if isinstance(v, (int, float))})
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint} (evaluate it: vitseg-lab eval {args.chapter} "
              f"--ckpt {result.checkpoint})")
    return 0


def cmd_eval(args) -> int:
    mod, _ = _chapter(args.chapter)
    if not Path(args.ckpt).is_file():
        raise SystemExit(f"no checkpoint at {args.ckpt}; `vitseg-lab train {args.chapter}` "
                         "writes one (its last line names the path).")
    try:
        model = mod.load(args.ckpt)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    cfg = model.cfg = _apply(model.cfg, vars(args))  # the eval-time flags (eval_field)
    quick = getattr(cfg, "dataset", "shapes") == "shapes"
    if not quick and not hasattr(mod, "full_data"):
        raise SystemExit(f"chapter {args.chapter!r} has no full_data(cfg) to evaluate a "
                         "full-scale checkpoint with.")
    val = (mod.quick_data(cfg) if quick else mod.full_data(cfg))[1]
    # On the training device; under torchrun each rank evaluates its shard (as in fit).
    with num_threads(getattr(cfg, "num_threads", None)), process_group(cfg.train) as device:
        model = fastpath.prepare(model, cfg.train, device)
        metrics = evaluate(model, val, cfg.train, mod.loss_fn, mod.metric_fn,
                           getattr(val, "collate", None) or common.collate, device)
    if int(os.environ.get("RANK", "0")) == 0:
        print({k: round(v, 4) if isinstance(v, float) else v
               for k, v in metrics.items() if isinstance(v, (int, float))})
    return 0


def cmd_bench(args) -> int:
    scripts = sorted(p.stem for p in BENCH_DIR.glob("*.py"))
    if args.name not in scripts:
        raise SystemExit(f"unknown benchmark {args.name!r}; available: {', '.join(scripts)}.")
    return subprocess.call([sys.executable, str(BENCH_DIR / f"{args.name}.py"), *args.rest])


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vitseg-lab", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    # The chapter must be known before its config flags can be added.
    argv = sys.argv[1:] if argv is None else argv
    chapter = argv[1] if len(argv) > 1 and argv[0] in ("train", "eval") else None
    p = sub.add_parser("train", help="train a chapter's model",
                       epilog="Every config field is a flag: --FIELD V or --train.FIELD V "
                              "(e.g. --train.lr 1e-3).")
    p.add_argument("chapter", choices=list(CHAPTERS))
    p.add_argument("--scale", default="quick", choices=["smoke", "quick", "full", "full-large"])
    if chapter in CHAPTERS:
        _add_config_flags(p, _chapter(chapter)[1])
    p.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint written by train",
                       epilog="Flags for how to evaluate, not what: test-time scales and flip "
                              "(segvit: --test_ratios 0.5,0.75,1.0,1.25,1.5,1.75 --test_flip true; "
                              "afa: --eval_scales, --eval_flip, --crf), sliding windows, "
                              "--train.batch_size, --train.device, --num_threads.")
    e.add_argument("chapter", choices=list(CHAPTERS))
    e.add_argument("--ckpt", required=True, help="a last.pt written by `vitseg-lab train`")
    if chapter in CHAPTERS:
        _add_config_flags(e, _chapter(chapter)[1], keep=eval_field)
    e.set_defaults(func=cmd_eval)
    b = sub.add_parser("bench", help="run a script from benchmarks/")
    b.add_argument("name")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    fetch.add_data_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
