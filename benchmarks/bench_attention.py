"""Chapter 01: what does making attention explicit cost? ExplicitViT (the exercise functions,
attention maps materialised) vs timm's own forward (fused scaled_dot_product_attention), same
weights, same inputs, measured in one run. Prints the ratio; writes results/bench_attention.json.

    python benchmarks/bench_attention.py [--device cuda] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vitseg_lab.attention import ExplicitViT
from vitseg_lab.backbone import create_vit, quick_vit


def timeit(fn, repeats: int, device: str) -> float:
    fn()                                           # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    configs = [("quick ViT 64px/8, B=32", lambda: quick_vit(num_classes=9), 32, 64)]
    if a.device == "cuda":
        configs.append(("ViT-B/16 224px, B=32",
                        lambda: create_vit("vit_base_patch16_224", num_classes=20), 32, 224))
    rows = []
    for name, make, B, size in configs:
        torch.manual_seed(0)
        vit = make().to(a.device).eval()
        model = ExplicitViT(vit).to(a.device).eval()
        x = torch.rand(B, 3, size, size, device=a.device)
        with torch.no_grad():
            t_timm = timeit(lambda vit=vit, x=x: vit(x), a.repeats, a.device)
            t_ours = timeit(lambda model=model, x=x: model(x), a.repeats, a.device)
            err = (model(x).logits - vit(x)).abs().max().item()
        rows.append({"config": name, "device": a.device, "timm_ms": 1e3 * t_timm,
                     "explicit_ms": 1e3 * t_ours, "ratio": t_ours / t_timm, "max_abs_diff": err})
        print(f"{name:28s} timm {1e3 * t_timm:8.2f} ms · explicit {1e3 * t_ours:8.2f} ms · "
              f"explicit/timm = {t_ours / t_timm:5.2f}x · max |diff| {err:.1e}")
    out = Path(__file__).parent / "results" / "bench_attention.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
