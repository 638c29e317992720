"""Hidden checks for chapter 05 (ReSTR), instructor-only.

``naive_*`` are independent formulations written from the equations with loops over the indices
(per expression, head, query, patch, pixel) and plain Python arithmetic where it matters;
``cases_*`` build the hidden cases (other shapes than the notebook's, float64, edge cases such as
all-padding rows, one word, exact thresholds, empty masks, huge logits) from the grader's
generator; ``CHECKS`` and ``BUGS`` follow ``common``'s protocol. Only torch is imported here.
"""

from __future__ import annotations

import math

import torch

from .common import Bug, Check

# ----------------------------------------------------------------------------------------------
# Naive formulations
# ----------------------------------------------------------------------------------------------


def naive_patch_labels(mask, patch_size, tau):
    """y[b, i·w + j] = 1 if (1/p²) Σ_{pixels of patch (i, j)} mask > τ, counted pixel by pixel."""
    B, H, W = mask.shape
    p = patch_size
    h, w = H // p, W // p
    out = torch.zeros(B, h * w, dtype=mask.dtype)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                inside = 0.0
                for y in range(i * p, (i + 1) * p):
                    for x in range(j * p, (j + 1) * p):
                        inside += float(mask[b, y, x])
                out[b, i * w + j] = 1.0 if inside / (p * p) > tau else 0.0
    return out


def naive_padded_attention(q, k, v, padding):
    """Per (b, head, query): a softmax over the unpadded keys only, written with math.exp; a query
    with no unpadded key gets a zero row and a zero output."""
    B, nh, N, dh = q.shape
    M, dv = k.shape[2], v.shape[3]
    out = torch.zeros(B, nh, N, dv, dtype=q.dtype)
    attn = torch.zeros(B, nh, N, M, dtype=q.dtype)
    for b in range(B):
        keep = [m for m in range(M) if not bool(padding[b, m])]
        for j in range(nh):
            for n in range(N):
                if not keep:
                    continue
                s = {m: float(torch.dot(q[b, j, n], k[b, j, m])) / math.sqrt(dh) for m in keep}
                top = max(s.values())
                e = {m: math.exp(s[m] - top) for m in keep}
                z = sum(e.values())
                for m in keep:
                    attn[b, j, n, m] = e[m] / z
                    out[b, j, n] += (e[m] / z) * v[b, j, m]
    return out, attn


def naive_patch_logits(z_v, e_s, scale):
    """logit[b, l] = scale · Σ_d z_v[b, l, d] e_s[b, d], one patch at a time."""
    B, L, D = z_v.shape
    out = torch.zeros(B, L, dtype=z_v.dtype)
    for b in range(B):
        for l in range(L):
            out[b, l] = scale * sum(float(z_v[b, l, d]) * float(e_s[b, d]) for d in range(D))
    return out


