"""Command line: ``vitseg-lab train|eval|data|bench`` (also ``python -m vitseg_lab``).

No logic of its own: flags are generated from each chapter's config dataclass (``--img_size 64``,
``--train.steps 2000``) and handed to the chapter's ``run(cfg)``. Under ``torchrun`` the same
command trains on every GPU (``fit()`` sets up DDP from the environment):

    torchrun --nproc_per_node 4 -m vitseg_lab.cli train segvit --scale full
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import subprocess
import sys
import typing
from pathlib import Path

# chapter name -> (module, config class)
CHAPTERS = {
    "attention": ("vitseg_lab.attention", "AttentionConfig"),
    "segvit": ("vitseg_lab.segvit", "SegViTConfig"),
}
BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _chapter(name: str):
    if name not in CHAPTERS:
        raise SystemExit(f"unknown chapter {name!r}; choose one of: {', '.join(CHAPTERS)}.")
    mod_name, cls_name = CHAPTERS[name]
    mod = importlib.import_module(mod_name)
    return mod, getattr(mod, cls_name)


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _field_type(tp):
    """The argparse converter for a dataclass field type (None: not settable from the CLI)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        tp = args[0]
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if typing.get_origin(tp) is tuple:
        inner = (typing.get_args(tp) or (str,))[0]
        return lambda s: tuple(inner(x) for x in s.split(","))
    return None


def _add_config_flags(p: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            _add_config_flags(p, tp, prefix=f"{prefix}{f.name}.")
            continue
        conv = _field_type(tp)
        if conv is not None:
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
    mod, cfg = _config(args)
    result = mod.run(cfg)
    print({k: round(v, 4) if isinstance(v, float) else v
           for k, v in (result.get("metrics") or {}).items()})
    return 0


def cmd_eval(args) -> int:
    mod, cfg = _config(args)
    if not hasattr(mod, "evaluate"):
        raise SystemExit(f"chapter {args.chapter!r} has no evaluate(); train it with `train`.")
    print(mod.evaluate(cfg, args.checkpoint))
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
    for name, fn, hlp in (("train", cmd_train, "train a chapter's model"),
                          ("eval", cmd_eval, "evaluate a checkpoint")):
        p = sub.add_parser(name, help=hlp,
                           epilog="Every config field is a flag: --FIELD V or --train.FIELD V.")
        p.add_argument("chapter", choices=sorted(CHAPTERS))
        p.add_argument("--scale", default="quick", choices=["smoke", "quick", "full"])
        if name == "eval":
            p.add_argument("checkpoint", help="path to a last.pt written by train")
        if chapter in CHAPTERS:
            _add_config_flags(p, _chapter(chapter)[1])
        p.set_defaults(func=fn)
    b = sub.add_parser("bench", help="run a script from benchmarks/")
    b.add_argument("name")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    try:
        from .data import fetch
    except ImportError:  # the data layer is optional for the other commands
        fetch = None
    if fetch is not None:
        fetch.add_data_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
