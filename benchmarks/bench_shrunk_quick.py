"""SegViT vs SegViT-Shrunk at quick scale: both trained from scratch on ShapeScenes with the
chapter's quick recipe, their mIoU beside their cost.

Plain: ``SegViTConfig.quick()`` (blocks 2, 3, 4 decoded, one decoder layer per stage). Shrunk:
the same ViT with QD at block index 2 (blocks 3-4 run on a 4 x 4 grid instead of 8 x 8), no final
norm, QU (64 queries, 3-layer decoders) and ``ATMSingleHead`` with 3 layers, each predicting and
supervised (``structure="shrunk"``). Two Shrunk rows differ only in QU:

- "SegViT-Shrunk": the quick-scale QU (``qu_pos="sincos"``, ``qu_skip=True``: a fixed position
  code on the queries and memories, and the projected 1/16 tokens added to QU's output);
- "SegViT-Shrunk official QU": ``qu_pos="none"``, ``qu_skip=False``, as the official code (and
  ``full()``). From scratch it never starts: every query's attention is near-uniform at init, so
  all 64 QU outputs are the same image average, the masks stay flat and it predicts background
  (mIoU 0.088 = the background's IoU / 10 classes). The same happened in earlier runs with the
  official N(0, 1) query init, 1-layer decoders, lr 1e-3, pre-norm decoders, the position code
  alone and queries started from the 1/16 tokens. The official model starts from a pretrained
  ViT-L whose tokens carry its position embedding, and trains 160k steps.

Cost: G multiply-adds of one 64 x 64 image under the fvcore rules of ``vitseg_lab.flops`` (the
paper's way) and under FlopCounterMode's defaults. On a 4-block, 96-wide toy ViT the decoder
dominates the cost, so Shrunk does *not* save here: the saving the paper reports (41%) comes from
running 16 of ViT-L's 24 blocks on a quarter of the tokens.

Usage: ``python benchmarks/bench_shrunk_quick.py [--steps N] [--json PATH] [--only NAME]``
(``vitseg-lab train segvit --structure shrunk --qd_index 2 --layers_per_stage 3`` trains the
quick Shrunk model alone). One thread per run; wall times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from vitseg_lab import flops, segvit


def configs(steps: int) -> dict[str, segvit.SegViTConfig]:
    q = segvit.SegViTConfig.quick()
    q = replace(q, train=replace(q.train, steps=steps, progress=False, out_dir=None))
    shrunk = replace(q, structure="shrunk", qd_index=2, layers_per_stage=3)
    return {"SegViT": q,
            "SegViT-Shrunk": shrunk,                                  # qu_pos sincos, qu_skip
            "SegViT-Shrunk official QU": replace(shrunk, qu_pos="none", qu_skip=False)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=segvit.SegViTConfig.quick().train.steps,
                    help="training steps of each run (default: the quick config's)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--only", default=None, choices=list(configs(1)),
                    help="train one of them (its row replaces that row of --json)")
    a = ap.parse_args(argv)
    rows = []
    for name, cfg in configs(a.steps).items():
        if a.only and name != a.only:
            continue
        t = time.perf_counter()
        res = segvit.run(cfg)
        seconds = time.perf_counter() - t
        model = res.model.eval()
        cost = flops.count_gmacs(model, cfg.img_size)
        rows.append({"model": name, "mIoU": round(res.value, 3),
                     "baseline_mIoU": round(res.baseline["mIoU"], 3), "steps": a.steps,
                     "gmacs_fvcore": round(cost["fvcore"], 4),
                     "gmacs_torch": round(cost["torch"], 4),
                     "gmacs_backbone": round(cost["backbone"], 4),
                     "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                     "train_seconds": round(seconds, 1)})
        print(f"{name:<26} mIoU {res.value:.3f} (untrained {res.baseline['mIoU']:.3f})  "
              f"{cost['fvcore'] * 1e3:.1f} M multiply-adds (fvcore rules; "
              f"{cost['torch'] * 1e3:.1f} FlopCounterMode)  {seconds:.0f} s", flush=True)
    if a.json:
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        if a.only and path.is_file():  # keep the other recorded rows
            rows = [r for r in json.loads(path.read_text()) if r["model"] != a.only] + rows
            order = list(configs(1))
            rows.sort(key=lambda r: order.index(r["model"]) if r["model"] in order else 99)
        path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
