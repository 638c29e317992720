"""SegViT vs the official SegViT-Shrunk at quick scale: both trained from scratch on ShapeScenes
with the chapter's quick recipe, their mIoU beside their cost.

Plain: ``SegViTConfig.quick()`` (blocks 2, 3, 4 decoded, one decoder layer per stage). Shrunk:
the same ViT with QD at block index 2 (blocks 3-4 run on a 4 x 4 grid instead of 8 x 8), no final
norm, QU (64 queries, 3-layer decoders) and ``ATMSingleHead`` with 3 layers, each predicting and
supervised (``structure="shrunk"``), with the official init (N(0, 1) QU and class queries).
Cost: G multiply-adds of one 64 x 64 image under the fvcore rules of ``vitseg_lab.flops`` (the
paper's way) and under FlopCounterMode's defaults.

On a 4-block, 96-wide toy ViT the decoder dominates the cost, so Shrunk does *not* save here:
the saving the paper reports (41%) comes from running 16 of ViT-L's 24 blocks on a quarter of
the tokens. Recorded on a shared 2-core CPU (benchmarks/results/bench_shrunk_quick.json): plain
0.879 mIoU, Shrunk 0.088 -- all background. Shrunk's masks stay flat: its 1/16 map comes only
from QU's learned queries, which start position-agnostic (at init their spread across positions
is query noise, not image content) and collapse to one token in training; the same happened with
the small query init, 1-layer decoders and lr 1e-3 (the CLI line below, ``--train.lr 1e-3`` or
``--layers_per_stage 1``). The official model learns it from a pretrained ViT-L in 160k steps.

Usage: ``python benchmarks/bench_shrunk_quick.py [--steps 300] [--json PATH]``
(``vitseg-lab train segvit --structure shrunk --qd_index 2 --layers_per_stage 3
--official_init true`` trains the Shrunk model alone.) Wall times depend on the machine and
its load.
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
    return {"SegViT": q,
            # official_init: N(0, 1) QU queries, far apart at the start (the quick default's
            # N(0, 0.02²) starts them nearly equal); both reached mIoU 0.088 here.
            "SegViT-Shrunk": replace(q, structure="shrunk", qd_index=2, layers_per_stage=3,
                                     official_init=True)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--only", default=None, choices=["SegViT", "SegViT-Shrunk"],
                    help="train one of the two (its row replaces that row of --json)")
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
        print(f"{name:<14} mIoU {res.value:.3f} (untrained {res.baseline['mIoU']:.3f})  "
              f"{cost['fvcore'] * 1e3:.1f} M multiply-adds (fvcore rules; "
              f"{cost['torch'] * 1e3:.1f} FlopCounterMode)  {seconds:.0f} s", flush=True)
    if a.json:
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        if a.only and path.is_file():  # keep the other model's recorded row
            rows = [r for r in json.loads(path.read_text()) if r["model"] != a.only] + rows
            rows.sort(key=lambda r: r["model"] != "SegViT")
        path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
