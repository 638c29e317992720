"""What a chapter's full-scale run needs, and the one message listing every piece that is missing.

A chapter's ``full_scale_check(cfg)`` is ``fullscale.check(slug, cfg.model_name, gpus=...)``: a
CUDA GPU, the pretrained timm weights and the chapter's data sets (from the registry). The message
has a header and one line per missing piece, each with the exact command that provides it, so a
notebook's training cell (and ``vitseg-lab train CHAPTER --scale full``) can print it as it is.
"""

from __future__ import annotations

import torch

from . import chapters
from .backbone import weights_problem
from .data.fetch import missing_message


def gpu_line(slug: str, gpus: int = 1, scale: str = "full") -> str | None:
    """The CUDA line, or None when a GPU is visible. ``scale``: the CLI's ``--scale`` (the
    notebook is named only for ``full``, the one full scale a notebook runs)."""
    if torch.cuda.is_available():
        return None
    ch = chapters.get(slug)
    if gpus == 1:
        cmd = f"`python -m vitseg_lab.cli train {slug} --scale {scale}` on one GPU"
    else:
        cmd = (f"`torchrun --nproc_per_node {gpus} -m vitseg_lab.cli train {slug} --scale {scale}` "
               f"on {gpus} GPUs")
    if scale != "full":
        return f"a CUDA GPU (none found): on a GPU machine run {cmd}."
    return (f"a CUDA GPU (none found): on a GPU machine run `VITSEG_SCALE=full jupyter lab "
            f"{ch.notebook}`, or {cmd}.")


def missing_pieces(slug: str, model_name: str | None = None, gpus: int = 1,
                   scale: str = "full") -> list[str]:
    """Every missing piece of chapter ``slug``'s full-scale run, one line each (empty: ready).

    model_name: the timm weights the run loads (None: none needed). scale: ``--scale``'s value.
    """
    lines = [gpu_line(slug, gpus, scale)]
    if model_name:
        lines.append(weights_problem(model_name))
    lines += [missing_message(name) for name in chapters.get(slug).datasets]
    return [line for line in lines if line]


def check(slug: str, model_name: str | None = None, gpus: int = 1,
          scale: str = "full") -> str | None:
    """None when full scale can start, else a header and ``- piece`` lines (see the module doc)."""
    lines = missing_pieces(slug, model_name, gpus, scale)
    if not lines:
        return None
    ch = chapters.get(slug)
    head = (f"Full scale of chapter {ch.nn} ({slug}) cannot start on this machine; "
            f"{len(lines)} missing piece{'s' if len(lines) > 1 else ''}:")
    return "\n".join([head, *(f"- {line}" for line in lines)])
