"""A learner's session in a real browser: JupyterLab 4 in headless Chromium, driven like a person.

For every chapter the registry marks ``browser=True`` (``vitseg_lab.chapters``), on throw-away
copies of the notebooks:

1. open the notebook, Run > Run All Cells (quick scale, as a learner runs it), no error output
   and nothing on stderr anywhere;
2. drive the chapter's explorer with its real controls (arrow keys on a slider handle, a
   dropdown option, a toggle button): after each change the figure is redrawn (its image and a
   screenshot of it differ) and a cell added at the end, run in the browser, prints
   ``explorer.state`` — which must match what the controls show, and a new map;
3. press nbgrader's Validate button on the reference notebook: "Success!";
4. in the student edition (stub library, its own nbgrader_config.py): Validate lists a failure
   for every graded cell, each naming the exercise still to do.

Screenshots of each step go to tests/e2e/screenshots/ (git-ignored), with timings.json.
Run just this: `make e2e` (installs Chromium if needed).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nbformat
import pytest
from labdriver import Notebook

from vitseg_lab.chapters import CHAPTERS, Chapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BROWSER = [ch for ch in CHAPTERS.values() if ch.browser]
SHOWCASE = Path(CHAPTERS["segvit"].notebook).name      # the course's entry point

# Seconds. Generous for a loaded 2-core machine, still bounded; the test is about 4 minutes when
# the machine is otherwise idle (timings.json says where the time went).
RUN_ALL_TIMEOUT = 480
VALIDATE_TIMEOUT = 300
REDRAW_TIMEOUT = 60
# Whole-test ceilings (pytest-timeout), on top of the per-wait timeouts above.
CHAPTER_CEILING = RUN_ALL_TIMEOUT + 300
VALIDATE_CEILING = VALIDATE_TIMEOUT + 180

# One line typed into a new cell: the kernel's view of the explorer, tensors as fingerprints.
PROBE = ("import json as _j, hashlib as _h; print('STATE ' + _j.dumps({k: (_h.sha1(v.numpy()"
         ".tobytes()).hexdigest()[:12] if hasattr(v, 'numpy') else v) "
         "for k, v in explorer.state.items()}))")


def _need(name: str) -> None:
    if not (ROOT / "notebooks" / name).exists():
        pytest.skip(f"notebooks/{name} is not in the repository yet")


def _open_and_run_all(lab, page, shots, timings, name: str) -> Notebook:
    nb = Notebook(page, lab, f"notebooks/{name}", shots)
    t0 = time.monotonic()
    nb.open()
    timings[f"{nb.name}: open, kernel idle"] = round(time.monotonic() - t0, 1)
    seconds = nb.run_all(RUN_ALL_TIMEOUT)
    timings[f"{nb.name}: Run All Cells"] = round(seconds, 1)
    done = sorted(nb.cell_seconds.items())           # (code cell, seconds when it finished)
    took = {i: t - (done[k - 1][1] if k else 0.0) for k, (i, t) in enumerate(done)}
    timings[f"{nb.name}: slowest code cells (index: ~seconds)"] = {
        str(i): round(t, 1) for i, t in sorted(took.items(), key=lambda x: -x[1])[:3]}
    nb.shot("after-run-all")
    assert not nb.error_outputs(), f"{name}: error output after Run All:\n{nb.problem_report()}"
    return nb


def _assert_clean(nb: Notebook) -> None:
    """Nothing on stderr anywhere (warnings included: a learner sees them as a red box) and no
    uncaught error in the page. Checked at the end of a test, so that the explorer is still
    exercised when a warning shows."""
    assert not nb.stderr_outputs(), (f"{nb.name}: stderr output in the notebook:\n"
                                     f"{nb.problem_report()}")
    page_errors = [m for m in nb.console if m.startswith("pageerror")]
    assert not page_errors, f"{nb.name}: uncaught errors in the page: {page_errors[:5]}"


def _state(nb: Notebook, probe) -> dict:
    out = nb.run_cell(probe)
    m = re.search(r"^STATE (\{.*\})$", out, re.MULTILINE)
    assert m, f"the probe cell printed no state; the page shows:\n{nb.describe_cell(probe)}"
    return json.loads(m.group(1))


def _step(nb, area, probe, before, label, act, expect: dict, tensors: tuple[str, ...]):
    """Change one control; the figure must be redrawn and the kernel-side state must show the
    new choice (``expect``) and new maps (``tensors``). Returns (snapshot, state)."""
    prev_state = before[1]
    act()
    snap = nb.wait_redraw(area, before[0], label, REDRAW_TIMEOUT)
    assert snap[1] != before[0][1], f"{label}: the figure's screenshot did not change"
    state = _state(nb, probe)
    for k, v in expect.items():
        assert state[k] == v, f"{label}: kernel state {k}={state[k]!r}, the controls show {v!r}"
    for k in tensors:
        assert state[k] != prev_state[k], f"{label}: kernel-side {k} did not change"
    return snap, state


# ======================================================================================= 01

def drive_attention_explorer(nb, timings) -> None:
    t0 = time.monotonic()
    area = nb.widget_area(nb.cell_with("widgets.attention_explorer("))
    nb.figure(area)
    snap = nb.snapshot(area, "explorer-0-initial")
    probe = nb.append_cell(PROBE)
    state = _state(nb, probe)
    row, col = nb.control(area, "slider", "patch row"), nb.control(area, "slider", "patch col")
    r0, c0 = int(nb.slider_value(row)), int(nb.slider_value(col))
    assert state["patch"] == [r0, c0] and state["query"] == "patch", state
    cur = (snap, state)

    # A patch one column to the right: arrow key on the focused slider handle.
    cur = _step(nb, area, probe, cur, "explorer-1-patch-col+1",
                lambda: nb.press_slider(col, "ArrowRight"),
                {"patch": [r0, c0 + 1]}, ("map",))
    assert int(nb.slider_value(col)) == c0 + 1
    # One row up.
    cur = _step(nb, area, probe, cur, "explorer-2-patch-row-1",
                lambda: nb.press_slider(row, "ArrowLeft"),
                {"patch": [r0 - 1, c0 + 1]}, ("map",))
    # The first layer instead of the last.
    layer = nb.control(area, "dropdown", "layer").locator("select")
    cur = _step(nb, area, probe, cur, "explorer-3-layer-0",
                lambda: layer.select_option(label="0"), {"layer": 0}, ("map",))
    # A single head instead of the mean.
    head = nb.control(area, "dropdown", "head").locator("select")
    cur = _step(nb, area, probe, cur, "explorer-4-head-1",
                lambda: head.select_option(label="1"), {"head": 1}, ("map",))
    # The CLS token as the query.
    query = nb.control(area, "toggle", "query")
    cur = _step(nb, area, probe, cur, "explorer-5-query-CLS",
                lambda: query.get_by_role("button", name="CLS").click(),
                {"query": "CLS"}, ("map",))
    # Another scene.
    scene = nb.control(area, "slider", "scene")
    s0 = int(nb.slider_value(scene))
    cur = _step(nb, area, probe, cur, "explorer-6-scene+1",
                lambda: nb.press_slider(scene, "ArrowRight"), {"scene": s0 + 1}, ("map",))
    timings[f"{nb.name}: explorer, 6 controls"] = round(time.monotonic() - t0, 1)


# ======================================================================================= 03

def drive_mask_explorer(nb, timings) -> None:
    t0 = time.monotonic()
    area = nb.widget_area(nb.cell_with("widgets.mask_explorer("))
    nb.figure(area)
    snap = nb.snapshot(area, "explorer-0-initial")
    probe = nb.append_cell(PROBE)
    state = _state(nb, probe)
    token = nb.control(area, "dropdown", "class token").locator("select")
    stage = nb.control(area, "dropdown", "stage").locator("select")
    tokens = token.locator("option").all_inner_texts()
    stages = stage.locator("option").all_inner_texts()
    assert len(tokens) >= 3 and len(stages) >= 2, (tokens, stages)
    k0 = state["token"]
    assert tokens[k0] == token.evaluate("s => s.options[s.selectedIndex].text"), (tokens, state)
    cur = (snap, state)

    # Another class token (the next one in the list).
    k1 = (k0 + 1) % len(tokens)
    cur = _step(nb, area, probe, cur, "explorer-1-class-token",
                lambda: token.select_option(label=tokens[k1]), {"token": k1}, ("sim", "mask"))
    # The first cascade stage instead of the last.
    cur = _step(nb, area, probe, cur, "explorer-2-stage-1",
                lambda: stage.select_option(label=stages[0]), {"stage": 0}, ("sim", "mask"))
    # Another scene: arrow key on the scene slider's handle.
    scene = nb.control(area, "slider", "scene")
    s0 = int(nb.slider_value(scene))
    cur = _step(nb, area, probe, cur, "explorer-3-scene+1",
                lambda: nb.press_slider(scene, "ArrowRight"), {"scene": s0 + 1},
                ("sim", "mask"))
    timings[f"{nb.name}: explorer, 3 controls"] = round(time.monotonic() - t0, 1)


# ======================================================================================= 04

def drive_affinity_explorer(nb, timings) -> None:
    t0 = time.monotonic()
    area = nb.widget_area(nb.cell_with("afa.affinity_explorer("))
    nb.figure(area)
    snap = nb.snapshot(area, "explorer-0-initial")
    probe = nb.append_cell(PROBE)
    state = _state(nb, probe)
    row, col = nb.control(area, "slider", "token row"), nb.control(area, "slider", "token col")
    r0, c0 = int(nb.slider_value(row)), int(nb.slider_value(col))
    w = state["grid"][1]
    assert state["token"] == r0 * w + c0, (state, r0, c0)
    cur = (snap, state)

    # The token one column to the right: its affinity row and label window move with it.
    cur = _step(nb, area, probe, cur, "explorer-1-token-col+1",
                lambda: nb.press_slider(col, "ArrowRight"),
                {"token": r0 * w + c0 + 1}, ("affinity_row", "aff_label_row"))
    # One row up.
    cur = _step(nb, area, probe, cur, "explorer-2-token-row-1",
                lambda: nb.press_slider(row, "ArrowLeft"),
                {"token": (r0 - 1) * w + c0 + 1}, ("affinity_row", "aff_label_row"))
    # Another scene: new affinity, new CAM, PAR and random-walk maps.
    scene = nb.control(area, "slider", "scene")
    s0 = int(nb.slider_value(scene))
    cur = _step(nb, area, probe, cur, "explorer-3-scene+1",
                lambda: nb.press_slider(scene, "ArrowRight"), {"scene": s0 + 1},
                ("affinity_row", "map_cam", "map_cam_par", "map_rw"))
    # Another class of a scene that has two or more: the three maps follow the dropdown.
    klass = nb.control(area, "dropdown", "class").locator("select")
    for _ in range(8):
        if klass.locator("option").count() >= 2:
            break
        s1 = cur[1]["scene"]
        cur = _step(nb, area, probe, cur, f"explorer-3-scene-{s1 + 1}",
                    lambda: nb.press_slider(scene, "ArrowRight"), {"scene": s1 + 1},
                    ("map_cam",))
    options = klass.locator("option").all_inner_texts()
    assert len(options) >= 2, f"no scene with two classes among the first ones: {options}"
    shown = klass.evaluate("s => s.options[s.selectedIndex].text")
    other = next(o for o in options if o != shown)
    k0 = cur[1]["class"]
    cur = _step(nb, area, probe, cur, "explorer-4-class",
                lambda: klass.select_option(label=other), {},
                ("map_cam", "map_cam_par", "map_rw"))
    assert cur[1]["class"] != k0, f"the class dropdown shows {other!r}, the kernel kept {k0}"
    timings[f"{nb.name}: explorer, 4 controls"] = round(time.monotonic() - t0, 1)


# How each browser chapter's explorer is driven, by the explorer's function name.
DRIVES = {"attention_explorer": drive_attention_explorer, "mask_explorer": drive_mask_explorer,
          "affinity_explorer": drive_affinity_explorer}


def test_every_browser_chapter_has_an_explorer_drive():
    for ch in BROWSER:
        assert ch.explorer.split(":")[1] in DRIVES, (
            f"chapter {ch.nn} runs in the browser test but DRIVES has no drive for its explorer "
            f"{ch.explorer}: add one (see drive_mask_explorer)")


@pytest.mark.timeout(CHAPTER_CEILING)
@pytest.mark.parametrize("ch", BROWSER, ids=lambda c: c.slug)
def test_chapter_runs_clean_and_its_explorer_follows_its_controls(ch: Chapter, lab, page, shots,
                                                                  timings):
    name = Path(ch.notebook).name
    _need(name)
    nb = _open_and_run_all(lab, page, shots, timings, name)
    DRIVES[ch.explorer.split(":")[1]](nb, timings)
    assert not nb.error_outputs(), f"{name}: error output after the explorer:\n{nb.problem_report()}"
    nb.shot("end")
    _assert_clean(nb)


# =================================================================================== Validate

@pytest.mark.timeout(VALIDATE_CEILING)
def test_validate_button_passes_the_reference_notebook(lab, page, shots, timings):
    """The instructor edition of the showcase chapter (every exercise solved): Validate says
    "Success!". The button saves the notebook first — into the throw-away copy."""
    nb = Notebook(page, lab, f"notebooks/{SHOWCASE}", shots)
    nb.name = f"{nb.name}--reference"
    nb.open()
    t0 = time.monotonic()
    ok, text = nb.validate(VALIDATE_TIMEOUT)
    timings[f"{Path(SHOWCASE).stem}: Validate (reference)"] = round(time.monotonic() - t0, 1)
    assert ok and "Success! Your notebook passes all the tests." in text, text[:4000]


def _stub_exercises(edition: Path, name: str) -> set[str]:
    """Exercise numbers the student edition's library leaves to do for notebook ``name`` (the
    chapter number of a tag names its notebook)."""
    number = next(ch.number for ch in CHAPTERS.values() if Path(ch.notebook).name == name)
    todo = set()
    for py in (edition / "vitseg_lab").rglob("*.py"):
        todo |= {t for t in re.findall(r'raise ExerciseNotDone\("(\d+\.\d+)"\)', py.read_text())
                 if t.split(".")[0] == str(number)}
    return todo


@pytest.mark.timeout(VALIDATE_CEILING)
def test_validate_button_names_every_unfinished_exercise_in_the_student_edition(
        student_lab, page, shots, timings):
    """The notebook as a learner receives it: Validate fails, with one failure per graded cell,
    each naming its exercise and this notebook — no deep traceback."""
    name = SHOWCASE
    path = student_lab.root / "notebooks" / name
    assert path.exists(), f"the student edition ({student_lab.origin}) has no notebooks/{name}"
    graded = sum(1 for c in nbformat.read(path, as_version=4).cells
                 if c.metadata.get("nbgrader", {}).get("grade"))
    todo = _stub_exercises(student_lab.root, name)
    assert todo, f"no exercise stubs for {name} in the student edition's library"
    nb = Notebook(page, student_lab, f"notebooks/{name}", shots)
    nb.name = f"{nb.name}--student"
    nb.open()
    t0 = time.monotonic()
    ok, text = nb.validate(VALIDATE_TIMEOUT)
    timings[f"{Path(name).stem}: Validate (student edition)"] = round(time.monotonic() - t0, 1)
    assert not ok, f"the empty student edition passed Validate:\n{text[:3000]}"
    blocks = text.split("The following cell failed:")[1:]
    assert len(blocks) == graded, (
        f"{len(blocks)} failed cells in the dialog, {graded} graded cells:\n{text[:4000]}")
    named = re.compile(rf"Exercise (\d+\.\d+) \(notebooks/{re.escape(name)}\) is not done yet")
    seen = set()
    for block in blocks:
        m = named.findall(block)
        assert m, f"a failure that names no exercise:\n{block[:2000]}"
        seen |= set(m)
        assert "Traceback (most recent call last)" not in block, block[:2000]
    assert seen <= todo, (seen, todo)
    assert seen == todo, f"exercises never named by a failure: {sorted(todo - seen)}"
