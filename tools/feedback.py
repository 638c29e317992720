"""Feedback: ``nbgrader generate_feedback`` and the check that nothing of ours reached it."""

from __future__ import annotations

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


def feedback(course: Path, a: str, student: str = "*") -> list[str]:
    """``nbgrader generate_feedback`` + check that no hidden test or grader file reached it."""
    nbgrader(course, "generate_feedback", a, "--student", student, "--force", capture=True)
    leaks = []
    for folder in sorted((course / "feedback").glob(f"{student}/{a}")):
        leaks += find_leaks(folder, ("hidden", "grader"))
    if leaks:
        raise SystemExit("feedback leaks instructor material:\n" + "\n".join(leaks[:20]))
    return leaks