def _bilinear_x2(m):
    """(h, w) -> (2h, 2w), align_corners=False written out: half-pixel centres, edge clamp."""
    h, w = m.shape
    out = torch.empty(2 * h, 2 * w, dtype=m.dtype)
    for Y in range(2 * h):
        sy = max((Y + 0.5) / 2 - 0.5, 0.0)
        y0 = min(math.floor(sy), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for X in range(2 * w):
            sx = max((X + 0.5) / 2 - 0.5, 0.0)
            x0 = min(math.floor(sx), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[Y, X] = ((1 - fy) * ((1 - fx) * m[y0, x0] + fx * m[y0, x1])
                         + fy * ((1 - fx) * m[y1, x0] + fx * m[y1, x1]))
    return out


def naive_decoder_block(x, weight, bias):
    """Each channel map up-sampled by the bilinear formula, then out[b, y, x, o] =
    Σ_c W[o, c] up[b, y, x, c] + bias[o], one output channel at a time."""
    B, h, w, C = x.shape
    up = torch.empty(B, 2 * h, 2 * w, C, dtype=x.dtype)
    for b in range(B):
        for c in range(C):
            up[b, :, :, c] = _bilinear_x2(x[b, :, :, c])
    out = torch.empty(B, 2 * h, 2 * w, weight.shape[0], dtype=x.dtype)
    for o in range(weight.shape[0]):
        acc = torch.full((B, 2 * h, 2 * w), 0.0, dtype=x.dtype) + bias[o]
        for c in range(C):
            acc = acc + weight[o, c] * up[..., c]
        out[..., o] = acc
    return out


def _bce_mean(logits, targets):
    """mean of -[t log σ(x) + (1 - t) log(1 - σ(x))] = softplus(x) - t·x, stably, element-wise."""
    total, n = 0.0, 0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        total += max(x, 0.0) + math.log1p(math.exp(-abs(x))) - t * x
        n += 1
    return total / n


def naive_restr_loss(patch_logits, patch_targets, mask_logits, mask_targets, lam):
    """λ · mean BCE over patches + mean BCE over pixels, as a 0-d tensor."""
    value = lam * _bce_mean(patch_logits, patch_targets) + _bce_mean(mask_logits, mask_targets)
    return torch.tensor(value, dtype=patch_logits.dtype)


def naive_referring_metrics(logits, target):
    """Counts per expression in Python ints (pixel by pixel), then the three definitions."""
    inters, unions, ious = [], [], []
    for lg, t in zip(logits, target):
        i = u = 0
        for x, y in zip(lg.flatten().tolist(), t.flatten().tolist()):
            p = x > 0
            i += int(p and y)
            u += int(p or y)
        inters.append(i)
        unions.append(u)
        ious.append(i / u if u > 0 else 1.0)
    out = {"oIoU": sum(inters) / sum(unions) if sum(unions) > 0 else 1.0,
           "mIoU": sum(ious) / len(ious)}
    for x in (0.5, 0.6, 0.7, 0.8, 0.9):
        out[f"prec@{x}"] = sum(1 for v in ious if v > x) / len(ious)
    return out


# ----------------------------------------------------------------------------------------------
# Hidden cases (values from the grader's generator, shapes fixed; a distinct size on every axis)
# ----------------------------------------------------------------------------------------------

def _binary(g, *shape, p=0.5, dtype=torch.float32):
    return (torch.rand(*shape, generator=g) < p).to(dtype)


def cases_patch_labels(g):
    # an exact-threshold case: p = 2, so fractions are multiples of 1/4 and τ = 0.75 is hit
    exact = _binary(g, 2, 4, 6, p=0.7, dtype=torch.float64)
    exact[0, :2, :2] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])     # patch (0, 0): h = 0.75
    return [
        {"mask": _binary(g, 3, 12, 20, p=0.8), "patch_size": 4, "tau": 0.8},      # h != w
        {"mask": exact, "patch_size": 2, "tau": 0.75},
        {"mask": _binary(g, 1, 15, 10, p=0.6, dtype=torch.float64), "patch_size": 5,
         "tau": 0.5},
        {"mask": torch.zeros(2, 8, 8), "patch_size": 8, "tau": 0.8},              # empty mask
    ]


def _attn_case(g, B, nh, N, M, dh, dv, dtype=torch.float32, scale=1.0):
    return {"q": torch.randn(B, nh, N, dh, generator=g, dtype=dtype) * scale,
            "k": torch.randn(B, nh, M, dh, generator=g, dtype=dtype),
            "v": torch.randn(B, nh, M, dv, generator=g, dtype=dtype),
            "padding": torch.rand(B, M, generator=g) < 0.4}


def cases_padded_attention(g):
    c1 = _attn_case(g, 2, 3, 4, 7, 5, 6)                  # a distinct size on every axis
    c1["padding"][0] = torch.tensor([False, False, True, False, True, True, True])
    c1["padding"][1] = True                                # every key padded: zero rows
    c2 = _attn_case(g, 3, 2, 5, 5, 4, 3, dtype=torch.float64)
    c2["padding"][:, 0] = False                            # self-attention shape, some padding
    c2["padding"][2, 3:] = True
    c3 = _attn_case(g, 2, 1, 3, 1, 8, 2)                   # one word
    c3["padding"][:] = False
    c4 = _attn_case(g, 1, 2, 6, 9, 4, 5, scale=30.0)       # huge scores: the softmax must hold
    c4["padding"][0, :4] = True
    return [c1, c2, c3, c4]


