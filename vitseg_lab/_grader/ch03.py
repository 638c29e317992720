"""Hidden checks for chapter 03 (SegViT ATM), instructor-only.

``naive_*`` are independent formulations written as literal loops over the paper's indices (per
batch item, head, class, pixel); ``cases_*`` build the hidden cases (other shapes, float64,
edge cases) from the grader's generator; ``CHECKS`` and ``BUGS`` follow ``common``'s protocol. Only torch is imported here: the grader process stays light.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import Bug, Check

# ----------------------------------------------------------------------------------------------
# Naive formulations
# ----------------------------------------------------------------------------------------------

def naive_atm_similarity(queries, keys, num_heads):
    """S[b, j, k, l] = Σ_c q[b, k, j·dh + c] · key[b, l, j·dh + c] / sqrt(dh), one entry at a time
    over (b, j, k) with the inner product over l vectorised only as a dot of two vectors."""
    B, K, d = queries.shape
    L = keys.shape[1]
    dh = d // num_heads
    out = torch.empty(B, num_heads, K, L, dtype=queries.dtype)
    for b in range(B):
        for j in range(num_heads):
            cols = slice(j * dh, (j + 1) * dh)
            for k in range(K):
                for l in range(L):
                    dot = torch.dot(queries[b, k, cols], keys[b, l, cols])
                    out[b, j, k, l] = dot / math.sqrt(dh)
    return out


def naive_atm_mask_logits(sim, grid):
    """M[b, k, y, x] = (1/nh) Σ_j S[b, j, k, y·w + x]."""
    B, nh, K, _ = sim.shape
    h, w = grid
    out = torch.zeros(B, K, h, w, dtype=sim.dtype)
    for b in range(B):
        for k in range(K):
            for y in range(h):
                for x in range(w):
                    total = sim.new_zeros(())
                    for j in range(nh):
                        total = total + sim[b, j, k, y * w + x]
                    out[b, k, y, x] = total / nh
    return out


def _bilinear(m, size):
    """Bilinear resize with align_corners=False written out (half-pixel centres, edge clamp).

    m: (h, w) -> (H, W)."""
    h, w = m.shape
    H, W = size
    out = torch.empty(H, W, dtype=m.dtype)
    for Y in range(H):
        sy = max((Y + 0.5) * h / H - 0.5, 0.0)
        y0 = min(math.floor(sy), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for X in range(W):
            sx = max((X + 0.5) * w / W - 0.5, 0.0)
            x0 = min(math.floor(sx), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[Y, X] = ((1 - fy) * ((1 - fx) * m[y0, x0] + fx * m[y0, x1])
                         + fy * ((1 - fx) * m[y1, x0] + fx * m[y1, x1]))
    return out


def naive_cascade_masks(stage_logits):
    """out[i] = Σ_{j <= i} resize(stage_logits[j]) to the last stage's grid, summed term by term."""
    h, w = stage_logits[-1].shape[-2:]
    B, K = stage_logits[0].shape[:2]
    resized = []
    for m in stage_logits:
        r = torch.empty(B, K, h, w, dtype=m.dtype)
        for b in range(B):
            for k in range(K):
                r[b, k] = _bilinear(m[b, k], (h, w))
        resized.append(r)
    outs = []
    for i in range(len(stage_logits)):
        acc = torch.zeros(B, K, h, w, dtype=stage_logits[0].dtype)
        for j in range(i + 1):
            acc = acc + resized[j]
        outs.append(acc)
    return torch.stack(outs)


def naive_semantic_scores(class_logits, mask_logits):
    """seg[b, c, y, x] = Σ_q softmax(class_logits[b, q])[c] · sigmoid(mask_logits[b, q, y, x])."""
    B, Q, K1 = class_logits.shape
    K = K1 - 1
    H, W = mask_logits.shape[-2:]
    out = torch.zeros(B, K, H, W, dtype=mask_logits.dtype)
    for b in range(B):
        for q in range(Q):
            e = [math.exp(float(v)) for v in class_logits[b, q] - class_logits[b, q].max()]
            z = sum(e)
            m = 1 / (1 + torch.exp(-mask_logits[b, q]))
            for c in range(K):
                out[b, c] += (e[c] / z) * m
    return out


