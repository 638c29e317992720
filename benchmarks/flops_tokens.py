"""Chapter 02 (VT): vectorised tokenizer / transformer / projector against their loop formulations,
and the FLOPs table at the paper's sizes.

1. Speed: ``tokens.filter_attention`` + ``gather_tokens``, ``recurrent_attention``,
   ``token_transformer`` and ``projector_attention`` + ``project`` against the literal loops of the
   grader (``vitseg_lab._grader.ch02``, one Python iteration per pixel and token) on the same
   inputs, in one run: the ratio of median times (goal: >= 20x). The loops run on a small map so
   they finish; the ratio is what the script reports.
2. Cost: ``tokens.flops_table()`` — ``torch.utils.flop_counter`` multiply-adds of ResNet-18 vs
   VT-R18, its stage 5 vs 2 VT modules, the R50 FPN module vs VT-FPN at 800 x 1216 and 473 x 473,
   and the quick model's heads, beside the paper's numbers.

Usage: ``python benchmarks/flops_tokens.py [--json benchmarks/results/flops_tokens.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from vitseg_lab import tokens
from vitseg_lab._grader import ch02 as G


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed_rows(B: int = 2, HW: int = 64, L: int = 8, C: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(B, HW, C, generator=g), torch.randn(B, L, C, generator=g)
    w_a, w_tr = torch.randn(C, L, generator=g), torch.randn(C, C, generator=g) / C**0.5
    k, q = torch.randn(C, C // 2, generator=g) / C**0.5, torch.randn(C, C // 2, generator=g) / C**0.5
    f1, f2 = torch.randn(C, C, generator=g) / C**0.5, torch.randn(C, C, generator=g) / C**0.5
    wq, wk = torch.randn(C, C, generator=g) / C**0.5, torch.randn(C, C, generator=g) / C**0.5
    pairs = {
        "filter tokenizer (A, then T = AᵀX)": (
            lambda: tokens.gather_tokens(x, tokens.filter_attention(x, w_a)),
            lambda: G.naive_gather_tokens(x, G.naive_filter_attention(x, w_a))),
        "recurrent tokenizer (A)": (
            lambda: tokens.recurrent_attention(x, t, w_tr),
            lambda: G.naive_recurrent_attention(x, t, w_tr)),
        "token transformer": (
            lambda: tokens.token_transformer(t, k, q, f1, f2),
            lambda: G.naive_token_transformer(t, k, q, f1, f2)),
        "projector (P, then X + PT)": (
            lambda: tokens.project(x, t, tokens.projector_attention(x, t, wq, wk)),
            lambda: G.naive_project(x, t, G.naive_projector_attention(x, t, wq, wk))),
    }
    rows = []
    with torch.no_grad():
        for name, (fast, slow) in pairs.items():
            torch.testing.assert_close(fast(), slow(), atol=1e-4, rtol=1e-4)
            tf, ts = _median_seconds(fast, 20), _median_seconds(slow, 3)
            rows.append({"what": name, "vectorised_ms": 1e3 * tf, "loop_ms": 1e3 * ts,
                         "ratio_loop": ts / tf})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    speed = speed_rows()
    print("vectorised vs loop (B 2, HW 64, L 8, C 32; one thread; median times, same run)")
    for r in speed:
        print(f"  {r['what']:<38}{r['vectorised_ms']:>9.3f} ms{r['loop_ms']:>11.1f} ms"
              f"{r['ratio_loop']:>9.0f}x")
    print()
    t = time.perf_counter()
    rows = tokens.flops_table()
    tokens.print_flops_table(rows)
    print(f"(counted in {time.perf_counter() - t:.1f} s on the meta device)")
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "speed": speed, "flops": rows}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