def cases_patch_logits(g):
    return [
        {"z_v": torch.randn(3, 7, 5, generator=g), "e_s": torch.randn(3, 5, generator=g),
         "scale": 1 / math.sqrt(5)},
        {"z_v": torch.randn(2, 4, 9, generator=g, dtype=torch.float64),
         "e_s": torch.randn(2, 9, generator=g, dtype=torch.float64), "scale": 1.0},
        {"z_v": torch.randn(4, 1, 6, generator=g), "e_s": torch.randn(4, 6, generator=g),
         "scale": 0.25},
    ]


def cases_decoder_block(g):
    return [
        {"x": torch.randn(2, 3, 4, 6, generator=g), "weight": torch.randn(3, 6, generator=g),
         "bias": torch.randn(3, generator=g)},
        {"x": torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64),
         "weight": torch.randn(2, 4, generator=g, dtype=torch.float64),
         "bias": torch.randn(2, generator=g, dtype=torch.float64)},
        {"x": torch.randn(3, 1, 1, 8, generator=g), "weight": torch.randn(5, 8, generator=g),
         "bias": torch.zeros(5)},                           # one patch: constant up-sampling
    ]


def cases_restr_loss(g):
    return [
        {"patch_logits": torch.randn(3, 12, generator=g) * 2, "patch_targets": _binary(g, 3, 12),
         "mask_logits": torch.randn(3, 8, 9, generator=g) * 2,
         "mask_targets": _binary(g, 3, 8, 9), "lam": 0.1},
        {"patch_logits": torch.randn(2, 6, generator=g, dtype=torch.float64),
         "patch_targets": _binary(g, 2, 6, dtype=torch.float64),
         "mask_logits": torch.randn(2, 4, 5, generator=g, dtype=torch.float64),
         "mask_targets": _binary(g, 2, 4, 5, dtype=torch.float64), "lam": 0.7},
        # huge logits: the loss must stay exact (take logits, never log(sigmoid(x)))
        {"patch_logits": torch.randn(2, 5, generator=g) * 60, "patch_targets": _binary(g, 2, 5),
         "mask_logits": torch.randn(2, 3, 7, generator=g) * 60,
         "mask_targets": _binary(g, 2, 3, 7), "lam": 0.1},
    ]


def _logits(g, on, dtype=torch.float32):
    """Logits that are > 0 exactly on ``on``, with random magnitudes in (0.1, 3)."""
    mag = torch.rand(on.shape, generator=g, dtype=dtype) * 2.9 + 0.1
    return torch.where(on, mag, -mag)


def cases_referring_metrics(g):
    pred = torch.rand(5, 6, 7, generator=g) < 0.5
    target = torch.rand(5, 6, 7, generator=g) < 0.5
    # logits in (0, 0.5] count as predicted: a probability > 0.5, not a logit > 0.5
    small = torch.rand(5, 6, 7, generator=g) * 0.5 + 1e-3
    c0 = {"logits": torch.where(pred, small, -small), "target": target}
    # exact thresholds: IoU 1/2 and 3/5 exactly ("> X", not ">= X")
    p2, t2 = torch.zeros(4, 3, 5, dtype=torch.bool), torch.zeros(4, 3, 5, dtype=torch.bool)
    p2[0, 0, :2] = True
    t2[0, 0, :1] = True                                     # IoU 1/2
    p2[1, 1, :5] = True
    t2[1, 1, :3] = True                                     # IoU 3/5
    p2[2] = True
    t2[2, :, :1] = True                                     # a small object in a big prediction
    # item 3: nothing predicted, nothing to find (IoU 1)
    c1 = {"logits": _logits(g, p2, torch.float64), "target": t2}
    # objects of different sizes: oIoU and mIoU differ
    p3 = torch.rand(3, 8, 4, generator=g) < 0.3
    t3 = torch.zeros(3, 8, 4, dtype=torch.bool)
    t3[0] = True
    t3[1, :2, :2] = True
    t3[2, 0, 0] = True
    return [c0, c1, {"logits": _logits(g, p3), "target": t3}]


CHECKS = {
    "5.1": Check("restr.patch_labels", cases_patch_labels, naive_patch_labels),
    "5.2": Check("restr.padded_attention", cases_padded_attention, naive_padded_attention),
    "5.3": Check("restr.patch_logits", cases_patch_logits, naive_patch_logits),
    "5.4": Check("restr.decoder_block", cases_decoder_block, naive_decoder_block),
    "5.5": Check("restr.restr_loss", cases_restr_loss, naive_restr_loss),
    "5.6": Check("restr.referring_metrics", cases_referring_metrics, naive_referring_metrics),
}

