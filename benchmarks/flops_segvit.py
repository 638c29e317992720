"""SegViT's cost at the paper's sizes, counted two ways: ViT-L/16 SegViT and SegViT-Shrunk at
640 x 640 and ViT-B/16 at 512 x 512, ADE20K's 150 classes.

The models are the chapter's full-scale configs (``SegViTConfig.full_large()``, its Shrunk
variant, ``SegViTConfig.full()``) built on PyTorch's ``meta`` device (shapes only: no weights, no
memory). ``torch`` is ``torch.utils.flop_counter.FlopCounterMode`` over the forward pass;
``fvcore`` applies the rules of fvcore's ``FlopCountAnalysis`` -- what the official repository
counted the paper's GFLOPs with -- to the whole inference: + the semantic-inference einsum,
bilinear upsampling (4 per output element) and LayerNorm (5 per element). Both in multiply-adds,
beside the paper's 637.9 / 373.5 / 120.9 (see ``vitseg_lab.flops``).

Usage: ``python benchmarks/flops_segvit.py [--classes 150] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vitseg_lab import flops, segvit


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=segvit.ADE_CLASSES)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    rows = flops.flops_table(a.classes)
    flops.print_flops_table(rows)
    print(f"(counted in {time.perf_counter() - t:.1f} s on the meta device)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
