"""Hidden checks and naive formulations for chapter 01 (instructor-only).

The naive functions are written independently of ``vitseg_lab.attention``: loops over patches,
heads and layers, the equations taken literally. Unit tests compare the library's reference
against them; at grading time the verdict compares the learner's recorded outputs with them, in the
grading process (``common.verdict``).
"""

from __future__ import annotations

import math

import torch

from .common import Bug, Check

# ---------------------------------------------------------------- naive formulations


def naive_patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    B, _c, H, W = images.shape
    p = patch_size
    rows = []
    for b in range(B):
        patches = []
        for i in range(H // p):
            for j in range(W // p):
                patches.append(images[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1))
        rows.append(torch.stack(patches))
    return torch.stack(rows)


def naive_embed_tokens(patches, weight, bias, cls_token, pos_embed):
    B, L, _ = patches.shape
    out = torch.empty(B, L + 1, weight.shape[0], dtype=patches.dtype)
    for b in range(B):
        out[b, 0] = cls_token[0, 0] + pos_embed[0, 0]
        for t in range(L):
            out[b, t + 1] = weight @ patches[b, t] + bias + pos_embed[0, t + 1]
    return out


def naive_resize_pos_embed(pos_embed, old_grid, new_grid):
    # timm's own resampler is an independent implementation of the same operation.
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=1)


def naive_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    x = logits.double().movedim(dim, -1)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for r in range(flat.shape[0]):
        row = flat[r]
        if torch.isinf(row).all() and (row < 0).all():
            continue
        m = max(row.tolist())
        e = [math.exp(v - m) for v in row.tolist()]
        s = sum(e)
        out[r] = torch.tensor([v / s for v in e], dtype=torch.float64)
    return out.reshape(x.shape).movedim(-1, dim).to(logits.dtype)


def naive_multi_head_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads):
    B, N, C = x.shape
    d = C // num_heads
    qkv = x @ qkv_weight.T + qkv_bias
    q_all, k_all, v_all = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    attn = torch.empty(B, num_heads, N, N, dtype=x.dtype)
    merged = torch.empty(B, N, C, dtype=x.dtype)
    for b in range(B):
        for h in range(num_heads):
            q = q_all[b, :, h * d:(h + 1) * d]
            k = k_all[b, :, h * d:(h + 1) * d]
            v = v_all[b, :, h * d:(h + 1) * d]
            for i in range(N):
                scores = torch.stack([q[i] @ k[j] / math.sqrt(d) for j in range(N)])
                a = naive_softmax(scores)
                attn[b, h, i] = a
                merged[b, i, h * d:(h + 1) * d] = (a[:, None] * v).sum(0)
    return merged @ proj_weight.T + proj_bias, attn


def naive_attention_rollout(attns, residual: float = 0.5):
    B, _, N, _ = attns[0].shape
    out = torch.empty(B, N - 1, dtype=attns[0].dtype)
    for b in range(B):
        R = torch.eye(N, dtype=torch.float64)
        for a in attns:
            m = a[b].double().mean(0)
            m = residual * torch.eye(N, dtype=torch.float64) + (1 - residual) * m
            m = m / m.sum(1, keepdim=True)
            R = m @ R
        out[b] = R[0, 1:].to(out.dtype)
    return out


# ---------------------------------------------------------------- hidden cases
# Every case builder takes the grader's generator: values change per submission, shapes do not.
# At least one case per exercise has a distinct size on every axis (B != H != W ...).


def cases_patchify(g):
    cases = [{"images": torch.randn(B, 3, H, W, generator=g), "patch_size": p}
             for B, H, W, p in [(2, 8, 12, 4), (3, 6, 6, 3), (1, 16, 8, 8), (1, 5, 5, 5)]]
    cases.append({"images": torch.randn(2, 3, 8, 4, generator=g).double(), "patch_size": 2})
    return cases


def cases_embed_tokens(g):
    cases = []
    for B, L, D, C in [(2, 3, 5, 7), (3, 6, 12, 7), (2, 1, 2, 3)]:
        cases.append({"patches": torch.randn(B, L, D, generator=g),
                          "weight": torch.randn(C, D, generator=g), "bias": torch.randn(C, generator=g),
                          "cls_token": torch.randn(1, 1, C, generator=g),
                          "pos_embed": torch.randn(1, L + 1, C, generator=g)})
    return cases


def cases_resize_pos_embed(g):
    return [{"pos_embed": torch.randn(1, 1 + old[0] * old[1], C, generator=g),
                 "old_grid": old, "new_grid": new}
            for old, new, C in [((4, 5), (6, 3), 7), ((3, 5), (3, 5), 2), ((6, 6), (2, 4), 3),
                                ((2, 3), (7, 5), 4)]]


