"""Feedback: ``nbgrader generate_feedback`` and the check that nothing of ours reached it."""

from __future__ import annotations

import re
from pathlib import Path

from tools import edition
from tools.course import LIBRARY, chapter_notebooks, nbgrader


def secret_lines(course: Path | None = None) -> dict[str, set[str]]:
    """Lines that must never reach a learner, by kind (``tools.edition.secret_lines`` on the
    library and the chapter notebooks present)."""
    return edition.secret_lines(LIBRARY, list(chapter_notebooks().values()))


def find_leaks(folder: Path, kinds: tuple[str, ...] = ("solution", "hidden", "grader"),
               secrets: dict[str, set[str]] | None = None) -> list[str]:
    """Every file under ``folder`` vs the secret lines (``tools.edition.find_leaks``)."""
    return edition.find_leaks(folder, secrets or secret_lines(), kinds)


# What a feedback folder may hold (grading/vitseg_nbgrader.py: FEEDBACK_KEEP, its post-convert
# hook): the feedback pages and nbgrader's timestamp.txt, nothing else. A page may load no script
# or style sheet from the network (a learner's own markdown image link is the learner's).
_REMOTE = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*["']?"""
                     r"""(?:https?:)?//""", re.IGNORECASE)


def feedback_problems(folder: Path) -> list[str]:
    """What is wrong with one ``feedback/<student>/<assignment>/`` folder: any file but the
    feedback pages and timestamp.txt (the library, the grader, files the kernel wrote), and any
    page that loads something from the network (MathJax from a CDN, a remote script or style):
    feedback must open offline."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file() or not (p.suffix == ".html"
                                                     or p.name == "timestamp.txt"):
            out.append(f"{p}: not a feedback page (feedback holds the learner's pages only)")
        elif p.suffix == ".html":
            for m in _REMOTE.finditer(p.read_text(errors="ignore")):
                out.append(f"{p}: loads from the network: {m.group(0)[:120]}")
    return out


def feedback(course: Path, a: str, student: str = "*") -> list[str]:
    """``nbgrader generate_feedback`` + check that no hidden test or grader file reached it, and
    that each folder holds only offline feedback pages (nbgrader ignores a course config it
    cannot load, and then copies the library and links MathJax from a CDN: this says so)."""
    nbgrader(course, "generate_feedback", a, "--student", student, "--force", capture=True)
    leaks, problems = [], []
    for folder in sorted((course / "feedback").glob(f"{student}/{a}")):
        leaks += find_leaks(folder, ("hidden", "grader"))
        problems += feedback_problems(folder)
    if leaks:
        raise SystemExit("feedback leaks instructor material:\n" + "\n".join(leaks[:20]))
    if problems:
        raise SystemExit("feedback is not a set of offline pages (is the course's "
                         "nbgrader_config.py loading? run `python -m tools.grading build`):\n"
                         + "\n".join(problems[:20]))
    return leaks
