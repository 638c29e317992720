"""ReSTR: the vectorised decoder and metrics vs loop formulations, and the cost-vs-patches curve.

Timed in one run, each pair checked with allclose before timing:

- decoder: ``restr.CoarseToFineDecoder`` (``decoder_block`` x log2 P) vs the same decoder written
  with a Python loop over images and output pixels (bilinear weights per pixel, one matrix-vector
  product per position) — how the equations are first written down;
- metrics: ``restr.referring_metrics`` on N expressions vs a per-expression loop (one IoU at a
  time, vectorised over that expression's pixels) and vs the per-pixel literal loop of
  ``_grader.ch05``. The counts are memory-bound: the per-expression loop (each mask fits in cache)
  is about as fast as the one-shot version, so only the literal loop shows a large ratio;
- cost: one fusion ``TransformerBlock`` on L = side² visual tokens + 20 words, the paper's known
  limit (attention is quadratic in L).

Usage: ``python benchmarks/bench_restr.py [--threads 1] [--json benchmarks/results/bench_restr.json]``
Prints the ratios; the goal is >= 20x for decoder and metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitseg_lab import restr


def _bilinear_taps(n: int) -> list[tuple[int, int, float]]:
    """For an x2 up-sampling of n cells (align_corners=False): (i0, i1, frac) per output cell."""
    taps = []
    for o in range(2 * n):
        s = max((o + 0.5) / 2 - 0.5, 0.0)
        i0 = min(math.floor(s), n - 1)
        taps.append((i0, min(i0 + 1, n - 1), s - i0))
    return taps


def loop_decoder(dec: restr.CoarseToFineDecoder, x: torch.Tensor) -> torch.Tensor:
    """The decoder with loops over images and output positions (vectorised over channels)."""
    outs = []
    for b in range(x.shape[0]):
        f = x[b]                                                  # (h, w, C)
        for lin, norm in zip(dec.linears, dec.norms):
            h, w, _ = f.shape
            ty, tx = _bilinear_taps(h), _bilinear_taps(w)
            g = torch.empty(2 * h, 2 * w, lin.out_features)
            for Y, (y0, y1, fy) in enumerate(ty):
                for X, (x0, x1, fx) in enumerate(tx):
                    v = ((1 - fy) * ((1 - fx) * f[y0, x0] + fx * f[y0, x1])
                         + fy * ((1 - fx) * f[y1, x0] + fx * f[y1, x1]))
                    g[Y, X] = lin.weight @ v + lin.bias
            f = F.gelu(norm(g))
        outs.append((f @ dec.logit.weight.T + dec.logit.bias)[..., 0])
    return torch.stack(outs)


def loop_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    inters, unions, ious = [], [], []
    for lg, t in zip(logits, target):
        p = lg > 0
        i, u = int((p & t).sum()), int((p | t).sum())
        inters.append(i)
        unions.append(u)
        ious.append(i / u if u else 1.0)
    out = {"oIoU": sum(inters) / sum(unions), "mIoU": sum(ious) / len(ious)}
    for x in restr.PRECISION_THRESHOLDS:
        out[f"prec@{x}"] = sum(v > x for v in ious) / len(ious)
    return out


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    res: dict = {"threads": a.threads}

    dec = restr.CoarseToFineDecoder(96, 8).eval()                # the quick model's decoder
    x = torch.randn(4, 8, 8, 96)
    fast, slow = dec(x), loop_decoder(dec, x)
    assert torch.allclose(fast, slow, atol=1e-4), float((fast - slow).abs().max())
    t_fast, t_slow = _time(lambda: dec(x), 10), _time(lambda: loop_decoder(dec, x), 2)
    res["decoder"] = {"vectorised_ms": 1e3 * t_fast, "loop_ms": 1e3 * t_slow,
                      "ratio": t_slow / t_fast}

    from vitseg_lab._grader import ch05 as G

    logits = torch.randn(200, 64, 64)
    target = torch.rand(200, 64, 64) < 0.2
    fm, sm = restr.referring_metrics(logits, target), loop_metrics(logits, target)
    lm = G.naive_referring_metrics(logits, target)
    assert all(math.isclose(fm[k], sm[k], rel_tol=1e-9) and math.isclose(fm[k], lm[k],
                                                                          rel_tol=1e-9) for k in sm)
    t_fast = _time(lambda: restr.referring_metrics(logits, target), 5)
    t_slow = _time(lambda: loop_metrics(logits, target), 3)
    t_literal = _time(lambda: G.naive_referring_metrics(logits, target), 1)
    res["metrics"] = {"vectorised_ms": 1e3 * t_fast, "loop_ms": 1e3 * t_slow,
                      "ratio": t_slow / t_fast, "literal_ms": 1e3 * t_literal,
                      "literal_ratio": t_literal / t_fast}

    res["cost_curve"] = restr.attention_cost_curve([8, 16, 24, 30, 40], dim=192, num_heads=4,
                                                   words=20)

    for k in ("decoder", "metrics"):
        r = res[k]
        print(f"{k:<8} vectorised {r['vectorised_ms']:8.2f} ms · loop {r['loop_ms']:9.1f} ms · "
              f"{r['ratio']:6.1f}x (goal >= 20x)")
    r = res["metrics"]
    print(f"{'':<8} per-pixel literal loop (the grader's reference) {r['literal_ms']:9.1f} ms · "
          f"{r['literal_ratio']:6.0f}x")
    print("fusion block, width 192, 20 words:")
    for r in res["cost_curve"]:
        print(f"  L = {r['L']:5d} visual tokens: {r['ms']:8.2f} ms")
    first, last = res["cost_curve"][0], res["cost_curve"][-1]
    print(f"  L x{last['L'] / first['L']:.0f} -> time x{last['ms'] / first['ms']:.0f} "
          f"(attention weights x{last['attn_entries'] / first['attn_entries']:.0f})")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
