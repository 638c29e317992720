"""The instructors' tools around a real course (issue 18): the reference learner as a check,
grade files inside the course (never the repository), and feedback pages that are only the
learner's pages and open offline (math pre-rendered as MathML, no MathJax from a CDN).

The pure parts (math conversion, the folder check, the verdict of the reference check) run in
seconds; one module fixture grades the reference learner of chapter 01 in a copy of the
session's course through the real command line (about a minute or two).
"""

from __future__ import annotations

import csv
import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tools import grading as g

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "grading"))
import vitseg_nbgrader as hooks  # grading/: the module the course config imports

A = "ch01"


def _markdown_formulas(nb: nbformat.NotebookNode) -> list[str]:
    """The TeX of every $…$ / $$…$$ in the markdown cells (outside code), as PrerenderMath sees it."""
    out = []
    for c in nb.cells:
        if c.cell_type != "markdown":
            continue
        text = hooks._CODE.sub("", c.source)
        out += [m.group(1) if m.group(1) is not None else m.group(2)
                for m in hooks._MATH.finditer(text)]
    return out


# ------------------------------------------------------------------------------ math, offline

def test_markdown_math_becomes_mathml_and_code_is_left_alone():
    text, n = hooks.prerender_math(
        "softmax $\\mathrm{softmax}(x)_i = \\frac{e^{x_i}}{\\sum_j e^{x_j}}$ is stable;\n"
        "$$z_0 = [x_{cls}; x_1E] + E_{pos}$$\n"
        "code `$not math$`, a price \\$5, and $a^*_*$.\n\n```python\nx = '$y$'\n```\n")
    assert n == 3
    assert text.count("<math ") == 3 and 'display="block"' in text
    assert "`$not math$`" in text and "\\$5" in text and "x = '$y$'" in text
    assert "cdn" not in text.lower() and "<script" not in text
    # nothing inside the MathML that markdown would turn into emphasis or a link
    for m in re.finditer(r"<math .*?</math>", text):
        assert not re.search(r">[^<]*[*_`\[\]$\\][^<]*<", m.group(0)), m.group(0)
    rendered = hooks.tex_to_html("\\frac{1}{", display=False)      # cannot convert: the source
    assert rendered.startswith('<code class="vitseg-tex">') and "<script" not in rendered


@pytest.mark.parametrize("nb_path", sorted(g.chapter_notebooks().values()), ids=lambda p: p.stem)
def test_every_formula_of_every_chapter_converts(nb_path):
    try:
        import latex2mathml  # noqa: F401
    except ImportError:
        pytest.fail("latex2mathml is not installed: the grading environment needs it for the "
                    "feedback pages' math (pyproject.toml, dev extras)")
    nb = nbformat.read(nb_path, as_version=4)
    formulas = _markdown_formulas(nb)
    assert formulas, f"{nb_path.name}: no math found (the pattern is broken?)"
    failed = [f for f in formulas if "vitseg-tex" in hooks.tex_to_html(f, display=False)]
    assert failed == [], f"{nb_path.name}: shown as TeX source, not MathML: {failed[:5]}"


