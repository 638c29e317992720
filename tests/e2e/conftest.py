"""Fixtures of the browser test: headless Chromium (Debian's, never a download), JupyterLab servers
on throw-away copies of the course, the student edition, and the screenshots folder.

Skips, with the reason, when Chromium or the playwright package is missing (`make e2e` and
`.ci/run` install Chromium first, through tools/e2e_setup.sh). ``VITSEG_E2E=require`` (set by
`.ci/run`) turns that skip into a failure; ``VITSEG_E2E=0`` skips the browser test on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from labdriver import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, LabServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHOTS = HERE / "screenshots"
TIMINGS: dict[str, object] = {}


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if os.environ.get("VITSEG_E2E") == "0":
        return "browser test switched off (VITSEG_E2E=0)"
    if not CHROMIUM.exists():
        return (f"Chromium not found at {CHROMIUM}: run `bash tools/e2e_setup.sh` as root "
                "(Debian's chromium + fonts-dejavu-core) or `make e2e`")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: `pip install -e '.[dev]'` (no browser download)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _missing()
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            if reason and os.environ.get("VITSEG_E2E") != "require":
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shots() -> Path:
    """tests/e2e/screenshots/ (git-ignored), emptied of the previous run's pictures."""
    SHOTS.mkdir(exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    return SHOTS


@pytest.fixture(scope="session")
def timings(shots):
    """Seconds per step, written to screenshots/timings.json at the end of the session."""
    start = time.monotonic()
    yield TIMINGS
    TIMINGS["total (browser test session)"] = round(time.monotonic() - start, 1)
    (shots / "timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")


@pytest.fixture(scope="session")
def browser(shots, timings):
    reason = _missing()
    if reason:                              # only under VITSEG_E2E=require
        pytest.fail(f"browser test required (VITSEG_E2E=require) but {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                              timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh browser context and page per test (no state carried between tests)."""
    ctx = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    ctx.set_default_timeout(30_000)
    pg = ctx.new_page()
    try:
        yield pg
    finally:
        ctx.close()


def _chapters() -> list[Path]:
    return sorted(p for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory, timings):
    """JupyterLab on a throw-away copy of the repository's chapter notebooks (the instructor
    edition, as `make lab` opens it); the repository's notebooks are never opened or saved.

    Its folder holds an nbgrader_config.py with the course's per-cell budgets (the student
    edition ships the same), so the Validate button gives training cells the grader's time.
    """
    work = tmp_path_factory.mktemp("lab-instructor")
    (work / "notebooks").mkdir()
    for nb in _chapters():
        shutil.copy(nb, work / "notebooks" / nb.name)
    _budget_config(work)
    t0 = time.monotonic()
    server = LabServer(root=work, home=tmp_path_factory.mktemp("labhome-instructor"))
    try:
        server.start()
        timings["instructor lab: server up"] = round(time.monotonic() - t0, 1)
        yield server
    finally:
        server.stop()


def _budget_config(folder: Path) -> None:
    try:
        from tools import grading

        cell, long = grading.cell_budgets()
    except Exception:                       # noqa: BLE001 - grading tools not there yet
        cell, long = 60, 300
    (folder / "nbgrader_config.py").write_text(
        "c = get_config()  # noqa: F821\n"
        f"c.Execute.timeout = {cell}\n"
        f"c.Execute.timeout_func = lambda cell: {long} if 'long-running' in "
        "cell.get('metadata', {}).get('tags', []) else " + str(cell) + "\n")


def _newest_mtime(paths) -> float:
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def _student_edition_source(tmp_path_factory) -> tuple[Path, str]:
    """(a student edition folder, where it came from): $VITSEG_E2E_STUDENT, else dist/student
    when it is newer than the notebooks and the library, else one built now in a temporary
    folder with the grading tools (`tools.student`, what `make student` runs)."""
    env = os.environ.get("VITSEG_E2E_STUDENT")
    if env:
        return Path(env).resolve(), "VITSEG_E2E_STUDENT"
    dist = ROOT / "dist" / "student"
    sources = [*_chapters(), *(ROOT / "vitseg_lab").rglob("*.py")]
    if (dist / "notebooks").is_dir() and (dist / "vitseg_lab").is_dir():
        built = _newest_mtime((dist / "notebooks").glob("*.ipynb"))
        if built >= _newest_mtime(sources):
            return dist, "dist/student (up to date)"
    try:
        from tools import student
    except ImportError as e:
        pytest.skip(f"no student edition: dist/student is missing or stale and the builder "
                    f"(tools/student.py) cannot be imported ({e})")
    tmp = tmp_path_factory.mktemp("student-build")
    student.build_student(tmp / "student", tmp / "course")
    return tmp / "student", "built now with tools.student (dist/student missing or stale)"


@pytest.fixture(scope="module")
def student_lab(tmp_path_factory, timings):
    """JupyterLab in a throw-away copy of the student edition, started in its root as its
    `make lab` does (so the Validate button reads its nbgrader_config.py); the kernel imports the
    edition's stub library (PYTHONPATH), as after `pip install -e .` there."""
    t0 = time.monotonic()
    src, origin = _student_edition_source(tmp_path_factory)
    timings["student edition: ready"] = round(time.monotonic() - t0, 1)
    timings["student edition: from"] = origin
    work = tmp_path_factory.mktemp("lab-student") / "student"
    shutil.copytree(src, work, ignore=shutil.ignore_patterns(
        ".venv", "__pycache__", "*.pyc", ".ipynb_checkpoints"))
    server = LabServer(root=work, home=tmp_path_factory.mktemp("labhome-student"),
                       env={"PYTHONPATH": str(work)})
    server.origin = origin
    try:
        server.start()
        timings["student lab: server up"] = round(time.monotonic() - t0, 1)
        yield server
    finally:
        server.stop()
