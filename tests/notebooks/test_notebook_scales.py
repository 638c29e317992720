"""Every chapter notebook at the two scales the quick nbval run does not cover.

- ``VITSEG_SCALE=full`` on a machine without the full-scale pieces (the kernel sees no GPU): Run
  All reaches the end with no error and no stderr output, teaching cells at their teaching size,
  and exactly one cell prints the missing-pieces message, one ``- `` line per piece.
- Each training cell (tag ``long-running``) leaves an image (its training curve) at smoke scale:
  only the first code cell and the training cells run, so this costs seconds.

Parametrised over the registry: a new chapter is covered by its ``Chapter(...)`` line.
"""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from vitseg_lab import chapters

ROOT = Path(__file__).resolve().parents[2]
SLUGS = list(chapters.CHAPTERS)


def _kernel_env(monkeypatch, scale: str) -> None:
    monkeypatch.setenv("VITSEG_SCALE", scale)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")       # a CPU machine, even on a GPU runner
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)       # the kernel's inline backend draws PNGs


def _notebook(slug: str):
    path = ROOT / chapters.get(slug).notebook
    assert path.exists(), f"{path} is missing: run `python -m tools.nbbuild`"
    return nbformat.read(path, as_version=4)


def _texts(cell, name: str | None = None) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.output_type == "stream" and (name is None or o.name == name))


@pytest.mark.slow
@pytest.mark.parametrize("slug", SLUGS)
def test_run_all_at_full_scale_reaches_the_end_with_only_the_missing_pieces(
        slug, monkeypatch, tmp_path):
    _kernel_env(monkeypatch, "full")
    nb = _notebook(slug)
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [(i, o.ename, o.evalue) for i, c in enumerate(code) for o in c.outputs
              if o.output_type == "error"]
    assert not errors, f"{slug} at VITSEG_SCALE=full stopped: code cell {errors[0]}"
    stderr = [(i, _texts(c, "stderr")[:300]) for i, c in enumerate(code) if _texts(c, "stderr")]
    assert not stderr, f"{slug} at VITSEG_SCALE=full wrote to stderr: {stderr[:3]}"
    head = f"Full scale of chapter {chapters.get(slug).nn} ({slug}) cannot start"
    places = [c for c in code if head in _texts(c)]
    assert len(places) == 1, (f"{slug}: the missing-pieces message should appear in exactly one "
                              f"cell, found {len(places)}")
    lines = _texts(places[0]).split(head, 1)[1].splitlines()[1:]
    pieces = [line for line in lines if line.startswith("- ")]
    assert pieces and pieces[0].startswith("- a CUDA GPU"), lines[:5]
    assert all("`" in p for p in pieces), f"every piece names its command: {pieces}"
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    for o in images:   # teaching cells at a teaching size: no figure wider than a screen or two
        w, h = (int(x) for x in _png_size(o["data"]["image/png"]))
        assert w <= 3000 and h <= 3000, f"{slug}: a {w}x{h} px figure at full scale"


@pytest.mark.slow
@pytest.mark.parametrize("slug", SLUGS)
def test_every_training_cell_draws_its_curve(slug, monkeypatch, tmp_path):
    _kernel_env(monkeypatch, "smoke")
    nb = _notebook(slug)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    train = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and "long-running" in c.metadata.get("tags", [])]
    assert train, f"{slug}: no cell is tagged long-running (the training cell)"
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for i in [first, *train]:
            client.execute_cell(nb.cells[i], i)
    for i in train:
        kinds = [k for o in nb.cells[i].outputs for k in o.get("data", {})]
        assert "image/png" in kinds, (f"{slug}: training cell {i} drew no figure (outputs: "
                                      f"{kinds or [o.output_type for o in nb.cells[i].outputs]})")


def _png_size(b64: str) -> tuple[int, int]:
    raw = base64.b64decode(b64)[:24]
    return struct.unpack(">II", raw[16:24])
