"""Reading the gradebook: scores per learner, assignment and test cell; tables, CSVs and the review
list of the monkeypatch scan."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nbformat

from tools.course import chapter_notebooks


def gradebook_scores(course: Path) -> dict[tuple[str, str], dict]:
    """{(student, assignment): {score, max_score, needs_manual_grade, grades: {id: (s, max)}}}."""
    from nbgrader.api import Gradebook, MissingEntry

    course = course.resolve()
    out = {}
    cid = os.environ.get("VITSEG_COURSE_ID", "vitseg-lab")
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", course_id=cid) as gb:
        for s in gb.students:
            for a in gb.assignments:
                try:
                    sub = gb.find_submission(a.name, s.id)
                except MissingEntry:
                    continue
                grades = {g.name: (g.score, g.max_score) for nb in sub.notebooks
                          for g in nb.grades}
                out[(s.id, a.name)] = {"score": sub.score, "max_score": sub.max_score,
                                       "needs_manual_grade": sub.needs_manual_grade,
                                       "grades": grades}
    return out


def exercise_points(course: Path, a: str) -> dict[str, dict[str, float]]:
    """{solution grade id: {test grade id: points}} — the test cells after each solution cell."""
    name = chapter_notebooks()[a].name
    nb = nbformat.read(course / "source" / a / name, as_version=4)
    out: dict[str, dict[str, float]] = {}
    current = None
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            current = meta["grade_id"]
            out.setdefault(current, {})
        elif meta.get("grade") and current is not None:
            out[current][meta["grade_id"]] = float(meta.get("points", 0))
    return out


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def score_table(course: Path, students: list[str] | None = None) -> str:
    scores = gradebook_scores(course)
    assignments = sorted({a for _, a in scores})
    studs = students or sorted({s for s, _ in scores})
    rows = [["student", *assignments, "total"]]
    for s in studs:
        row, tot, mx = [s], 0.0, 0.0
        for a in assignments:
            r = scores.get((s, a))
            if r is None:
                row.append("-")
                continue
            row.append(f"{r['score']:g}/{r['max_score']:g}" + (" *" if r["needs_manual_grade"] else ""))
            tot, mx = tot + r["score"], mx + r["max_score"]
        row.append(f"{tot:g}/{mx:g}")
        rows.append(row)
    return format_table(rows)


def write_scores_csv(course: Path, path: Path) -> None:
    scores = gradebook_scores(course)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "assignment", "cell", "score", "max_score", "needs_manual_grade"])
        for (s, a), r in sorted(scores.items()):
            for cell, (sc, mx) in sorted(r["grades"].items()):
                w.writerow([s, a, cell, sc, mx, r["needs_manual_grade"]])
            w.writerow([s, a, "TOTAL", r["score"], r["max_score"], r["needs_manual_grade"]])


def review_rows(course: Path) -> list[dict]:
    """Flagged lines of every preflight report (the monkeypatch scan) and structural repairs."""
    rows = []
    for rep in sorted((course / "reports").glob("*/preflight/*.json")):
        data = json.loads(rep.read_text())
        for nb, entry in data["notebooks"].items():
            for f in entry.get("findings", []):
                rows.append({"kind": "patch", "student": data["student"],
                             "assignment": data["assignment"], "notebook": nb, "cell": f["cell"],
                             "grade_id": f["grade_id"], "line_no": f["line_no"], "line": f["line"],
                             "reason": f["reason"]})
            for i in entry.get("issues", []):
                rows.append({"kind": i["kind"], "student": data["student"],
                             "assignment": data["assignment"], "notebook": nb, "cell": "",
                             "grade_id": i["grade_id"], "line_no": "", "line": "",
                             "reason": i["message"]})
    return rows


def write_review_csv(course: Path, path: Path | None = None) -> Path:
    path = path or course / "reports" / "review.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = review_rows(course)
    fields = ["kind", "student", "assignment", "notebook", "cell", "grade_id", "line_no", "line",
              "reason"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def exports_dir(course: Path) -> Path:
    """Where grade files go by default: ``<course>/reports/`` (inside the course folder, which is
    git-ignored for the default ``grading/course/``: grades never land in the repository)."""
    return course.resolve() / "reports"


def export_grades(course: Path, to: Path | None = None) -> tuple[Path, Path]:
    """``nbgrader export`` to ``to`` (default ``<course>/reports/grades.csv``) and the per-cell
    scores next to it (``<stem>-cells.csv``). A relative ``to`` is taken relative to the course
    folder's ``reports/``, not to the current directory. Returns (grades, cells)."""
    from tools.course import nbgrader

    base = exports_dir(course)
    to = Path(to) if to is not None else Path("grades.csv")
    to = (to if to.is_absolute() else base / to).resolve()
    to.parent.mkdir(parents=True, exist_ok=True)
    nbgrader(course, "export", "--to", str(to), capture=True)
    cells = to.with_name(to.stem + "-cells.csv")
    write_scores_csv(course, cells)
    return to, cells
