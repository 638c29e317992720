"""ZSI heads: the vectorised exercises vs loop formulations, timed in one run at the paper's sizes.

Per head, the loop baseline is how one first writes the paper's equations: a Python loop over
RoIs and classes (box path) or over mask RoIs and classes (mask path), each step a vector
operation over D (box) or over the D x M x M pixel block (mask). Both formulations are checked
with allclose before timing.

Box path (METHODS.md §5.3): ``semantic_scores`` (1,000 test RoIs, C = 1024, D = 300, 1 + 48 seen)
then ``seen_to_unseen`` (1 + 17 unseen). Mask path (§5.4): ``vector_conv`` then
``unseen_mask_logits`` on 100 detections of 28 x 28.

Usage: ``python benchmarks/bench_zeroshot.py [--threads 1] [--json benchmarks/results/bench_zeroshot.json]``
Prints the ratios; the goal is >= 20x.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vitseg_lab import zeroshot as Z


def box_loop(x, w, b, vs, vu):
    N = x.shape[0]
    logits = torch.empty(N, vs.shape[0])
    out = torch.empty(N, vu.shape[0])
    for n in range(N):                         # one RoI at a time
        s = w @ x[n] + b
        for k in range(vs.shape[0]):           # one class at a time
            logits[n, k] = s @ vs[k]
        p = torch.softmax(logits[n], 0)
        point = (p[:, None] * vs).sum(0)
        for u in range(vu.shape[0]):
            out[n, u] = point @ vu[u]
    return logits, out


def box_vec(x, w, b, vs, vu):
    logits = Z.semantic_scores(x, w, b, vs)
    return logits, Z.seen_to_unseen(logits, vs, vu)


def mask_loop(px, vs, vu):
    R, _, M, _ = px.shape
    seen = torch.empty(R, vs.shape[0], M, M)
    out = torch.empty(R, vu.shape[0], M, M)
    for r in range(R):                         # one mask RoI at a time
        for k in range(vs.shape[0]):           # one class at a time
            seen[r, k] = (px[r] * vs[k][:, None, None]).sum(0)
        sem = (seen[r][:, None] * vs[:, :, None, None]).sum(0)          # (D, M, M)
        for u in range(vu.shape[0]):
            out[r, u] = (sem * vu[u][:, None, None]).sum(0)
    return seen, out


def mask_vec(px, vs, vu):
    seen = Z.vector_conv(px, vs)
    return seen, Z.unseen_mask_logits(seen, vs, vu)


def timed(fn, *args, repeats=3):
    fn(*args)
    t = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - t) / repeats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1000, 1024, generator=g), torch.randn(300, 1024, generator=g) * .03, \
        torch.randn(300, generator=g)
    vs, vu = torch.randn(49, 300, generator=g) * .06, torch.randn(18, 300, generator=g) * .06
    px = torch.randn(100, 300, 28, 28, generator=g)
    rows = []
    for name, loop, vec, inputs in (("box path (1000 RoIs)", box_loop, box_vec, (x, w, b, vs, vu)),
                                    ("mask path (100 x 28x28)", mask_loop, mask_vec, (px, vs, vu))):
        for a, c in zip(loop(*inputs), vec(*inputs)):
            torch.testing.assert_close(a, c, atol=1e-3, rtol=1e-3)
        t_loop, t_vec = timed(loop, *inputs, repeats=1), timed(vec, *inputs)
        rows.append({"head": name, "loop_s": t_loop, "vectorised_s": t_vec,
                     "speedup": t_loop / t_vec})
        print(f"{name:<26} loop {t_loop * 1e3:9.1f} ms   vectorised {t_vec * 1e3:7.2f} ms   "
              f"x{t_loop / t_vec:,.0f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
