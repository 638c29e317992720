"""SegViT vs SegViT-Shrunk cost at the paper's sizes: ViT-L/16, 640x640, ADE20K's 150 classes.

Both models are built on PyTorch's ``meta`` device (shapes only: no weights, no memory) and their
forward pass is counted by ``torch.utils.flop_counter.FlopCounterMode``. The paper's GFLOPs
(mmcv's counter) are multiply-adds, so the table reports multiply-adds (FlopCounterMode's FLOPs / 2)
beside the paper's 637.9 -> 373.5.

Usage: ``python benchmarks/flops_segvit.py [--img 640] [--classes 150] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vitseg_lab import flops, segvit


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img", type=int, default=640)
    ap.add_argument("--classes", type=int, default=segvit.ADE_CLASSES)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    rows = flops.flops_table(a.img, a.classes)
    flops.print_flops_table(rows)
    print(f"(counted in {time.perf_counter() - t:.1f} s on the meta device)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