# ----------------------------------------------------------------------------------------------
# Planted bugs: mistakes real learners make, each must cost its exercise
# ----------------------------------------------------------------------------------------------

BUGS = {
    "5.1": [
        Bug("(frac > tau)", "(frac >= tau)", "h(p) >= τ instead of > τ"),
        Bug(".mean(dim=(2, 4))", ".amax(dim=(2, 4))", "any pixel of the object labels the patch"),
        Bug("mask.reshape(B, H // p, p, W // p, p)", "mask.reshape(B, W // p, p, H // p, p)",
            "grid read as (w, h)"),
        Bug(".to(mask.dtype)", ".float()", "labels always float32 (dtype drift)"),
        Bug("(frac > tau)", "(frac > 0.5)", "majority vote instead of τ"),
    ],
    "5.2": [
        Bug('scores = scores.masked_fill(pad, float("-inf"))', "scores = scores",
            "padding mask ignored"),
        Bug('masked_fill(pad, float("-inf"))', 'masked_fill(~pad, float("-inf"))',
            "padding mask inverted"),
        Bug('masked_fill(pad, float("-inf"))', "masked_fill(pad, 0.0)",
            "padded scores set to 0 instead of -inf"),
        Bug(" / math.sqrt(q.shape[-1])", "", "no 1/sqrt(dh) scale"),
        Bug("scores.softmax(dim=-1)", "scores.softmax(dim=-2)", "softmax over the queries"),
        Bug(".nan_to_num(0.0)", "", "all-padding rows left as NaN"),
    ],
    "5.3": [
        Bug(") * scale", ")", "scale ignored"),
        Bug(") * scale", ") / scale", "divided by the scale"),
        Bug('"bld,bd->bl"', '"bld,cd->bl"', "every batch item's classifier summed"),
        Bug("z_v, e_s) * scale", "z_v, e_s).sigmoid() * scale",
            "returned probabilities, not logits"),
        Bug('"bld,bd->bl", z_v, e_s) * scale', '"bld,bd->bl", z_v.mul_(scale), e_s)',
            "scaled the input in place"),
    ],
    "5.4": [
        Bug('mode="bilinear", align_corners=False', 'mode="nearest"', "nearest up-sampling"),
        Bug("align_corners=False)", "align_corners=True)", "align_corners=True"),
        Bug("x.permute(0, 3, 1, 2)", "x.permute(0, 3, 2, 1)", "grid transposed"),
        Bug("@ weight.T + bias", "@ weight + bias", "weight not transposed"),
        Bug("@ weight.T + bias", "@ weight.T", "bias dropped"),
    ],
    "5.5": [
        Bug("lam * patch + pixel", "patch + lam * pixel", "λ on the mask term"),
        Bug("lam * patch + pixel", "patch + pixel", "λ ignored"),
        Bug("F.binary_cross_entropy_with_logits(patch_logits, patch_targets)",
            "F.binary_cross_entropy(patch_logits.sigmoid(), patch_targets)",
            "BCE on sigmoid probabilities (breaks for large logits)"),
        Bug("F.binary_cross_entropy_with_logits(mask_logits, mask_targets)",
            "F.binary_cross_entropy_with_logits(mask_logits, mask_targets, reduction='sum')",
            "summed instead of averaged over pixels"),
    ],
    "5.6": [
        Bug("pred = logits > 0", "pred = logits > 0.5", "logits thresholded as probabilities"),
        Bug("float(inter.sum() / total)", "float(iou.mean())", "oIoU computed as mIoU"),
        Bug("(iou > x)", "(iou >= x)", "prec@X with >= X"),
        Bug("torch.ones_like(union)", "torch.zeros_like(union)",
            "an empty prediction of an empty target scored 0"),
        Bug('"mIoU": float(iou.mean())', '"mIoU": float(inter.mean() / union.mean())',
            "mIoU from mean counts"),
    ],
}

# Exercises whose first bug `make grade-demo` plants in its "buggy" learner (whole nbgrader pipeline).
DEMO = ("5.2", "5.3", "5.5")
