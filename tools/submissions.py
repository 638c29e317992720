"""Submissions: real ones collected from a folder, and the synthetic learners of the demo and the
tests (reference, empty, buggy, hidden-only bugs)."""

from __future__ import annotations

import datetime as _dt
import importlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import nbformat

from tools.course import chapter_notebooks
from tools.edition import unmark


def solution_cells(nb: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    return {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution")}


def reference_submission(course: Path, a: str) -> nbformat.NotebookNode:
    """The released notebook with every solution cell filled in with the reference code: what a
    learner who solved everything submits (hidden tests absent, as in the release)."""
    name = chapter_notebooks()[a].name
    rel = nbformat.read(course / "release" / a / name, as_version=4)
    src = solution_cells(nbformat.read(course / "source" / a / name, as_version=4))
    for gid, cell in solution_cells(rel).items():
        cell.source = unmark(src[gid].source)
    return rel


def empty_submission(course: Path, a: str) -> nbformat.NotebookNode:
    name = chapter_notebooks()[a].name
    return nbformat.read(course / "release" / a / name, as_version=4)


@dataclass(frozen=True)
class Mutation:
    exercise: str       # solution cell grade id = function name
    old: str            # text in the reference function, replaced once
    new: str
    mistake: str        # what the planted bug is, for the demo's table


def demo_mutations(a: str) -> list[Mutation]:
    """The planted bugs of the "buggy" demo learner: for each exercise listed in the chapter
    grader's ``DEMO``, its first ``BUGS`` entry (every bug is also unit-tested against its check,
    tests/unit/test_chapters.py; the demo proves the whole nbgrader pipeline on a few)."""
    grader = importlib.import_module(f"vitseg_lab._grader.{a}")
    out = []
    for tag in getattr(grader, "DEMO", ()):
        bug = grader.BUGS[tag][0]
        out.append(Mutation(grader.CHECKS[tag].name, bug.old, bug.new, bug.mistake))
    return out


# Mistakes that every *visible* test of the notebook lets through and only the hidden checks
# (run outside the kernel) catch: an in-place edit of an input, dtype drift on float64 inputs, and
# an argument that only a hidden case sets. The "demo-hidden" learner plants them; its lost points
# prove that the verdicts computed in nbgrader's process reach the gradebook.
HIDDEN_ONLY: dict[str, list[Mutation]] = {
    "ch01": [
        Mutation("softmax", "e = torch.exp(logits - m)", "logits -= m\n    e = torch.exp(logits)",
                 "the maximum subtracted in place: the caller's logits change (hidden: inputs "
                 "left unchanged)"),
    ],
    "ch03": [
        Mutation("atm_similarity", "return q @ k.transpose(-2, -1) / math.sqrt(dh)",
                 "return (q @ k.transpose(-2, -1) / math.sqrt(dh)).float()",
                 "result cast to float32 (hidden: float64 inputs keep their dtype)"),
        Mutation("sigmoid_focal_loss", "loss = alpha_t * (1 - p_t) ** gamma * bce * valid",
                 "loss = alpha_t * (1 - p_t) ** 2 * bce * valid",
                 "gamma hard-coded to its default (hidden: a case with gamma = 1)"),
    ],
}


def _plant(nb: nbformat.NotebookNode, a: str, mutations: list[Mutation]) -> list[Mutation]:
    cells = solution_cells(nb)
    planted = []
    for m in mutations:
        if m.exercise not in cells:
            continue
        src = cells[m.exercise].source
        if src.count(m.old) != 1:
            raise SystemExit(f"mutation for {a}:{m.exercise} no longer applies: {m.old!r} is not "
                             "in the reference solution exactly once (update BUGS in "
                             "vitseg_lab/_grader, or HIDDEN_ONLY in tools/submissions.py)")
        cells[m.exercise].source = src.replace(m.old, m.new)
        planted.append(m)
    return planted


def buggy_submission(course: Path, a: str) -> tuple[nbformat.NotebookNode, list[Mutation]]:
    nb = reference_submission(course, a)
    planted = _plant(nb, a, demo_mutations(a))
    if not planted:
        # A chapter without a table still gets one planted mistake: its first exercise undone.
        cells = solution_cells(nb)
        gid = next(iter(cells))
        body = cells[gid].source.splitlines()
        cells[gid].source = "\n".join(body[:docstring_end(body)] + [
            "    raise NotImplementedError()  # planted: exercise left undone"])
        planted.append(Mutation(gid, "", "", "left undone"))
    return nb, planted


def hidden_only_submission(course: Path, a: str) -> tuple[nbformat.NotebookNode, list[Mutation]]:
    """The reference with the ``HIDDEN_ONLY`` mistakes of chapter ``a`` planted (none: reference)."""
    nb = reference_submission(course, a)
    return nb, _plant(nb, a, HIDDEN_ONLY.get(a, []))


def docstring_end(lines: list[str]) -> int:
    quotes = 0
    for i, ln in enumerate(lines):
        quotes += ln.count('"""')
        if quotes >= 2:
            return i + 1
    return 2


def submit(course: Path, student: str, a: str, nb: nbformat.NotebookNode,
           name: str | None = None, timestamp: str | None = None) -> Path:
    """Place ``nb`` as ``submitted/<student>/<a>/<name>`` (what `collect` does for real files)."""
    name = name or chapter_notebooks()[a].name
    folder = course / "submitted" / student / a
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    path = folder / name
    nbformat.write(nb, path)
    if timestamp:
        (folder / "timestamp.txt").write_text(timestamp)
    return path


def collect(course: Path, a: str, folder: Path, id_regex: str | None = None) -> list[str]:
    """Copy a folder of learner notebooks into ``submitted/<id>/<a>/``.

    Accepted layouts: ``DIR/<id>/<anything>.ipynb`` or ``DIR/<id>.ipynb``; with ``--id-regex``,
    the ``id`` group of the regex applied to each file name (e.g. an LMS download
    ``(?P<id>[a-z0-9]+)_\\d+_.*\\.ipynb``). The file's modification time becomes timestamp.txt.
    """
    expected = chapter_notebooks()[a].name
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in p.parts:
            continue
        if id_regex:
            m = re.search(id_regex, p.name)
            if not m:
                continue
            sid = m.group("id")
        elif p.parent != folder:
            sid = p.relative_to(folder).parts[0]
        else:
            sid = p.stem
        sid = re.sub(r"[^A-Za-z0-9_.@-]", "_", sid)
        if sid in found:
            print(f"warning: two notebooks for {sid}: {found[sid].name}, {p.name} (kept the newer)")
            if p.stat().st_mtime < found[sid].stat().st_mtime:
                continue
        found[sid] = p
    for sid, p in found.items():
        ts = _dt.datetime.fromtimestamp(p.stat().st_mtime, _dt.timezone.utc)
        dest = course / "submitted" / sid / a
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.ipynb"):
            old.unlink()
        shutil.copy(p, dest / expected)
        (dest / "timestamp.txt").write_text(ts.strftime("%Y-%m-%d %H:%M:%S.%f %Z"))
    return sorted(found)
