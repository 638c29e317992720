"""Hidden checks for chapter 04 (AFA, affinity from attention), instructor-only.

``naive_*`` are independent formulations: literal loops over the paper's indices (per image,
class, pixel, neighbour, token pair), written without the library's helpers (PAR's neighbours and
the window are rebuilt here from their definitions); ``cases_*`` build the hidden cases (other
shapes than the visible tests, float64, edge cases, a distinct size on every axis) from the
grader's generator; ``CHECKS`` and ``BUGS`` follow ``common``'s protocol. Only torch is imported.
"""

from __future__ import annotations

import math

import torch

from .common import Bug, Check

IGNORE = 255


# ----------------------------------------------------------------------------------------------
# Naive formulations
# ----------------------------------------------------------------------------------------------

def _bilinear(m, size):
    """Bilinear resize with align_corners=False written out on Python floats.

    m: list of h lists of w floats -> list of H lists of W floats."""
    h, w = len(m), len(m[0])
    H, W = size
    out = []
    for Y in range(H):
        sy = max((Y + 0.5) * h / H - 0.5, 0.0)
        y0 = min(math.floor(sy), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        row = []
        for X in range(W):
            sx = max((X + 0.5) * w / W - 0.5, 0.0)
            x0 = min(math.floor(sx), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            row.append((1 - fy) * ((1 - fx) * m[y0][x0] + fx * m[y0][x1])
                       + fy * ((1 - fx) * m[y1][x0] + fx * m[y1][x1]))
        out.append(row)
    return out


def naive_class_activation_maps(features, weight, size):
    """Per image b and class k: cam[y, x] = Σ_c w[k, c] F[b, c, y, x]; resized; ReLU; then
    (cam - min) / (max + 1e-5) over that one map."""
    B, C, h, w = features.shape
    K = weight.shape[0]
    f, wt = features.tolist(), weight.tolist()
    out = torch.empty(B, K, *size, dtype=features.dtype)
    for b in range(B):
        for k in range(K):
            m = [[sum(wt[k][c] * f[b][c][y][x] for c in range(C)) for x in range(w)]
                 for y in range(h)]
            m = [[max(v, 0.0) for v in row] for row in _bilinear(m, size)]
            lo = min(min(row) for row in m)
            m = [[v - lo for v in row] for row in m]
            hi = max(max(row) for row in m)
            out[b, k] = torch.tensor([[v / (hi + 1e-5) for v in row] for row in m],
                                     dtype=features.dtype)
    return out


def naive_pseudo_labels(scores_high, scores_low, ignore_index=IGNORE):
    """Pixel by pixel: the high map's winner; background there -> ignore unless the low map's
    winner is background too."""
    B, K, H, W = scores_high.shape
    out = torch.empty(B, H, W, dtype=torch.int64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                hi = max(range(K), key=lambda k: (float(scores_high[b, k, y, x]), -k))
                lo = max(range(K), key=lambda k: (float(scores_low[b, k, y, x]), -k))
                if hi != 0:
                    out[b, y, x] = hi
                elif lo == 0:
                    out[b, y, x] = 0
                else:
                    out[b, y, x] = ignore_index
    return out


_OFFS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _clamp(v, lo, hi):
    return min(max(v, lo), hi)


def naive_par_kernel(images, dilations, w1=0.3, w2=0.01):
    """For every pixel i and its 8 neighbours at each dilation (coordinates clamped to the image:
    replicate padding), the kernels written per neighbour; softmax written out with exp."""
    B, C, H, W = images.shape
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in _OFFS]
    N = len(offs)
    dist = [math.hypot(dy, dx) for dy, dx in offs]
    mean_d = sum(dist) / N
    std_d = math.sqrt(sum((v - mean_d) ** 2 for v in dist) / (N - 1))
    kpos = [-(v / (std_d + 1e-8) / w1) ** 2 for v in dist]
    zpos = sum(math.exp(v - max(kpos)) for v in kpos)
    spos = [math.exp(v - max(kpos)) / zpos for v in kpos]
    out = torch.empty(B, N, H, W, dtype=images.dtype)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                krgb = [0.0] * N
                for c in range(C):
                    vals = [float(images[b, c, _clamp(y + dy, 0, H - 1), _clamp(x + dx, 0, W - 1)])
                            for dy, dx in offs]
                    mu = sum(vals) / N
                    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (N - 1))
                    centre = float(images[b, c, y, x])
                    for n in range(N):
                        krgb[n] += -(abs(vals[n] - centre) / (sd + 1e-8) / w1) ** 2 / C
                top = max(krgb)
                z = sum(math.exp(v - top) for v in krgb)
                for n in range(N):
                    out[b, n, y, x] = math.exp(krgb[n] - top) / z + w2 * spos[n]
    return out


def naive_affinity_labels(label, radius, ignore_index=IGNORE):
    """Token pair by token pair, with row-major coordinates."""
    B, h, w = label.shape
    L = h * w
    out = torch.empty(B, L, L, dtype=torch.int64)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                yi, xi, yj, xj = i // w, i % w, j // w, j % w
                a, c = int(label[b, yi, xi]), int(label[b, yj, xj])
                if abs(yi - yj) > radius or abs(xi - xj) > radius or ignore_index in (a, c):
                    out[b, i, j] = ignore_index
                else:
                    out[b, i, j] = 1 if a == c else 0
    return out


def naive_attention_affinity(attn_logits, weight, bias):
    """A[b, i, j] = sigmoid(Σ_h w_h (S[b, h, i, j] + S[b, h, j, i]) + bias), entry by entry."""
    B, nh, L, _ = attn_logits.shape
    out = torch.empty(B, L, L, dtype=attn_logits.dtype)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                z = float(bias)
                for hh in range(nh):
                    z += float(weight[hh]) * float(attn_logits[b, hh, i, j] + attn_logits[b, hh, j, i])
                out[b, i, j] = 1 / (1 + math.exp(-z)) if z > -700 else 0.0
    return out


def naive_affinity_loss(affinity, aff_label):
    """Sums and counts over the labelled pairs of the whole batch, one pair at a time."""
    pos_sum = neg_sum = 0.0
    pos_n = neg_n = 0
    for a, t in zip(affinity.flatten().tolist(), aff_label.flatten().tolist()):
        if t == 1:
            pos_sum, pos_n = pos_sum + (1 - a), pos_n + 1
        elif t == 0:
            neg_sum, neg_n = neg_sum + a, neg_n + 1
    value = 0.5 * pos_sum / (pos_n + 1) + 0.5 * neg_sum / (neg_n + 1)
    return torch.tensor(value, dtype=affinity.dtype)


def naive_random_walk(probs, affinity, mask, alpha=2.0):
    """P_rw[k, j] = Σ_i P[k, i] A'[i, j] / (Σ_i' A'[i', j] + 0.1), A' = (mask · A)^α."""
    B, K, h, w = probs.shape
    L = h * w
    out = torch.empty(B, K, h, w, dtype=probs.dtype)
    for b in range(B):
        a = [[float(affinity[b, i, j]) ** alpha if bool(mask[i, j]) else 0.0 for j in range(L)]
             for i in range(L)]
        col = [sum(a[i][j] for i in range(L)) + 0.1 for j in range(L)]
        for k in range(K):
            p = probs[b, k].flatten().tolist()
            for j in range(L):
                out[b, k, j // w, j % w] = sum(p[i] * a[i][j] for i in range(L)) / col[j]
    return out


# ----------------------------------------------------------------------------------------------
# Hidden cases (values from the grader's generator, shapes fixed; a distinct size on every axis)
# ----------------------------------------------------------------------------------------------

def cases_class_activation_maps(g):
    f3 = torch.randn(1, 3, 2, 3, generator=g) + 4.0        # every logit positive: min > 0
    return [
        {"features": torch.randn(2, 5, 3, 4, generator=g), "weight": torch.randn(3, 5, generator=g),
         "size": (6, 8)},
        {"features": torch.randn(3, 4, 2, 5, generator=g, dtype=torch.float64),
         "weight": torch.randn(2, 4, generator=g, dtype=torch.float64), "size": (7, 9)},
        {"features": f3, "weight": torch.rand(4, 3, generator=g) + 0.1, "size": (5, 6)},
        # a class whose logits are all negative: its CAM is 0 everywhere, not NaN
        {"features": torch.rand(2, 3, 3, 2, generator=g),
         "weight": -torch.rand(1, 3, generator=g) - 0.1, "size": (4, 5)},
    ]


def cases_pseudo_labels(g):
    def maps(B, K, H, W, dtype=torch.float32):
        return torch.rand(B, K, H, W, generator=g, dtype=dtype)

    hi = maps(2, 4, 3, 5)
    lo = maps(2, 4, 3, 5)
    lo[:, 0] += 0.6          # the low-background map often says background
    hi2 = maps(3, 6, 4, 2, torch.float64)
    lo2 = maps(3, 6, 4, 2, torch.float64)
    hi2[:, 0] += 0.4
    return [
        {"scores_high": hi, "scores_low": lo},
        {"scores_high": hi2, "scores_low": lo2, "ignore_index": 200},
        {"scores_high": maps(1, 2, 5, 7), "scores_low": maps(1, 2, 5, 7)},
    ]


def cases_par_kernel(g):
    return [
        {"images": torch.rand(2, 3, 5, 6, generator=g), "dilations": (1, 2)},
        {"images": torch.rand(1, 3, 6, 4, generator=g, dtype=torch.float64) * 255,
         "dilations": (1, 3), "w1": 0.5, "w2": 0.1},
        # a flat region: every σ = 0, the 1e-8 keeps it finite
        {"images": torch.cat([torch.full((1, 3, 4, 3), 0.5),
                              torch.rand(1, 3, 4, 2, generator=g)], dim=-1), "dilations": (2,)},
    ]


def cases_affinity_labels(g):
    def lab(B, h, w, K, p_ignore=0.2):
        x = torch.randint(0, K, (B, h, w), generator=g)
        return x.masked_fill(torch.rand(B, h, w, generator=g) < p_ignore, IGNORE)

    return [
        {"label": lab(2, 4, 5, 3), "radius": 2},
        {"label": lab(3, 3, 6, 4), "radius": 1},
        {"label": lab(1, 5, 2, 2), "radius": 8},                  # the window covers everything
        {"label": lab(2, 3, 4, 3, p_ignore=0.0), "radius": 0, "ignore_index": 250},
    ]


def cases_attention_affinity(g):
    return [
        {"attn_logits": torch.randn(2, 3, 5, 5, generator=g), "weight": torch.randn(3, generator=g),
         "bias": torch.randn((), generator=g)},
        {"attn_logits": torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64),
         "weight": torch.randn(4, generator=g, dtype=torch.float64),
         "bias": torch.randn((), generator=g, dtype=torch.float64)},
        {"attn_logits": torch.randn(1, 2, 7, 7, generator=g) * 5,
         "weight": torch.randn(2, generator=g), "bias": torch.zeros(())},
    ]


def cases_affinity_loss(g):
    def case(B, L, dtype=torch.float32):
        return {"affinity": torch.rand(B, L, L, generator=g, dtype=dtype),
                "aff_label": torch.tensor([0, 1, IGNORE])[torch.randint(0, 3, (B, L, L),
                                                                         generator=g)]}

    none_pos = case(2, 4)
    none_pos["aff_label"] = none_pos["aff_label"].masked_fill(none_pos["aff_label"] == 1, 0)
    all_ignored = case(1, 3)
    all_ignored["aff_label"] = torch.full((1, 3, 3), IGNORE)
    return [case(2, 5), case(3, 6, torch.float64), none_pos, all_ignored]


def cases_random_walk(g):
    def case(B, K, h, w, radius, dtype=torch.float32):
        L = h * w
        rows = torch.arange(h).repeat_interleave(w)
        cols = torch.arange(w).repeat(h)
        mask = ((rows[:, None] - rows[None]).abs() <= radius) & \
            ((cols[:, None] - cols[None]).abs() <= radius)
        a = torch.rand(B, L, L, generator=g, dtype=dtype)
        return {"probs": torch.rand(B, K, h, w, generator=g, dtype=dtype).softmax(1),
                "affinity": (a + a.transpose(1, 2)) / 2, "mask": mask}

    asym = case(1, 3, 2, 4, 1)
    asym["affinity"] = torch.rand(1, 8, 8, generator=g)          # not symmetric: rows ≠ columns
    return [case(2, 3, 4, 5, 1), dict(case(3, 4, 2, 3, 1, torch.float64), alpha=3.0),
            asym, case(1, 2, 4, 5, 2)]


CHECKS = {
    "4.1": Check("afa.class_activation_maps", cases_class_activation_maps,
                 naive_class_activation_maps),
    "4.2": Check("afa.pseudo_labels", cases_pseudo_labels, naive_pseudo_labels),
    "4.3": Check("afa.par_kernel", cases_par_kernel, naive_par_kernel),
    "4.4": Check("afa.affinity_labels", cases_affinity_labels, naive_affinity_labels),
    "4.5": Check("afa.attention_affinity", cases_attention_affinity, naive_attention_affinity,
                 square=("attn_logits",)),
    "4.6": Check("afa.affinity_loss", cases_affinity_loss, naive_affinity_loss,
                 square=("affinity", "aff_label")),
    "4.7": Check("afa.random_walk", cases_random_walk, naive_random_walk,
                 square=("affinity", "mask")),
}


# ----------------------------------------------------------------------------------------------
# Planted bugs: mistakes real learners make, each must cost its exercise
# ----------------------------------------------------------------------------------------------

BUGS = {
    "4.1": [
        Bug("cam.amin(dim=(-2, -1), keepdim=True)", "cam.amin(dim=(1, 2, 3), keepdim=True)",
            "min taken over all classes at once, not per channel"),
        Bug("cam.amax(dim=(-2, -1), keepdim=True)", "cam.amax(dim=1, keepdim=True)",
            "max taken over the class axis"),
        Bug('align_corners=False).relu()', 'align_corners=False)',
            "no ReLU: negative evidence kept"),
        Bug("cam - cam.amin(dim=(-2, -1), keepdim=True)", "cam",
            "max-normalised only (min not subtracted)"),
    ],
    "4.2": [
        Bug("label = torch.where(hi == 0,", "label = torch.where(lo == 0,",
            "uncertain band taken from the low map"),
        Bug("return torch.where((hi == 0) & (lo == 0), torch.zeros_like(hi), label)",
            "return label", "background never kept: every background pixel ignored"),
        Bug("hi = scores_high.argmax(dim=1)", "hi = scores_high.argmax(dim=-1)",
            "argmax over the wrong axis"),
        Bug("return torch.where((hi == 0) & (lo == 0), torch.zeros_like(hi), label)",
            "return torch.where((hi == 0) & (lo == 0), torch.zeros_like(hi), label).float()",
            "labels returned as floats"),
    ],
    "4.3": [
        Bug("std = nb.std(dim=2, keepdim=True)", "std = nb.std(dim=1, keepdim=True)",
            "σ over the colour channels instead of the neighbours"),
        Bug("k_rgb = k_rgb.mean(dim=1)", "k_rgb = k_rgb.sum(dim=1)",
            "channels summed instead of averaged"),
        Bug("+ w2 * k_pos.softmax(dim=0)[None, :, None, None]",
            "+ w2 * k_pos[None, :, None, None]", "position kernel not soft-maxed"),
        Bug("k_rgb.softmax(dim=1)", "k_rgb.softmax(dim=-1)", "softmax over image columns"),
        Bug("std = nb.std(dim=2, keepdim=True)", "std = nb.std(dim=2, keepdim=True, unbiased=False)",
            "biased std"),
    ],
    "4.4": [
        Bug("<= radius) & \\", "< radius) & \\", "window radius exclusive"),
        Bug("bad = ignored[:, :, None] | ignored[:, None, :] | ~near",
            "bad = ignored[:, :, None] | ~near", "only the first token's ignore checked"),
        Bug("cols = torch.arange(w, device=label.device).repeat(h)",
            "cols = torch.arange(w, device=label.device).repeat_interleave(h)",
            "token grid read column-major"),
        Bug("bad = ignored[:, :, None] | ignored[:, None, :] | ~near",
            "bad = ignored[:, :, None] & ignored[:, None, :] | ~near",
            "a pair ignored only when both tokens are"),
    ],
    "4.5": [
        Bug("sym = attn_logits + attn_logits.transpose(-2, -1)", "sym = 2 * attn_logits",
            "no symmetrisation"),
        Bug("sym = attn_logits + attn_logits.transpose(-2, -1)",
            "sym = attn_logits.softmax(-1) + attn_logits.softmax(-1).transpose(-2, -1)",
            "post-softmax attention used"),
        Bug('torch.einsum("bhij,h->bij", sym, weight) + bias',
            "sym.mean(dim=1) + bias", "heads averaged instead of weighted"),
        Bug("return torch.sigmoid(", "return (", "no sigmoid"),
    ],
    "4.6": [
        Bug("(pos.sum() + 1)", "pos.sum().clamp(min=1)", "denominator without the +1"),
        Bug("neg = (aff_label == 0).to(affinity.dtype)", "neg = (aff_label != 1).to(affinity.dtype)",
            "ignored pairs counted as negatives"),
        Bug("pos_loss = (pos * (1 - affinity)).sum()", "pos_loss = (pos * affinity).sum()",
            "positives pushed towards 0"),
        Bug("(neg * affinity).sum() / (neg.sum() + 1)", "(neg * affinity).mean()",
            "negatives averaged over all pairs"),
    ],
    "4.7": [
        Bug("aff.sum(dim=1, keepdim=True)", "aff.sum(dim=2, keepdim=True)",
            "rows normalised instead of columns"),
        Bug("(probs.flatten(2) @ trans)", "(trans @ probs.flatten(2).transpose(1, 2))"
            ".transpose(1, 2)", "T applied from the left (P_rw = (T P^T)^T)"),
        Bug("masked_fill(~mask, 0) ** alpha", "masked_fill(~mask, 0)", "power α skipped"),
        Bug("affinity.detach().masked_fill(~mask, 0)", "affinity.detach()",
            "window mask not applied"),
        Bug("keepdim=True) + 0.1)", "keepdim=True) + 1e-5)", "column sums without the +0.1"),
    ],
}

# Exercises whose first bug `make grade-demo` plants in its "buggy" learner (whole nbgrader pipeline).
DEMO = ("4.2", "4.5", "4.7")