def naive_query_downsample(tokens, grid):
    """Token at grid (2i, 2j) for every i < ceil(h/2), j < ceil(w/2), in row-major order."""
    B, _, C = tokens.shape
    h, w = grid
    rows = []
    for y in range(0, h, 2):
        for x in range(0, w, 2):
            rows.append(tokens[:, y * w + x])
    return torch.stack(rows, dim=1) if rows else tokens.new_zeros(B, 0, C)


def naive_sigmoid_focal_loss(logits, targets, valid, alpha=0.25, gamma=2.0):
    """Per mask: mean over valid pixels of -α_t (1 - p_t)^γ log p_t, one pixel at a time."""
    N, P = logits.shape
    out = torch.zeros(N, dtype=logits.dtype)
    for n in range(N):
        total, count = 0.0, 0
        for i in range(P):
            if not bool(valid[n, i]):
                continue
            x, t = float(logits[n, i]), float(targets[n, i])
            p = 1 / (1 + math.exp(-x))
            p_t = p * t + (1 - p) * (1 - t)
            a_t = alpha * t + (1 - alpha) * (1 - t)
            # -log p_t from the logit, stably: softplus(-x) if t = 1, softplus(x) if t = 0
            log_pt = -(t * _softplus(-x) + (1 - t) * _softplus(x))
            total += -a_t * (1 - p_t) ** gamma * log_pt
            count += 1
        out[n] = total / max(count, 1)
    return out


def _softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def naive_dice_loss(logits, targets, valid):
    """Per mask: 1 - (2 Σ p t + 1) / (Σ p + Σ t + 1) over valid pixels, one pixel at a time."""
    N, P = logits.shape
    out = torch.zeros(N, dtype=logits.dtype)
    for n in range(N):
        inter = sp = st = 0.0
        for i in range(P):
            if not bool(valid[n, i]):
                continue
            p = 1 / (1 + math.exp(-float(logits[n, i])))
            t = float(targets[n, i])
            inter, sp, st = inter + p * t, sp + p, st + t
        out[n] = 1 - (2 * inter + 1) / (sp + st + 1)
    return out


def naive_atm_decoder(layer_params, class_tokens, layer_tokens, num_heads):
    """One ATM decoder layer written per class and per head (post-norm, as ``ATMDecoderLayer``).

    layer_params: a ``state_dict`` of ``ATMDecoderLayer``; class_tokens (K, d), layer_tokens (L, d)
    (one image). -> (new class tokens (K, d), mask logits (K, L) averaged over heads).
    """
    p = layer_params
    d = class_tokens.shape[1]
    dh = d // num_heads

    def lin(x, name):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def ln(x, name):
        return F.layer_norm(x, (d,), p[f"{name}.weight"], p[f"{name}.bias"])

    def attend(q, k, v):  # q (K, d), k/v (N, d) -> (K, d) and per-head logits list
        out = torch.zeros(q.shape[0], d, dtype=q.dtype)
        logits = []
        for j in range(num_heads):
            cols = slice(j * dh, (j + 1) * dh)
            s = torch.zeros(q.shape[0], k.shape[0], dtype=q.dtype)
            for a in range(q.shape[0]):
                for b in range(k.shape[0]):
                    s[a, b] = torch.dot(q[a, cols], k[b, cols]) / math.sqrt(dh)
            logits.append(s)
            w = torch.softmax(s, dim=1)
            out[:, cols] = w @ v[:, cols]
        return out, logits

    # self-attention among class tokens (nn.MultiheadAttention's packed in_proj)
    wq, wk, wv = p["self_attn.in_proj_weight"].chunk(3)
    bq, bk, bv = p["self_attn.in_proj_bias"].chunk(3)
    x = class_tokens
    sa, _ = attend(x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv)
    sa = sa @ p["self_attn.out_proj.weight"].T + p["self_attn.out_proj.bias"]
    x = ln(x + sa, "norm1")
    # ATM cross-attention
    ca, logits = attend(lin(x, "q_proj"), lin(layer_tokens, "k_proj"), lin(layer_tokens, "v_proj"))
    x = ln(x + lin(ca, "out_proj"), "norm2")
    ffn = lin(torch.relu(lin(x, "ffn.0")), "ffn.3")
    x = ln(x + ffn, "norm3")
    mask = sum(logits) / num_heads
    return x, mask


