"""Chapter 04 (AFA): the vectorised PAR and random walk against literal loops, measured in one run.

Prints speed-up ratios (goal >= 20x) and PAR's peak extra memory at 320x320 (the quick and the
paper's half-resolution crop are smaller; 320 is the yaml's crop), measured in a fresh process by
``ru_maxrss``, beside what a dense (HW)^2 affinity would need. Writes
``benchmarks/results/bench_afa.json``. Run: ``.venv/bin/python benchmarks/bench_afa.py``.
Numbers depend on the machine and its load; only the ratios measured together mean something.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from vitseg_lab import afa

OUT = Path(__file__).parent / "results" / "bench_afa.json"
OFFS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def naive_par(images, masks, dilations, num_iter, w1=0.3, w2=0.01):
    """PAR pixel by pixel and neighbour by neighbour (Python loops over floats)."""
    B, C, H, W = images.shape
    K = masks.shape[1]
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in OFFS]
    N = len(offs)
    dist = [math.hypot(*o) for o in offs]
    md = sum(dist) / N
    sd = math.sqrt(sum((v - md) ** 2 for v in dist) / (N - 1))
    kp = [-(v / (sd + 1e-8) / w1) ** 2 for v in dist]
    zp = sum(math.exp(v) for v in kp)
    img = images.tolist()

    def at(y, x):
        return min(max(y, 0), H - 1), min(max(x, 0), W - 1)

    aff = [[[None] * W for _ in range(H)] for _ in range(B)]
    for b in range(B):
        for y in range(H):
            for x in range(W):
                k = [0.0] * N
                for c in range(C):
                    vals = [img[b][c][at(y + dy, x + dx)[0]][at(y + dy, x + dx)[1]]
                            for dy, dx in offs]
                    mu = sum(vals) / N
                    s = math.sqrt(sum((v - mu) ** 2 for v in vals) / (N - 1))
                    for n in range(N):
                        k[n] -= (abs(vals[n] - img[b][c][y][x]) / (s + 1e-8) / w1) ** 2 / C
                z = sum(math.exp(v) for v in k)
                aff[b][y][x] = [math.exp(v) / z + w2 * math.exp(p) / zp for v, p in zip(k, kp)]
    m = torch.nn.functional.interpolate(masks, size=(H, W), mode="bilinear",
                                        align_corners=True).tolist()
    for _ in range(num_iter):
        new = [[[[0.0] * W for _ in range(H)] for _ in range(K)] for _ in range(B)]
        for b in range(B):
            for y in range(H):
                for x in range(W):
                    a = aff[b][y][x]
                    for n, (dy, dx) in enumerate(offs):
                        yy, xx = at(y + dy, x + dx)
                        for k in range(K):
                            new[b][k][y][x] += a[n] * m[b][k][yy][xx]
        m = new
    return torch.tensor(m)


def naive_random_walk(probs, affinity, mask, alpha=2.0):
    B, K, h, w = probs.shape
    L = h * w
    out = torch.empty(B, K, L)
    for b in range(B):
        a = [[affinity[b, i, j].item() ** alpha if mask[i, j] else 0.0 for j in range(L)]
             for i in range(L)]
        col = [sum(a[i][j] for i in range(L)) + 0.1 for j in range(L)]
        p = probs[b].reshape(K, L).tolist()
        for k in range(K):
            for j in range(L):
                out[b, k, j] = sum(p[k][i] * a[i][j] for i in range(L)) / col[j]
    return out.reshape(B, K, h, w)


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def peak_memory_mib(size: int, channels: int) -> float:
    """Peak extra RSS of one PAR call (paper dilations, 10 iterations) in a fresh process."""
    code = f"""
import resource, torch
from vitseg_lab import afa
torch.set_num_threads(1)
img, m = torch.rand(1, 3, {size}, {size}), torch.rand(1, {channels}, {size}, {size})
afa.par(img[..., :8, :8], m[..., :8, :8])          # warm-up: allocator and kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
afa.par(img, m)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    results = {}
    # PAR: 1 image, 4 channels (background + 3 classes), 24 x 20 pixels, dilations (1, 2, 4)
    img, masks = torch.rand(1, 3, 24, 20), torch.rand(1, 4, 12, 10)
    dil = (1, 2, 4)
    t_vec, fast = best_of(lambda: afa.par(img, masks, dil, 10))
    t_naive, slow = best_of(lambda: naive_par(img, masks, dil, 10), repeat=1)
    assert torch.allclose(fast, slow, atol=1e-4), "PAR and its loop disagree"
    results["par"] = {"shape": "1x3x24x20, 4 channels, dilations (1,2,4), 10 iterations",
                      "vectorised_s": t_vec, "loop_s": t_naive, "ratio": t_naive / t_vec}
    # random walk: 4 images, 10 channels, a 12 x 12 grid (the quick 1.5-scale grid)
    probs = torch.rand(4, 10, 12, 12).softmax(1)
    a = torch.rand(4, 144, 144)
    aff, mask = (a + a.transpose(1, 2)) / 2, afa.window_mask(12, 12, 8)
    t_vec, fast = best_of(lambda: afa.random_walk(probs, aff, mask))
    t_naive, slow = best_of(lambda: naive_random_walk(probs, aff, mask), repeat=1)
    assert torch.allclose(fast, slow, atol=1e-5), "random walk and its loop disagree"
    results["random_walk"] = {"shape": "4x10x12x12, L=144", "vectorised_s": t_vec,
                              "loop_s": t_naive, "ratio": t_naive / t_vec}
    # PAR's memory at 320 x 320, 21 channels (VOC), the paper's 6 dilations
    peak = peak_memory_mib(320, 21)
    dense = (320 * 320) ** 2 * 4 / 2**20
    results["par_memory_320"] = {"peak_extra_mib": peak, "dense_affinity_mib": dense,
                                 "neighbours": 48, "channels": 21}
    for name in ("par", "random_walk"):
        r = results[name]
        print(f"{name:<12} vectorised {r['vectorised_s'] * 1e3:8.2f} ms · loop "
              f"{r['loop_s']:8.2f} s · ratio {r['ratio']:8.0f}x  (goal >= 20x)")
    print(f"PAR at 320x320, 21 channels, 48 neighbours: peak extra memory {peak:.0f} MiB "
          f"(a dense (HW)^2 affinity would be {dense / 1024:.0f} GiB)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
