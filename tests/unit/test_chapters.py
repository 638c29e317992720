"""The completeness test: every chapter in the registry has every part of the chapter protocol.

Parametrised over ``vitseg_lab.chapters.CHAPTERS`` (as timm parametrises its tests over its model
zoo): a chapter missing a part fails with the part's name (``tools/chapter_check.py``), and the
functional parts are exercised here — every planted bug is caught by its exercise's hidden check,
the reference passes it, the hidden cases exercise distinct sizes, ``Config.smoke()`` builds and
takes a forward and backward pass on ShapeScenes.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
from pathlib import Path

import pytest
import torch

from tools import chapter_check
from vitseg_lab.chapters import CHAPTERS, RunResult, by_number, chapter_of_tag, get
from vitseg_lab.exercises import ExerciseNotDone, notebook_of

ROOT = Path(__file__).resolve().parents[2]
CH = list(CHAPTERS.values())


def _checks():
    out = []
    for ch in CH:
        try:
            grader = importlib.import_module(ch.grader)
        except ImportError:
            continue                       # reported by test_chapter_is_complete
        for tag in grader.CHECKS:
            out.append(pytest.param(ch, tag, id=f"{ch.slug}-{tag}"))
    return out


@pytest.mark.parametrize("ch", CH, ids=lambda c: c.slug)
def test_chapter_is_complete(ch):
    missing = chapter_check.missing_parts(ch)
    assert not missing, f"chapter {ch.nn} ({ch.slug}) is missing: " + "; ".join(missing)


@pytest.mark.parametrize("ch, tag", _checks())
def test_reference_passes_and_every_planted_bug_is_caught(ch, tag):
    from vitseg_lab._grader import common

    check = common.check_for(tag)
    assert common.check_function(tag, check.library_function(), seed=7) is None, \
        f"the reference solution of Exercise {tag} fails its own hidden check"
    grader = importlib.import_module(ch.grader)
    for bug in grader.BUGS.get(tag, []):
        msg = common.check_function(tag, common.mutated(check, bug), seed=11)
        assert msg, f"Exercise {tag}: the planted bug {bug.mistake!r} passes the hidden check"


@pytest.mark.parametrize("ch, tag", _checks())
def test_hidden_cases_have_a_distinct_size_on_every_axis_and_vary_with_the_seed(ch, tag):
    from vitseg_lab._grader import common

    check = common.check_for(tag)
    a, b = check.cases(common.gen(1)), check.cases(common.gen(2))

    def named(case):
        for k, v in case.items():
            if torch.is_tensor(v):
                yield k, v
            elif isinstance(v, (list, tuple)):
                yield from ((k, t) for t in v if torch.is_tensor(t))

    def tensors(case):
        return (t for _, t in named(case))

    def distinct(case):
        # size-1 axes are singletons by contract (a CLS token (1, 1, C)), and ``check.square``
        # inputs are square by contract; every other axis of an input must differ from the
        # others, so a transposition cannot keep the shape
        shapes = [[n for n in (t.shape[:-1] if k in check.square else t.shape) if n != 1]
                  for k, t in named(case) if t.dim() >= 2]
        return shapes and all(len(set(s)) == len(s) for s in shapes)

    assert any(distinct(c) for c in a), (
        f"Exercise {tag}: no hidden case has a distinct size on every axis of every input "
        "(a transposed non-square shape could pass)")
    assert len(a) == len(b) and [tuple(t.shape) for c in a for t in tensors(c)] == \
        [tuple(t.shape) for c in b for t in tensors(c)], "case shapes must not depend on the seed"
    assert any(not torch.equal(x, y) for ca, cb in zip(a, b)
               for x, y in zip(tensors(ca), tensors(cb))), \
        f"Exercise {tag}: hidden case values do not change with the grader's seed"


@pytest.mark.parametrize("ch", CH, ids=lambda c: c.slug)
def test_smoke_config_builds_and_takes_a_step_on_shapescenes(ch):
    mod = ch.load_module()
    cfg = ch.config_class().smoke()
    train, _ = mod.quick_data(cfg)
    model = mod.build(cfg, train.num_classes)
    batch = train.collate([train[i] for i in range(min(2, len(train)))])
    terms = mod.loss_fn(model, batch)
    assert torch.isfinite(terms["loss"]), f"{ch.slug}: smoke loss is {terms['loss']}"
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), f"{ch.slug}: no gradient flows"


@pytest.mark.parametrize("ch", CH, ids=lambda c: c.slug)
def test_cli_knows_the_chapter(ch):
    from vitseg_lab import cli

    assert ch.slug in cli.CHAPTERS, f"`vitseg-lab train {ch.slug}` is unknown to the CLI"


def test_registry_is_consistent():
    numbers = [c.number for c in CH]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    for ch in CH:
        assert get(ch.slug) is ch and by_number(ch.number) is ch and get(ch.assignment) is ch
        assert ch.module in ch.exercise_modules
        assert chapter_of_tag(f"{ch.number}.1") is ch and notebook_of(f"{ch.number}.1") == ch.notebook
        assert ch.notebook.startswith(f"notebooks/{ch.nn}_")
    with pytest.raises(KeyError, match="choose one of"):
        get("nope")


def test_exercise_not_done_names_the_notebook_from_the_tag():
    # losses.py holds chapter 03's exercises; the tag alone says where to go
    assert "notebooks/03_segvit_atm.ipynb" in str(ExerciseNotDone("3.5"))
    assert "its chapter notebook" in str(ExerciseNotDone("9.9"))


def test_run_result_summary_states_metric_baseline_and_target():
    r = RunResult(model=None, history=None, metrics={"mIoU": 0.9}, target_metric="mIoU",
                  target=0.8, seconds=12.0, config={}, baseline={"mIoU": 0.1})
    assert r.reached and "0.900" in r.summary() and "0.100" in r.summary()
    assert not dataclasses.replace(r, metrics={"mIoU": 0.5}).reached


# ---------------------------------------------------------------------------- the test can fail

@pytest.fixture
def throwaway(tmp_path):
    """A copy of what the file checks read, for chapter 01."""
    ch = CHAPTERS["attention"]
    for rel in (ch.source, ch.notebook, f"tests/unit/test_{ch.slug}.py", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return ch, tmp_path


def test_removing_any_part_fails_with_its_name(throwaway, monkeypatch):
    ch, root = throwaway
    assert chapter_check.missing_parts(ch, root) == []
    for rel, name in [(ch.source, "notebook source"), (ch.notebook, "built notebook"),
                      (f"tests/unit/test_{ch.slug}.py", "unit tests")]:
        data = (root / rel).read_bytes()
        (root / rel).unlink()
        assert any(name in m for m in chapter_check.missing_parts(ch, root)), name
        (root / rel).write_bytes(data)
    readme = (root / "README.md").read_text()
    (root / "README.md").write_text("\n".join(ln for ln in readme.splitlines()
                                              if ch.notebook not in ln))
    assert any("README" in m for m in chapter_check.missing_parts(ch, root))
    (root / "README.md").write_text(readme)

    grader = importlib.import_module(ch.grader)
    mod = ch.load_module()
    cases = [
        (lambda: monkeypatch.delitem(grader.CHECKS, "1.4"), "hidden check CHECKS['1.4']"),
        (lambda: monkeypatch.setitem(grader.BUGS, "1.5", grader.BUGS["1.5"][:2]),
         "planted bugs BUGS['1.5']"),
        (lambda: monkeypatch.setattr(grader, "DEMO", ()), "DEMO"),
        (lambda: monkeypatch.delattr(mod, "metric_fn"), "protocol function"),
        (lambda: monkeypatch.setattr(importlib.import_module("vitseg_lab.widgets"),
                                     ch.explorer.split(":")[1], None), "explorer"),
    ]
    for remove, name in cases:
        with monkeypatch.context() as m:
            monkeypatch_ = m  # noqa: F841 - each removal is undone before the next
            remove()
            found = chapter_check.missing_parts(ch, root)
            assert any(name in f for f in found), (name, found)
            monkeypatch.undo()
    assert chapter_check.missing_parts(ch, root) == []


def test_readme_table_lists_the_registry_and_marks_the_rest_planned():
    import re

    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\|\s*(\d\d)\s*\|\s*`(notebooks/[^`]+)`.*\|\s*([^|]*?)\s*\|\s*$", readme,
                      re.MULTILINE)
    assert rows, "the README has no chapter table"
    known = {ch.nn: ch for ch in CH}
    for nn, notebook, result in rows:
        if nn in known:
            assert notebook == known[nn].notebook, (nn, notebook)
            assert result != "planned", f"chapter {nn} is built: state its quick-scale result"
        else:
            assert result == "planned", f"README row {nn} is not in the registry: mark it planned"