# ----------------------------------------------------------------------------------------------
# Hidden cases (values from the grader's generator, shapes fixed; a distinct size on every axis)
# ----------------------------------------------------------------------------------------------

def cases_atm_similarity(g):
    return [
        {"queries": torch.randn(2, 5, 12, generator=g), "keys": torch.randn(2, 7, 12, generator=g),
         "num_heads": 3},
        {"queries": torch.randn(1, 3, 8, generator=g, dtype=torch.float64),
         "keys": torch.randn(1, 11, 8, generator=g, dtype=torch.float64), "num_heads": 1},
        {"queries": torch.randn(3, 1, 16, generator=g), "keys": torch.randn(3, 4, 16, generator=g),
         "num_heads": 8},
    ]


def cases_atm_mask_logits(g):
    return [
        {"sim": torch.randn(2, 3, 4, 15, generator=g), "grid": (3, 5)},
        {"sim": torch.randn(1, 5, 2, 12, generator=g, dtype=torch.float64), "grid": (4, 3)},
        # one head: the mask is the similarity itself; large logits must not be squashed
        {"sim": torch.randn(2, 1, 3, 6, generator=g) * 30, "grid": (2, 3)},
    ]


def cases_cascade_masks(g):
    return [
        {"stage_logits": [torch.randn(2, 3, 4, 5, generator=g) for _ in range(3)]},
        # different grids: earlier stages are resized to the last one's
        {"stage_logits": [torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64),
                          torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64),
                          torch.randn(1, 2, 6, 7, generator=g, dtype=torch.float64)]},
        # a single stage is its own accumulation
        {"stage_logits": [torch.randn(3, 4, 2, 5, generator=g)]},
    ]


def cases_semantic_scores(g):
    return [
        {"class_logits": torch.randn(2, 4, 4, generator=g),
         "mask_logits": torch.randn(2, 4, 3, 5, generator=g)},
        # Q != K: tokens need not be bound to classes for the formula
        {"class_logits": torch.randn(1, 5, 3, generator=g, dtype=torch.float64),
         "mask_logits": torch.randn(1, 5, 4, 2, generator=g, dtype=torch.float64)},
        # large logits: softmax and sigmoid must stay finite
        {"class_logits": torch.randn(2, 3, 4, generator=g) * 80,
         "mask_logits": torch.randn(2, 3, 2, 5, generator=g) * 80},
    ]


def cases_query_downsample(g):
    return [
        {"tokens": torch.randn(2, 24, 5, generator=g), "grid": (4, 6)},
        {"tokens": torch.randn(1, 35, 3, generator=g, dtype=torch.float64), "grid": (5, 7)},  # odd
        {"tokens": torch.randn(3, 6, 2, generator=g), "grid": (1, 6)},
    ]


def _mask_case(g, N, P, dtype=torch.float32, scale=2.0, p_valid=0.8):
    return {"logits": torch.randn(N, P, generator=g, dtype=dtype) * scale,
            "targets": (torch.rand(N, P, generator=g) < 0.3).to(dtype),
            "valid": torch.rand(N, P, generator=g) < p_valid}


def cases_sigmoid_focal_loss(g):
    c3 = _mask_case(g, 3, 9)
    c3["valid"][1] = False                      # a mask with no valid pixel: loss 0
    return [
        _mask_case(g, 4, 30),
        dict(_mask_case(g, 2, 17, torch.float64), alpha=0.5, gamma=1.0),
        c3,
        _mask_case(g, 2, 12, scale=40.0),      # large logits: must stay finite
    ]


def cases_dice_loss(g):
    c3 = _mask_case(g, 3, 9)
    c3["valid"][0] = False                      # no valid pixel: dice = 1 - 1/1 = 0
    return [
        _mask_case(g, 4, 30),
        _mask_case(g, 2, 17, torch.float64),
        c3,
        _mask_case(g, 2, 12, scale=40.0),
    ]


