"""Hidden checks for chapter 06 (ZSI, zero-shot instance segmentation), instructor-only.

``naive_*`` are independent formulations written as literal loops over the paper's indices (per
RoI, class, semantic dimension, pixel); ``cases_*`` build the hidden cases (other shapes than the
visible tests, float64, empty inputs, edge cases) from the grader's generator; ``CHECKS`` and
``BUGS`` follow ``common``'s protocol. Only torch is imported here: the grader process stays light.
"""

from __future__ import annotations

import math

import torch

from .common import Bug, Check

# ----------------------------------------------------------------------------------------------
# Naive formulations
# ----------------------------------------------------------------------------------------------


def naive_semantic_scores(x, weight, bias, vectors):
    """logits[n, k] = Σ_d (Σ_c x[n, c] W[d, c] + b[d]) · V[k, d], one entry at a time."""
    N, C = x.shape
    D = weight.shape[0]
    K = vectors.shape[0]
    out = torch.zeros(N, K, dtype=x.dtype)
    for n in range(N):
        sem = [sum(float(x[n, c]) * float(weight[d, c]) for c in range(C)) + float(bias[d])
               for d in range(D)]
        for k in range(K):
            out[n, k] = sum(sem[d] * float(vectors[k, d]) for d in range(D))
    return out


def naive_reconstruction_loss(x, x_hat, weight):
    """weight · (1 / #entries) Σ (x - x̂)² over every entry."""
    a, b = x.reshape(-1).tolist(), x_hat.reshape(-1).tolist()
    total = sum((p - q) ** 2 for p, q in zip(a, b))
    return torch.tensor(weight * total / max(len(a), 1), dtype=x.dtype)