def test_feedback_folder_keeps_only_the_pages(tmp_path):
    folder = tmp_path / "feedback" / "alice" / A
    (folder / "vitseg_lab" / "_grader").mkdir(parents=True)
    (folder / "vitseg_lab" / "attention.py").write_text("x = 1\n")
    (folder / "01_vit_attention.html").write_text("<html><body>ok</body></html>")
    (folder / "timestamp.txt").write_text("2026-12-01 10:00:00")
    (folder / "runs").mkdir()
    (folder / "notes.txt").write_text("written by the kernel")
    problems = g.feedback_problems(folder)
    assert any("vitseg_lab" in p for p in problems) and any("notes.txt" in p for p in problems)
    hooks.strip_feedback_folder(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["01_vit_attention.html", "timestamp.txt"]
    assert g.feedback_problems(folder) == []
    (folder / "01_vit_attention.html").write_text(
        '<script src="https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.7/latest.js"></script>')
    assert ["loads from the network" in p for p in g.feedback_problems(folder)] == [True]


# --------------------------------------------------------------- the reference check's verdict

def test_reference_check_fails_and_keeps_the_learner_when_marks_are_missing(course, monkeypatch,
                                                                          tmp_path):
    """The verdict itself (no grading): a reference learner short of full marks is a failed check,
    exit 1, and ``--remove`` keeps it to look at."""
    from tools import demo

    pts = g.exercise_points(course.root, A)
    total = sum(sum(v.values()) for v in pts.values())
    calls = []
    monkeypatch.setattr(demo, "submit", lambda *a, **k: calls.append("submit"))
    monkeypatch.setattr(demo, "autograde", lambda *a, **k: calls.append("autograde"))
    monkeypatch.setattr(demo, "feedback", lambda *a, **k: calls.append("feedback"))
    monkeypatch.setattr(demo, "remove_learner", lambda *a, **k: calls.append("remove"))
    monkeypatch.setattr(demo, "gradebook_scores", lambda c: {
        ("reference-check", A): {"score": total - 5, "max_score": total,
                                 "needs_manual_grade": False, "grades": {}}})
    assert g.main(["--course", str(course.root), "add-reference-learner", A, "--remove"]) == 1
    assert calls == ["submit", "autograde", "feedback"]           # not removed: it failed
    text, ok, info = demo.add_reference_learner(course.root, [A])
    assert not ok and "NOT FULL MARKS" in text and info["scores"][A][0] == total - 5
    monkeypatch.setattr(demo, "gradebook_scores", lambda c: {
        ("reference-check", A): {"score": total, "max_score": total,
                                 "needs_manual_grade": True, "grades": {}}})
    assert not demo.add_reference_learner(course.root, [A])[1]     # manual grading left: no
    with pytest.raises(SystemExit, match="not a built course"):
        demo.add_reference_learner(tmp_path, [A])


# ------------------------------------------------- one real run: reference learner, feedback, export

@pytest.fixture(scope="module")
def checked(course, tmp_path_factory):
    """A copy of the session's course (so no other test sees this learner) with the reference
    learner of chapter 01 added through the command line."""
    root = tmp_path_factory.mktemp("reference") / "course"
    shutil.copytree(course.root, root, symlinks=True,
                    ignore=shutil.ignore_patterns(".workers"))
    rc = g.main(["--course", str(root), "add-reference-learner", A])
    return root, rc


@pytest.mark.slow
def test_add_reference_learner_gives_full_marks_in_a_real_course(checked):
    root, rc = checked
    assert rc == 0
    got = g.gradebook_scores(root)[("reference-check", A)]
    assert got["score"] == got["max_score"] > 0 and not got["needs_manual_grade"]
    assert (root / "autograded" / "reference-check" / A).is_dir()


@pytest.mark.slow
def test_feedback_is_the_page_alone_offline_with_math_rendered(checked):
    root, _ = checked
    folder = root / "feedback" / "reference-check" / A
    assert [p.name for p in folder.iterdir() if p.name != "timestamp.txt"] == [
        g.chapter_notebooks()[A].stem + ".html"], "feedback carries more than the page"
    assert g.feedback_problems(folder) == []
    page = (folder / (g.chapter_notebooks()[A].stem + ".html")).read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page), "a script is loaded"
    assert "cdnjs" not in page and "MathJax.Hub" not in page
    release = nbformat.read(root / "release" / A / g.chapter_notebooks()[A].name, as_version=4)
    formulas = _markdown_formulas(release)
    assert len(formulas) > 10
    # every formula arrived as MathML (the page may hold more <math>: none is left as TeX)
    assert page.count("<math ") >= len(formulas)
    raw = [f for f in formulas if f"${html.escape(f, quote=False)}$" in page]
    assert raw == [], f"shown as raw TeX: {raw[:3]}"


@pytest.mark.slow
def test_export_writes_inside_the_course_never_the_current_folder(checked, tmp_path, monkeypatch):
    root, _ = checked
    monkeypatch.chdir(tmp_path)
    assert g.main(["--course", str(root), "export"]) == 0
    assert g.main(["--course", str(root), "export", "--to", "grades.csv"]) == 0   # the old docs
    assert g.main(["--course", str(root), "scores", "--csv", "cells.csv"]) == 0
    assert list(tmp_path.iterdir()) == [], "a grade file landed in the current folder"
    grades = root / "reports" / "grades.csv"
    rows = [r for r in csv.DictReader(grades.open()) if r["student_id"] == "reference-check"
            and r["assignment"] == A]
    assert len(rows) == 1 and float(rows[0]["score"]) == float(rows[0]["max_score"]) > 0
    assert (root / "reports" / "grades-cells.csv").exists()
    assert (root / "reports" / "cells.csv").exists()


def test_default_course_and_stray_grade_files_are_ignored_by_git():
    """The default course (grading/course/, where `export` writes reports/grades.csv) and grade
    files saved at the repository root are git-ignored."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["grading/course/reports/grades.csv", "grading/course/reports/grades-cells.csv",
             "grades.csv", "grades-cells.csv", "cells.csv"]
    p = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, text=True, check=False,
                       capture_output=True)
    assert sorted(p.stdout.split()) == sorted(paths), p.stdout + p.stderr


@pytest.mark.slow
def test_remove_learner_takes_it_out_again(checked, tmp_path):
    root, _ = checked
    copy = tmp_path / "course"
    shutil.copytree(root, copy, symlinks=True)
    g.remove_learner(copy, "reference-check")
    assert ("reference-check", A) not in g.gradebook_scores(copy)
    for part in ("submitted", "autograded", "feedback"):
        assert not (copy / part / "reference-check").exists()