CHECKS = {
    "3.1": Check("segvit.atm_similarity", cases_atm_similarity, naive_atm_similarity),
    "3.2": Check("segvit.atm_mask_logits", cases_atm_mask_logits, naive_atm_mask_logits),
    "3.3": Check("segvit.cascade_masks", cases_cascade_masks, naive_cascade_masks),
    "3.4": Check("segvit.semantic_scores", cases_semantic_scores, naive_semantic_scores),
    "3.5": Check("losses.sigmoid_focal_loss", cases_sigmoid_focal_loss, naive_sigmoid_focal_loss),
    "3.6": Check("losses.dice_loss", cases_dice_loss, naive_dice_loss),
    "3.7": Check("segvit.query_downsample", cases_query_downsample, naive_query_downsample),
}

# ----------------------------------------------------------------------------------------------
# Planted bugs: mistakes real learners make, each must cost its exercise
# ----------------------------------------------------------------------------------------------

BUGS = {
    "3.1": [
        Bug("/ math.sqrt(dh)", "", "no 1/sqrt(dh) scale"),
        Bug("/ math.sqrt(dh)", "/ math.sqrt(d)", "scaled by the full width d"),
        Bug("return q @ k.transpose(-2, -1) / math.sqrt(dh)",
            "return q.float() @ k.transpose(-2, -1).float() / math.sqrt(dh)",
            "computed in float32 whatever the input's dtype"),
        Bug("q = queries.reshape(B, K, num_heads, dh).transpose(1, 2)",
            "q = queries.reshape(B, num_heads, K, dh)", "heads split without a transpose"),
    ],
    "3.2": [
        Bug("sim.mean(dim=1)", "sim.sum(dim=1)", "heads summed instead of averaged"),
        Bug("sim.mean(dim=1).reshape(B, K, grid[0], grid[1])",
            "sim.mean(dim=1).reshape(B, K, grid[1], grid[0]).transpose(-2, -1)",
            "grid laid out column-major"),
        Bug("sim.mean(dim=1)", "sim.softmax(dim=-1).mean(dim=1)", "softmax taken before the mean"),
    ],
    "3.3": [
        Bug(".cumsum(dim=0)", ".sum(dim=0, keepdim=True).expand(len(stage_logits), -1, -1, -1, -1)",
            "every stage gets the total"),
        Bug('mode="bilinear", align_corners=False', 'mode="bilinear", align_corners=True',
            "align_corners=True"),
        Bug("size = stage_logits[-1].shape[-2:]", "size = stage_logits[0].shape[-2:]",
            "resized to the first stage's grid"),
    ],
    "3.4": [
        Bug("class_logits.softmax(dim=-1)[..., :-1]", "class_logits[..., :-1].softmax(dim=-1)",
            "'no object' column dropped before the softmax"),
        Bug("mask_logits.sigmoid()", "mask_logits", "mask logits used without a sigmoid"),
        Bug("class_logits.softmax(dim=-1)[..., :-1]", "class_logits.softmax(dim=1)[..., :-1]",
            "softmax over the tokens instead of the classes"),
    ],
    "3.5": [
        Bug("loss.sum(-1) / valid.sum(-1).clamp(min=1)", "loss.mean(-1)",
            "mean over all pixels, ignored ones included"),
        Bug("alpha_t = alpha * targets + (1 - alpha) * (1 - targets)", "alpha_t = alpha",
            "alpha applied to negatives too"),
        Bug("(1 - p_t) ** gamma", "(1 - p_t)", "gamma ignored"),
    ],
    "3.6": [
        Bug("p = logits.sigmoid() * valid", "p = logits.sigmoid()",
            "ignored pixels counted in the prediction sums"),
        Bug("/ (p.sum(-1) + t.sum(-1) + 1)", "/ (p.sum(-1) + t.sum(-1))", "no smoothing term"),
        Bug("p = logits.sigmoid() * valid", "p = logits * valid", "logits used as probabilities"),
    ],
    "3.7": [
        Bug("[:, ::2, ::2]", "[:, 1::2, 1::2]", "odd rows and columns kept"),
        Bug("tokens.reshape(B, h, w, C)", "tokens.reshape(B, w, h, C)", "grid read as (w, h)"),
        Bug("[:, ::2, ::2].reshape(B, -1, C)", "[:, ::2, ::2].transpose(1, 2).reshape(B, -1, C)",
            "output in column-major order"),
    ],
}

# Exercises whose first bug `make grade-demo` plants in its "buggy" learner (whole nbgrader pipeline).
DEMO = ("3.2", "3.4", "3.6")
