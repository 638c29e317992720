"""Is every part of every chapter there? ``python -m tools.chapter_check [slug ...]``.

``missing_parts(chapter)`` lists, by name, each part of the chapter protocol (docs/CONTRIBUTING.md,
"Adding a chapter") that a registry entry lacks: the files, the protocol functions, a hidden check
and three planted bugs for every exercise, a graded notebook cell for every exercise, the explorer,
the unit tests and the README row. ``tests/unit/test_chapters.py`` runs it for every chapter, plus
the functional checks (bugs caught, smoke step) that need more than a look.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

from vitseg_lab.chapters import CHAPTERS, Chapter
from vitseg_lab.exercises import exercise_tag

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ("quick_data", "build", "loss_fn", "metric_fn", "run", "full_scale_check", "load")
CONFIG_METHODS = ("quick", "smoke", "full", "for_scale")
CONFIG_FIELDS = ("train", "num_threads", "target", "target_metric")
RECORD_CALL = re.compile(r"""record\(\s*['"](\d+\.\d+)['"]""")
MIN_EXERCISES, MIN_BUGS = 4, 3


def exercises(ch: Chapter) -> dict[str, tuple[str, str]]:
    """tag -> (module, function name) of every exercise of ``ch`` in its exercise modules."""
    out: dict[str, tuple[str, str]] = {}
    for mod_name in ch.exercise_modules or (ch.module,):
        mod = importlib.import_module(mod_name)
        for name, fn in vars(mod).items():
            if inspect.isfunction(fn) and fn.__module__ == mod_name:
                tag = exercise_tag(fn)
                if tag and tag.split(".")[0] == str(ch.number):
                    out[tag] = (mod_name, name)
    return out


def notebook_tags(path: Path) -> dict[str, int]:
    """tag -> points of every graded test cell that records an exercise, in a built notebook."""
    nb = json.loads(path.read_text())
    out = {}
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade") and not meta.get("solution"):
            m = RECORD_CALL.search("".join(cell.get("source", "")))
            if m:
                out[m.group(1)] = meta.get("points", 0)
    return out


def missing_parts(ch: Chapter, root: Path = ROOT) -> list[str]:
    """Every missing part of chapter ``ch``, one short name each (empty when complete)."""
    missing: list[str] = []
    if not (root / ch.source).exists():
        missing.append(f"notebook source {ch.source}")
    if not (root / ch.notebook).exists():
        missing.append(f"built notebook {ch.notebook} (run `python -m tools.nbbuild`)")
    unit = f"tests/unit/test_{ch.slug}.py"
    if not (root / unit).exists():
        missing.append(f"unit tests {unit}")
    readme = (root / "README.md").read_text() if (root / "README.md").exists() else ""
    if not re.search(rf"^\|\s*{ch.nn}\s*\|.*{re.escape(ch.notebook)}.*\|", readme, re.MULTILINE) or \
            re.search(rf"^\|\s*{ch.nn}\s*\|.*\|\s*planned\s*\|\s*$", readme, re.MULTILINE):
        missing.append(f"README table row for {ch.nn} (with its notebook and quick-scale result)")

    try:
        mod = ch.load_module()
    except ImportError as e:
        return missing + [f"library module {ch.module} ({e})"]
    for name in PROTOCOL:
        if not callable(getattr(mod, name, None)):
            missing.append(f"protocol function {ch.module}.{name}")
    cfg_cls = getattr(mod, ch.config, None)
    if cfg_cls is None or not dataclasses.is_dataclass(cfg_cls):
        missing.append(f"config dataclass {ch.module}.{ch.config}")
    else:
        for name in CONFIG_METHODS:
            if not callable(getattr(cfg_cls, name, None)):
                missing.append(f"config method {ch.config}.{name}()")
        fields = {f.name for f in dataclasses.fields(cfg_cls)}
        for name in CONFIG_FIELDS:
            if name not in fields:
                missing.append(f"config field {ch.config}.{name}")
    try:
        explorer = ch.load_explorer()
        if not callable(explorer):
            missing.append(f"explorer {ch.explorer}")
    except (ImportError, AttributeError, ValueError):
        missing.append(f"explorer {ch.explorer}")

    tags = exercises(ch)
    if len(tags) < MIN_EXERCISES:
        missing.append(f"at least {MIN_EXERCISES} exercises (found {len(tags)})")
    try:
        grader = importlib.import_module(ch.grader)
    except ImportError:
        return missing + [f"grader file vitseg_lab/_grader/ch{ch.nn}.py"]
    checks, bugs = getattr(grader, "CHECKS", {}), getattr(grader, "BUGS", {})
    for tag in sorted(tags):
        mod_name, name = tags[tag]
        check = checks.get(tag)
        if check is None:
            missing.append(f"hidden check CHECKS[{tag!r}] ({name})")
        elif check.module != mod_name or check.name != name:
            missing.append(f"hidden check CHECKS[{tag!r}] targets {check.target}, not "
                           f"{mod_name.split('.', 1)[1]}.{name}")
        if len(bugs.get(tag, ())) < MIN_BUGS:
            missing.append(f"planted bugs BUGS[{tag!r}] (at least {MIN_BUGS}, "
                           f"found {len(bugs.get(tag, ()))})")
    for tag in sorted(set(checks) - set(tags)):
        missing.append(f"CHECKS[{tag!r}] names no exercise of this chapter")
    demo = getattr(grader, "DEMO", ())
    if not demo or any(t not in bugs for t in demo):
        missing.append("DEMO (exercises whose first bug the grading demo plants)")
    if (root / ch.notebook).exists():
        graded = notebook_tags(root / ch.notebook)
        for tag in sorted(tags):
            if tag not in graded:
                missing.append(f"graded test cell for Exercise {tag} in {ch.notebook}")
            elif not graded[tag]:
                missing.append(f"points for Exercise {tag}'s test cell")
    return missing


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(CHAPTERS)
    bad = 0
    for name in names:
        ch = CHAPTERS[name]
        parts = missing_parts(ch)
        print(f"{ch.nn} {ch.slug}: " + ("complete" if not parts else "missing " + "; ".join(parts)))
        bad += bool(parts)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
