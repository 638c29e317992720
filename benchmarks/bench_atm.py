"""ATM head: the vectorised ``segvit.ATMHead`` vs naive loop formulations, timed in one run.

Two baselines, both computing the same head (checked with allclose before timing):
- ``per_class_head``: a Python loop over images, stages, layers, class tokens and heads, each step
  a vector operation over the L layer tokens (how one writes the paper's equations first);
- ``literal``: ``_grader.ch03.naive_atm_decoder``, one dot product per (class, token, head) entry
  (the unit tests' reference), timed on fewer repeats because it is slow.

Usage: ``python benchmarks/bench_atm.py [--threads 1] [--json benchmarks/results/bench_atm.json]``
Prints the ratios; the goal is >= 20x against the per-class-and-head loop.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitseg_lab import segvit
from vitseg_lab._grader import ch03 as G


def per_class_head(head: segvit.ATMHead, feats: list[torch.Tensor], grid) -> list[torch.Tensor]:
    """The ATM head with loops over images, stages, class tokens and heads (vectorised over L)."""
    sd = head.state_dict()
    d = sd["class_tokens"].shape[1]
    outs = []
    for b in range(feats[0].shape[0]):
        q = sd["class_tokens"]
        acc = None
        for s, f in enumerate(reversed(feats)):
            pre = f"layer_tokens.{s}."
            tok = F.layer_norm(f[b] @ sd[pre + "proj.weight"].T + sd[pre + "proj.bias"], (d,),
                               sd[pre + "norm.weight"], sd[pre + "norm.bias"])
            for i, layer in enumerate(head.stages[s]):
                nh = layer.num_heads
                dh = d // nh
                p = {k[len(f"stages.{s}.{i}."):]: v for k, v in sd.items()
                     if k.startswith(f"stages.{s}.{i}.")}

                def lin(x, n, p=p):
                    return x @ p[n + ".weight"].T + p[n + ".bias"]

                def attend(qq, kk, vv, nh=nh, dh=dh):
                    out = torch.empty(qq.shape[0], d, dtype=qq.dtype)
                    mask = torch.zeros(qq.shape[0], kk.shape[0], dtype=qq.dtype)
                    for c in range(qq.shape[0]):          # one class token at a time
                        for j in range(nh):                # one head at a time
                            cols = slice(j * dh, (j + 1) * dh)
                            sim = kk[:, cols] @ qq[c, cols] / math.sqrt(dh)   # (L,)
                            out[c, cols] = torch.softmax(sim, 0) @ vv[:, cols]
                            mask[c] += sim / nh
                    return out, mask

                wq, wk, wv = p["self_attn.in_proj_weight"].chunk(3)
                bq, bk, bv = p["self_attn.in_proj_bias"].chunk(3)
                sa, _ = attend(q @ wq.T + bq, q @ wk.T + bk, q @ wv.T + bv)
                x = F.layer_norm(q + sa @ p["self_attn.out_proj.weight"].T
                                 + p["self_attn.out_proj.bias"], (d,), p["norm1.weight"],
                                 p["norm1.bias"])
                ca, mask = attend(lin(x, "q_proj"), lin(tok, "k_proj"), lin(tok, "v_proj"))
                x = F.layer_norm(x + lin(ca, "out_proj"), (d,), p["norm2.weight"], p["norm2.bias"])
                x = F.layer_norm(x + lin(torch.relu(lin(x, "ffn.0")), "ffn.3"), (d,),
                                 p["norm3.weight"], p["norm3.bias"])
                q = x
            m = mask.reshape(-1, *grid)
            acc = m if acc is None else acc + m
        outs.append(acc)
    return outs


def literal(head: segvit.ATMHead, feats, grid) -> list[torch.Tensor]:
    """The head through ``naive_atm_decoder``: one dot product per (class, token, head)."""
    sd = head.state_dict()
    d = sd["class_tokens"].shape[1]
    outs = []
    for b in range(feats[0].shape[0]):
        q, acc = sd["class_tokens"], 0
        for s, f in enumerate(reversed(feats)):
            pre = f"layer_tokens.{s}."
            tok = F.layer_norm(f[b] @ sd[pre + "proj.weight"].T + sd[pre + "proj.bias"], (d,),
                               sd[pre + "norm.weight"], sd[pre + "norm.bias"])
            for i, layer in enumerate(head.stages[s]):
                p = {k[len(f"stages.{s}.{i}."):]: v for k, v in sd.items()
                     if k.startswith(f"stages.{s}.{i}.")}
                q, mask = G.naive_atm_decoder(p, q, tok, layer.num_heads)
            acc = acc + mask.reshape(-1, *grid)
        outs.append(acc)
    return outs


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a fair ratio)")
    ap.add_argument("--batch", type=int, default=16, help="the quick-scale training batch")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--grid", type=int, default=8, help="h = w of the token grid")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    # the quick-scale head: C = d = 96, 3 heads, 3 stages of 1 layer
    head = segvit.ATMHead(in_dim=96, num_classes=a.classes, dim=96, num_heads=3, num_stages=3,
                          layers_per_stage=1).eval()
    grid = (a.grid, a.grid)
    feats = [torch.randn(a.batch, a.grid * a.grid, 96) for _ in range(3)]
    with torch.no_grad():
        fast = head(feats, grid).mask_logits[-1]
        for name, fn in (("per_class_head", per_class_head), ("literal", literal)):
            slow = torch.stack(fn(head, feats, grid))
            torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4, msg=f"{name} differs")
        t_fast = best_of(lambda: head(feats, grid), 20)
        t_loop = best_of(lambda: per_class_head(head, feats, grid), 3)
        t_lit = best_of(lambda: literal(head, feats, grid), 1)
    res = {"batch": a.batch, "classes": a.classes, "grid": list(grid), "threads": a.threads,
           "vectorised_ms": 1e3 * t_fast, "per_class_head_ms": 1e3 * t_loop,
           "literal_ms": 1e3 * t_lit, "ratio_per_class_head": t_loop / t_fast,
           "ratio_literal": t_lit / t_fast}
    print(f"ATM head, B={a.batch} K={a.classes} L={a.grid}x{a.grid} d=96 nh=3, 3 stages, "
          f"{a.threads} thread(s); outputs checked equal")
    print(f"  vectorised (segvit.ATMHead)       {res['vectorised_ms']:9.2f} ms")
    print(f"  loop over classes and heads       {res['per_class_head_ms']:9.2f} ms   "
          f"ratio {res['ratio_per_class_head']:7.1f}x  (goal >= 20x)")
    print(f"  literal per-entry loop (grader)   {res['literal_ms']:9.2f} ms   "
          f"ratio {res['ratio_literal']:7.1f}x")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