def cases_softmax(g):
    return [
        {"logits": torch.randn(4, 7, generator=g), "dim": -1},
        {"logits": torch.randn(3, 5, 2, generator=g), "dim": 1},
        {"logits": torch.randn(2, 6, generator=g) * 50 + 1000.0, "dim": -1},   # overflow bait
        {"logits": torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf")] * 3]), "dim": -1},
        {"logits": torch.randn(5, generator=g).double(), "dim": 0},
        {"logits": torch.randn(2, 3, 4, generator=g), "dim": 0},
    ]


def cases_multi_head_attention(g):
    cases = []
    for B, N, C, nh in [(2, 3, 4, 2), (2, 5, 6, 3), (1, 4, 8, 1), (3, 5, 8, 4)]:
        cases.append({"x": torch.randn(B, N, C, generator=g),
                          "qkv_weight": torch.randn(3 * C, C, generator=g) / C ** 0.5,
                          "qkv_bias": torch.randn(3 * C, generator=g),
                          "proj_weight": torch.randn(C, C, generator=g) / C ** 0.5,
                          "proj_bias": torch.randn(C, generator=g), "num_heads": nh})
    return cases


def cases_attention_rollout(g):
    cases = []
    for B, nh, N, layers in [(2, 3, 5, 4), (2, 3, 4, 1), (1, 1, 7, 4)]:
        cases.append({"attns": [torch.randn(B, nh, N, N, generator=g).softmax(-1)
                                 for _ in range(layers)]})
    cases.append({"attns": [a.clone() for a in cases[0]["attns"]], "residual": 0.0})
    return cases


CHECKS = {
    "1.1": Check("attention.patchify", cases_patchify, naive_patchify, atol=0, rtol=0),
    "1.2": Check("attention.embed_tokens", cases_embed_tokens, naive_embed_tokens),
    "1.3": Check("attention.resize_pos_embed", cases_resize_pos_embed, naive_resize_pos_embed),
    "1.4": Check("attention.softmax", cases_softmax, naive_softmax, atol=1e-6),
    # graded on its own: the learner's softmax (exercise 1.4) is replaced by torch's during the check
    "1.5": Check("attention.multi_head_attention", cases_multi_head_attention,
                 naive_multi_head_attention, substitutes={"softmax": "torch.softmax"},
                 square=("proj_weight",)),
    "1.6": Check("attention.attention_rollout", cases_attention_rollout, naive_attention_rollout,
                 square=("attns",)),
}

# ---------------------------------------------------------------- planted bugs (real mistakes)

BUGS = {
    "1.1": [
        Bug("x.permute(0, 2, 4, 1, 3, 5)", "x.permute(0, 2, 4, 3, 5, 1)",
            "patch flattened (row, column, channel) instead of (channel, row, column)"),
        Bug("x.permute(0, 2, 4, 1, 3, 5)", "x.permute(0, 4, 2, 1, 3, 5)",
            "patches taken column by column"),
        Bug("x = images.reshape(B, c, H // p, p, W // p, p)",
            "x = images.reshape(B, c, W // p, p, H // p, p)", "H and W swapped (square images only)"),
    ],
    "1.2": [
        Bug("x = patches @ weight.T + bias", "x = patches @ weight.T",
            "bias forgotten"),
        Bug("return torch.cat([cls, x], dim=1) + pos_embed",
            "return torch.cat([x, cls], dim=1) + pos_embed", "CLS token appended at the end"),
        Bug("return torch.cat([cls, x], dim=1) + pos_embed",
            "return torch.cat([cls, x + pos_embed[:, 1:]], dim=1)",
            "no position embedding on the CLS token"),
    ],
    "1.3": [
        Bug("grid.reshape(1, h, w, C)", "grid.reshape(1, w, h, C)",
            "position grid reshaped (w, h) instead of (h, w)"),
        Bug('mode="bicubic"', 'mode="bilinear"', "bilinear instead of bicubic"),
        Bug("return torch.cat([cls, grid], dim=1)", "return grid", "CLS entry dropped"),
    ],
    "1.4": [
        Bug("e = torch.exp(logits - m)", "e = torch.exp(logits)",
            "no max subtraction: overflows on large logits"),
        Bug("m = logits.amax(dim=dim, keepdim=True)", "m = logits.amax(dim=-1, keepdim=True)",
            "maximum taken over the last axis whatever dim says"),
        Bug("s = e.sum(dim=dim, keepdim=True)", "s = e.sum(dim=-1, keepdim=True)",
            "normalised over the last axis whatever dim says"),
        Bug("m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))", "pass",
            "fully masked rows give NaN"),
        Bug("e = torch.exp(logits - m)", "logits -= m\n    e = torch.exp(logits)",
            "the maximum subtracted in place: the caller's logits change"),
    ],
    "1.5": [
        Bug("/ math.sqrt(d)", "", "no 1/sqrt(d) scale"),
        Bug("qkv.reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4)",
            "qkv.reshape(B, N, num_heads, 3, d).permute(3, 0, 2, 1, 4)",
            "qkv split head-first instead of [q | k | v]"),
        Bug("softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)",
            "softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-2)",
            "softmax over the query axis"),
        Bug("(attn @ v).transpose(1, 2).reshape(B, N, C)", "(attn @ v).reshape(B, N, C)",
            "heads merged without moving the head axis back"),
    ],
    "1.6": [
        Bug("else a @ rollout", "else rollout @ a", "layers multiplied in the wrong order"),
        Bug("a = residual * eye + (1 - residual) * a.mean(dim=1)", "a = a.mean(dim=1)",
            "residual connection left out"),
        Bug("return rollout[:, 0, 1:]", "return rollout[:, 1:, 0]", "CLS column instead of its row"),
    ],
}

# Exercises whose first bug `make grade-demo` plants in its "buggy" learner (whole nbgrader pipeline).
DEMO = ("1.3", "1.4", "1.6")