def _softmax_row(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    z = sum(e)
    return [v / z for v in e]


def naive_seen_to_unseen(seen_logits, seen_vectors, unseen_vectors):
    """score[n, u] = Σ_d (Σ_k softmax(logits[n])[k] · Vs[k, d]) · Vu[u, d]."""
    N, K = seen_logits.shape
    D = seen_vectors.shape[1]
    U = unseen_vectors.shape[0]
    out = torch.zeros(N, U, dtype=seen_logits.dtype)
    for n in range(N):
        p = _softmax_row([float(v) for v in seen_logits[n]])
        point = [sum(p[k] * float(seen_vectors[k, d]) for k in range(K)) for d in range(D)]
        for u in range(U):
            out[n, u] = sum(point[d] * float(unseen_vectors[u, d]) for d in range(D))
    return out


def naive_vector_conv(pixels, vectors):
    """out[r, k, y, x] = Σ_d pixels[r, d, y, x] · V[k, d], pixel by pixel."""
    R, D, h, w = pixels.shape
    K = vectors.shape[0]
    out = torch.zeros(R, K, h, w, dtype=pixels.dtype)
    for r in range(R):
        for k in range(K):
            for y in range(h):
                for x in range(w):
                    out[r, k, y, x] = sum(float(pixels[r, d, y, x]) * float(vectors[k, d])
                                          for d in range(D))
    return out


def naive_unseen_mask_logits(seen_logits, seen_vectors, unseen_vectors):
    """Per pixel: the D-vector Σ_k logits[k] Vs[k], then its dot with every unseen vector."""
    R, K, h, w = seen_logits.shape
    D = seen_vectors.shape[1]
    U = unseen_vectors.shape[0]
    out = torch.zeros(R, U, h, w, dtype=seen_logits.dtype)
    for r in range(R):
        for y in range(h):
            for x in range(w):
                point = [sum(float(seen_logits[r, k, y, x]) * float(seen_vectors[k, d])
                             for k in range(K)) for d in range(D)]
                for u in range(U):
                    out[r, u, y, x] = sum(point[d] * float(unseen_vectors[u, d])
                                          for d in range(D))
    return out


def naive_background_vector(fb_weight):
    """The mean of rows 0, 2, 4, ... (anchor a's background row is 2a)."""
    rows = [fb_weight[i] for i in range(0, fb_weight.shape[0], 2)]
    total = torch.zeros(fb_weight.shape[1], dtype=fb_weight.dtype)
    for r in rows:
        total = total + r
    return total / len(rows)


def naive_harmonic_mean(seen, unseen):
    """2su / (s + u) entry by entry; 0 where s + u = 0."""
    out = torch.zeros_like(seen)
    for i in range(seen.shape[0]):
        for j in range(seen.shape[1]):
            s, u = float(seen[i, j]), float(unseen[i, j])
            out[i, j] = 0.0 if s + u == 0 else 2 * s * u / (s + u)
    return out


# ----------------------------------------------------------------------------------------------
# Hidden cases (values from the grader's generator, shapes fixed; a distinct size on every axis)
# ----------------------------------------------------------------------------------------------

def _r(g, *shape, dtype=torch.float32, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def cases_semantic_scores(g):
    return [
        {"x": _r(g, 5, 11), "weight": _r(g, 7, 11), "bias": _r(g, 7), "vectors": _r(g, 4, 7)},
        {"x": _r(g, 3, 6, dtype=torch.float64), "weight": _r(g, 9, 6, dtype=torch.float64),
         "bias": _r(g, 9, dtype=torch.float64), "vectors": _r(g, 2, 9, dtype=torch.float64)},
        # no RoIs at all (an image without proposals)
        {"x": _r(g, 0, 8), "weight": _r(g, 5, 8), "bias": _r(g, 5), "vectors": _r(g, 6, 5)},
    ]


def cases_reconstruction_loss(g):
    return [
        {"x": _r(g, 6, 10), "x_hat": _r(g, 6, 10), "weight": 0.5},
        {"x": _r(g, 3, 4, 5, 2, dtype=torch.float64),
         "x_hat": _r(g, 3, 4, 5, 2, dtype=torch.float64), "weight": 1.5},
        {"x": _r(g, 7, 3), "x_hat": _r(g, 7, 3), "weight": 0.0},
    ]


def cases_seen_to_unseen(g):
    return [
        {"seen_logits": _r(g, 5, 4, scale=3.0), "seen_vectors": _r(g, 4, 7),
         "unseen_vectors": _r(g, 3, 7)},
        {"seen_logits": _r(g, 2, 6, dtype=torch.float64),
         "seen_vectors": _r(g, 6, 5, dtype=torch.float64),
         "unseen_vectors": _r(g, 8, 5, dtype=torch.float64)},
        # large logits: the softmax must stay finite
        {"seen_logits": _r(g, 4, 3, scale=200.0), "seen_vectors": _r(g, 3, 9),
         "unseen_vectors": _r(g, 2, 9)},
        {"seen_logits": _r(g, 0, 3), "seen_vectors": _r(g, 3, 4), "unseen_vectors": _r(g, 5, 4)},
    ]


def cases_vector_conv(g):
    return [
        {"pixels": _r(g, 2, 5, 3, 4), "vectors": _r(g, 6, 5)},
        {"pixels": _r(g, 3, 4, 5, 2, dtype=torch.float64),
         "vectors": _r(g, 7, 4, dtype=torch.float64)},
        {"pixels": _r(g, 0, 3, 2, 2), "vectors": _r(g, 4, 3)},
    ]


def cases_unseen_mask_logits(g):
    return [
        {"seen_logits": _r(g, 2, 4, 3, 5), "seen_vectors": _r(g, 4, 6),
         "unseen_vectors": _r(g, 3, 6)},
        {"seen_logits": _r(g, 3, 5, 2, 4, dtype=torch.float64),
         "seen_vectors": _r(g, 5, 7, dtype=torch.float64),
         "unseen_vectors": _r(g, 6, 7, dtype=torch.float64)},
        # large logits: no softmax or sigmoid may be applied
        {"seen_logits": _r(g, 1, 3, 4, 2, scale=40.0), "seen_vectors": _r(g, 3, 5),
         "unseen_vectors": _r(g, 2, 5)},
    ]


def cases_background_vector(g):
    return [
        {"fb_weight": _r(g, 6, 7)},                          # A = 3, D = 7
        {"fb_weight": _r(g, 10, 3, dtype=torch.float64)},    # A = 5
        {"fb_weight": _r(g, 2, 4)},                          # A = 1: the background row itself
    ]


def cases_harmonic_mean(g):
    s = torch.rand(2, 3, generator=g)
    u = torch.rand(2, 3, generator=g)
    s[0, 1], u[0, 1] = 0.0, 0.0    # both zero: HM 0, not NaN
    s[1, 2] = 0.0                  # one zero: HM 0
    return [
        {"seen": s, "unseen": u},
        {"seen": torch.rand(4, 3, generator=g, dtype=torch.float64) * 100,
         "unseen": torch.rand(4, 3, generator=g, dtype=torch.float64) * 100},
    ]


CHECKS = {
    "6.1": Check("zeroshot.semantic_scores", cases_semantic_scores, naive_semantic_scores),
    "6.2": Check("zeroshot.reconstruction_loss", cases_reconstruction_loss,
                 naive_reconstruction_loss),
    "6.3": Check("zeroshot.seen_to_unseen", cases_seen_to_unseen, naive_seen_to_unseen),
    "6.4": Check("zeroshot.vector_conv", cases_vector_conv, naive_vector_conv),
    "6.5": Check("zeroshot.unseen_mask_logits", cases_unseen_mask_logits,
                 naive_unseen_mask_logits),
    "6.6": Check("zeroshot.background_vector", cases_background_vector, naive_background_vector),
    "6.7": Check("zeroshot.harmonic_mean", cases_harmonic_mean, naive_harmonic_mean),
}

# ----------------------------------------------------------------------------------------------
# Planted bugs: mistakes real learners make, each must cost its exercise
# ----------------------------------------------------------------------------------------------

BUGS = {
    "6.1": [
        Bug("return sem @ vectors.T", "return sem @ vectors[1:].T",
            "background row dropped from the class vectors"),
        Bug("sem = x @ weight.T + bias", "sem = x @ weight.T", "encoder bias forgotten"),
        Bug("return sem @ vectors.T", "return (sem @ vectors.T).softmax(dim=-1)",
            "softmax applied to the logits"),
        Bug("sem = x @ weight.T + bias", "sem = x.float() @ weight.T.float() + bias.float()",
            "computed in float32 whatever the input's dtype"),
    ],
    "6.2": [
        Bug("(x - x_hat).pow(2).mean()", "(x - x_hat).pow(2).sum()", "summed instead of averaged"),
        Bug("return weight * (x - x_hat)", "return (x - x_hat)", "loss weight ignored"),
        Bug("(x - x_hat).pow(2).mean()", "(x - x_hat).pow(2).mean(dim=-1)",
            "mean over the last axis only (not a scalar)"),
        Bug("(x - x_hat).pow(2).mean()", "(x - x_hat).abs().mean()", "L1 instead of squared error"),
    ],
    "6.3": [
        Bug("seen_logits.softmax(dim=-1)", "seen_logits.softmax(dim=0)",
            "softmax over the RoIs instead of the classes"),
        Bug("probs = seen_logits.softmax(dim=-1)", "probs = seen_logits",
            "logits mapped without the softmax"),
        Bug("@ unseen_vectors.T", "@ unseen_vectors[1:].T",
            "background row dropped from the unseen vectors"),
        Bug("probs = seen_logits.softmax(dim=-1)", "probs = seen_logits[:, 1:].softmax(dim=-1)",
            "background column dropped before the softmax (shapes then disagree)"),
    ],
    "6.4": [
        Bug("logits.unflatten(2, (h, w))", "logits.unflatten(2, (w, h))",
            "rows and columns of the mask swapped"),
        Bug("vectors @ pixels.flatten(2)", "vectors[1:] @ pixels.flatten(2)",
            "background vector dropped"),
        Bug("return logits.unflatten(2, (h, w))", "return logits.unflatten(2, (h, w)).sigmoid()",
            "sigmoid applied (the mask loss wants logits)"),
        Bug("vectors @ pixels.flatten(2)", "vectors.float() @ pixels.flatten(2).float()",
            "computed in float32 whatever the input's dtype"),
    ],
    "6.5": [
        Bug("sem = seen_vectors.T @ seen_logits.flatten(2)",
            "sem = (seen_vectors.T @ seen_logits.flatten(2)).relu()",
            "a nonlinearity between the two 1x1 convs"),
        Bug("seen_vectors.T @ seen_logits.flatten(2)",
            "seen_vectors.T @ seen_logits.softmax(dim=1).flatten(2)",
            "softmax over classes as in the box path"),
        Bug("logits = unseen_vectors @ sem", "logits = unseen_vectors[1:] @ sem",
            "background row dropped from the unseen vectors"),
        Bug("return logits.unflatten(2, (h, w))", "return logits.unflatten(2, (w, h))",
            "rows and columns of the mask swapped"),
    ],
    "6.6": [
        Bug("fb_weight[0::2]", "fb_weight[1::2]", "foreground rows averaged"),
        Bug("fb_weight[0::2]", "fb_weight[: fb_weight.shape[0] // 2]",
            "first half of the rows taken as background (the layout is anchor by anchor)"),
        Bug(".mean(dim=0)", ".sum(dim=0)", "background rows summed instead of averaged"),
        Bug(".mean(dim=0)", ".mean(dim=1)", "mean over the wrong axis"),
    ],
    "6.7": [
        Bug("return torch.where(total > 0, 2 * seen * unseen / safe, torch.zeros_like(total))",
            "return 2 * seen * unseen / total", "no guard for seen = unseen = 0 (NaN)"),
        Bug("2 * seen * unseen / safe", "seen * unseen / safe", "factor 2 missing"),
        Bug("return torch.where(total > 0, 2 * seen * unseen / safe, torch.zeros_like(total))",
            "return total / 2", "arithmetic mean instead of harmonic"),
    ],
}

# Exercises whose first bug `make grade-demo` plants in its "buggy" learner (whole nbgrader pipeline).
DEMO = ("6.1", "6.3", "6.6")
