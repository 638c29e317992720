"""Hidden checks and naive formulations for chapter 01 (instructor-only).

The naive functions are written independently of ``vitseg_lab.attention``: loops over patches,
heads and layers, the equations taken literally. Unit tests compare the library's reference
against them; the hidden checks compare the learner's functions against them in a fresh process.
"""

from __future__ import annotations

import math

import torch

from .common import compare

# ---------------------------------------------------------------- naive formulations


def naive_patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    B, c, H, W = images.shape
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


def naive_mha_out(**kw):
    return naive_multi_head_attention(**kw)[0]


def naive_mha_attn(**kw):
    return naive_multi_head_attention(**kw)[1]


# ---------------------------------------------------------------- hidden cases


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + seed)


def check_patchify(fn) -> None:
    cases = []
    for s, (B, H, W, p) in enumerate([(1, 8, 12, 4), (3, 6, 6, 3), (2, 16, 8, 8), (1, 5, 5, 5)]):
        cases.append(dict(images=torch.randn(B, 3, H, W, generator=_g(s)), patch_size=p))
    cases.append(dict(images=torch.randn(2, 3, 8, 4, generator=_g(9)).double(), patch_size=2))
    compare(fn, "vitseg_lab._grader.ch01:naive_patchify", cases, what="patchify", atol=0, rtol=0)


def check_embed_tokens(fn) -> None:
    cases = []
    for s, (B, L, D, C) in enumerate([(1, 3, 5, 4), (3, 6, 12, 7), (2, 1, 2, 3)]):
        g = _g(s)
        cases.append(dict(patches=torch.randn(B, L, D, generator=g),
                          weight=torch.randn(C, D, generator=g), bias=torch.randn(C, generator=g),
                          cls_token=torch.randn(1, 1, C, generator=g),
                          pos_embed=torch.randn(1, L + 1, C, generator=g)))
    compare(fn, "vitseg_lab._grader.ch01:naive_embed_tokens", cases, what="embed_tokens")


def check_resize_pos_embed(fn) -> None:
    cases = []
    for s, (old, new, C) in enumerate([((4, 4), (6, 3), 5), ((3, 5), (3, 5), 2),
                                       ((6, 6), (2, 4), 3), ((2, 3), (7, 5), 4)]):
        cases.append(dict(pos_embed=torch.randn(1, 1 + old[0] * old[1], C, generator=_g(s)),
                          old_grid=old, new_grid=new))
    compare(fn, "vitseg_lab._grader.ch01:naive_resize_pos_embed", cases, what="resize_pos_embed",
            atol=1e-5)


def check_softmax(fn) -> None:
    cases = [
        dict(logits=torch.randn(4, 7, generator=_g(1)), dim=-1),
        dict(logits=torch.randn(3, 5, 2, generator=_g(2)), dim=1),
        dict(logits=torch.randn(2, 6, generator=_g(3)) * 50 + 1000.0, dim=-1),   # overflow bait
        dict(logits=torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf")] * 3]), dim=-1),
        dict(logits=torch.randn(5, generator=_g(4)).double(), dim=0),
    ]
    compare(fn, "vitseg_lab._grader.ch01:naive_softmax", cases, what="softmax", atol=1e-6)


def _mha_cases():
    cases = []
    for s, (B, N, C, nh) in enumerate([(1, 3, 4, 2), (2, 5, 6, 3), (1, 4, 8, 1)]):
        g = _g(s)
        cases.append(dict(x=torch.randn(B, N, C, generator=g),
                          qkv_weight=torch.randn(3 * C, C, generator=g) / C ** 0.5,
                          qkv_bias=torch.randn(3 * C, generator=g),
                          proj_weight=torch.randn(C, C, generator=g) / C ** 0.5,
                          proj_bias=torch.randn(C, generator=g), num_heads=nh))
    return cases


def check_multi_head_attention(fn) -> None:
    # Graded on its own: the learner's softmax is swapped for the naive one during this check,
    # so a mistake in exercise 1.4 does not cost points here too.
    glb = getattr(getattr(fn, "__vitseg_learner_fn__", fn), "__globals__", {})
    saved = glb.get("softmax")
    glb["softmax"] = naive_softmax
    try:
        cases = _mha_cases()
        compare(lambda **kw: fn(**kw)[0], "vitseg_lab._grader.ch01:naive_mha_out", cases,
                what="multi_head_attention (output)", atol=1e-5, learner=fn)
        compare(lambda **kw: fn(**kw)[1], "vitseg_lab._grader.ch01:naive_mha_attn", cases,
                what="multi_head_attention (attention map)", atol=1e-5, learner=fn)
    finally:
        if saved is not None:
            glb["softmax"] = saved


def check_attention_rollout(fn) -> None:
    cases = []
    for s, (B, nh, N, layers) in enumerate([(1, 2, 5, 3), (2, 3, 4, 1), (1, 1, 7, 4)]):
        g = _g(s)
        attns = [torch.randn(B, nh, N, N, generator=g).softmax(-1) for _ in range(layers)]
        cases.append(dict(attns=attns))
    cases.append(dict(attns=cases[0]["attns"], residual=0.0))
    compare(fn, "vitseg_lab._grader.ch01:naive_attention_rollout", cases, what="attention_rollout",
            atol=1e-5)
