"""Hidden checks for chapter 02 (Visual Transformer tokens), instructor-only.

``naive_*`` are independent formulations written as literal loops over the paper's indices (per
batch item, pixel, token, channel; softmaxes written out with exp and a max shift); ``cases_*``
build the hidden cases (other shapes than the visible tests, float64, L = C where a missing
transpose would still run, large logits, one token) from the grader's generator; ``CHECKS`` and
``BUGS`` follow ``common``'s protocol. Only torch is imported here: the grader process stays light.
"""

from __future__ import annotations

import math

import torch

from .common import Bug, Check

# ----------------------------------------------------------------------------------------------
# Naive formulations
# ----------------------------------------------------------------------------------------------

def _dot(a, b):
    """Σ_c a[c] b[c], one term at a time."""
    total = a.new_zeros(())
    for c in range(a.shape[0]):
        total = total + a[c] * b[c]
    return total


def _softmax_list(values):
    """softmax of a Python list of 0-d tensors, with the max subtracted (finite for large logits)."""
    values = [float(v.detach()) if torch.is_tensor(v) else float(v) for v in values]
    m = max(values)
    e = [math.exp(v - m) for v in values]
    z = sum(e)
    return [x / z for x in e]


def naive_filter_attention(features, weight):
    """A[b, i, l] = exp(X_i · W_A[:, l]) / Σ_j exp(X_j · W_A[:, l]) (softmax over pixels j)."""
    B, HW, _ = features.shape
    L = weight.shape[1]
    out = torch.empty(B, HW, L, dtype=features.dtype)
    for b in range(B):
        for l in range(L):
            scores = [_dot(features[b, i], weight[:, l]) for i in range(HW)]
            for i, p in enumerate(_softmax_list(scores)):
                out[b, i, l] = p
    return out


def naive_gather_tokens(features, attention):
    """T[b, l, c] = Σ_i A[b, i, l] X[b, i, c]."""
    B, HW, C = features.shape
    L = attention.shape[2]
    out = torch.zeros(B, L, C, dtype=features.dtype)
    for b in range(B):
        for l in range(L):
            for i in range(HW):
                out[b, l] += attention[b, i, l] * features[b, i]
    return out


def naive_recurrent_attention(features, tokens, weight):
    """W_R[l] = Σ_c T[l, c] W[c, :]; A[b, i, l] = softmax over pixels i of X_i · W_R[l]."""
    B, HW, C = features.shape
    L = tokens.shape[1]
    out = torch.empty(B, HW, L, dtype=features.dtype)
    for b in range(B):
        for l in range(L):
            w_r = torch.stack([_dot(tokens[b, l], weight[:, c]) for c in range(C)])
            scores = [_dot(features[b, i], w_r) for i in range(HW)]
            for i, p in enumerate(_softmax_list(scores)):
                out[b, i, l] = p
    return out


def naive_token_transformer(tokens, key_weight, query_weight, f1_weight, f2_weight):
    """Per token i: S[i, j] = (T_i K) · (T_j Q), softmax over j, T'_i = T_i + Σ_j S[i, j] T_j;
    T_out_i = T'_i + Σ_c ReLU((T'_i F1)[c]) F2[c, :]."""
    B, L, C = tokens.shape
    out = torch.empty_like(tokens)
    for b in range(B):
        t = tokens[b]
        keys = [t[i] @ key_weight for i in range(L)]
        queries = [t[j] @ query_weight for j in range(L)]
        mixed = []
        for i in range(L):
            weights = _softmax_list([_dot(keys[i], queries[j]) for j in range(L)])
            row = t[i].clone()
            for j in range(L):
                row = row + weights[j] * t[j]
            mixed.append(row)
        for i in range(L):
            hidden = torch.clamp(mixed[i] @ f1_weight, min=0)
            ffn = torch.zeros(C, dtype=tokens.dtype)
            for c in range(C):
                ffn = ffn + hidden[c] * f2_weight[c]
            out[b, i] = mixed[i] + ffn
    return out


def naive_projector_attention(features, tokens, query_weight, key_weight):
    """P[b, i, l] = softmax over tokens l of (X_i W_Q) · (T_l W_K)."""
    B, HW, _ = features.shape
    L = tokens.shape[1]
    out = torch.empty(B, HW, L, dtype=features.dtype)
    for b in range(B):
        keys = [tokens[b, l] @ key_weight for l in range(L)]
        for i in range(HW):
            q = features[b, i] @ query_weight
            for l, p in enumerate(_softmax_list([_dot(q, keys[l]) for l in range(L)])):
                out[b, i, l] = p
    return out


def naive_project(features, tokens, attention):
    """X_out[b, i] = X[b, i] + Σ_l P[b, i, l] T[b, l]."""
    B, HW, _ = features.shape
    L = tokens.shape[1]
    out = features.clone()
    for b in range(B):
        for i in range(HW):
            for l in range(L):
                out[b, i] = out[b, i] + attention[b, i, l] * tokens[b, l]
    return out


# ----------------------------------------------------------------------------------------------
# Hidden cases (values from the grader's generator, shapes fixed; a distinct size on every axis)
# ----------------------------------------------------------------------------------------------

def _randn(g, *shape, dtype=torch.float32, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def _attention(g, B, HW, L, dim, dtype=torch.float32):
    return _randn(g, B, HW, L, dtype=dtype, scale=2.0).softmax(dim=dim)


def cases_filter_attention(g):
    return [
        {"features": _randn(g, 2, 15, 6), "weight": _randn(g, 6, 4)},
        {"features": _randn(g, 3, 7, 5, dtype=torch.float64),
         "weight": _randn(g, 5, 2, dtype=torch.float64)},
        # L = C: a transposed weight still runs, and must still be wrong
        {"features": _randn(g, 1, 9, 4), "weight": _randn(g, 4, 4)},
        # large logits: the softmax must stay finite
        {"features": _randn(g, 2, 6, 3, scale=30.0), "weight": _randn(g, 3, 5, scale=3.0)},
    ]


def cases_gather_tokens(g):
    return [
        {"features": _randn(g, 2, 12, 5), "attention": _attention(g, 2, 12, 3, 1)},
        {"features": _randn(g, 3, 6, 4, dtype=torch.float64),
         "attention": _attention(g, 3, 6, 7, 1, torch.float64)},
        # an attention that does not sum to 1 (a learner's, or a projector's): no renormalising
        {"features": _randn(g, 1, 8, 2), "attention": torch.rand(1, 8, 5, generator=g) * 3},
        # L = C
        {"features": _randn(g, 2, 10, 3), "attention": _attention(g, 2, 10, 3, 1)},
    ]


def cases_recurrent_attention(g):
    return [
        {"features": _randn(g, 2, 15, 6), "tokens": _randn(g, 2, 4, 6),
         "weight": _randn(g, 6, 6)},
        {"features": _randn(g, 3, 7, 5, dtype=torch.float64),
         "tokens": _randn(g, 3, 2, 5, dtype=torch.float64),
         "weight": _randn(g, 5, 5, dtype=torch.float64)},
        # L = C: X W_R without the transpose runs here, and must still be wrong
        {"features": _randn(g, 1, 9, 4), "tokens": _randn(g, 1, 4, 4), "weight": _randn(g, 4, 4)},
        # one token; large logits
        {"features": _randn(g, 2, 6, 3, scale=10.0), "tokens": _randn(g, 2, 1, 3, scale=3.0),
         "weight": _randn(g, 3, 3, scale=2.0)},
    ]


def cases_token_transformer(g):
    def case(B, L, C, dk, dtype=torch.float32, scale=1.0):
        s = 1 / math.sqrt(C)
        return {"tokens": _randn(g, B, L, C, dtype=dtype, scale=scale),
                "key_weight": _randn(g, C, dk, dtype=dtype, scale=s),
                "query_weight": _randn(g, C, dk, dtype=dtype, scale=s),
                "f1_weight": _randn(g, C, C, dtype=dtype, scale=s),
                "f2_weight": _randn(g, C, C, dtype=dtype, scale=s)}
    return [
        case(2, 5, 6, 3),
        case(3, 4, 8, 5, torch.float64),
        case(1, 7, 4, 4),             # dk = C
        case(2, 3, 5, 2, scale=6.0),  # large logits
        case(2, 1, 3, 2),             # one token: attends to itself with weight 1
    ]


def cases_projector_attention(g):
    def case(B, HW, L, C, dtype=torch.float32, scale=1.0):
        s = 1 / math.sqrt(C)
        return {"features": _randn(g, B, HW, C, dtype=dtype, scale=scale),
                "tokens": _randn(g, B, L, C, dtype=dtype),
                "query_weight": _randn(g, C, C, dtype=dtype, scale=s),
                "key_weight": _randn(g, C, C, dtype=dtype, scale=s)}
    return [
        case(2, 15, 4, 6),
        case(3, 7, 2, 5, torch.float64),
        case(1, 5, 5, 5),             # HW = L = C: a softmax over the wrong axis still runs
        case(2, 6, 3, 4, scale=20.0),  # large logits
    ]


def cases_project(g):
    return [
        {"features": _randn(g, 2, 15, 6), "tokens": _randn(g, 2, 4, 6),
         "attention": _attention(g, 2, 15, 4, -1)},
        {"features": _randn(g, 3, 7, 5, dtype=torch.float64),
         "tokens": _randn(g, 3, 2, 5, dtype=torch.float64),
         "attention": _attention(g, 3, 7, 2, -1, torch.float64)},
        # HW = L = C
        {"features": _randn(g, 1, 4, 4), "tokens": _randn(g, 1, 4, 4),
         "attention": _attention(g, 1, 4, 4, -1)},
    ]


CHECKS = {
    "2.1": Check("tokens.filter_attention", cases_filter_attention, naive_filter_attention),
    "2.2": Check("tokens.gather_tokens", cases_gather_tokens, naive_gather_tokens),
    "2.3": Check("tokens.recurrent_attention", cases_recurrent_attention,
                 naive_recurrent_attention, square=("weight",)),
    "2.4": Check("tokens.token_transformer", cases_token_transformer, naive_token_transformer,
                 square=("f1_weight", "f2_weight")),
    "2.5": Check("tokens.projector_attention", cases_projector_attention,
                 naive_projector_attention, square=("query_weight", "key_weight")),
    "2.6": Check("tokens.project", cases_project, naive_project),
}

# ----------------------------------------------------------------------------------------------
# Planted bugs: mistakes real learners make, each must cost its exercise
# ----------------------------------------------------------------------------------------------

BUGS = {
    "2.1": [
        Bug(".softmax(dim=1)", ".softmax(dim=-1)",
            "softmax over the tokens instead of the pixels"),
        Bug("(features @ weight).softmax(dim=1)", "(features @ weight.T).softmax(dim=1)",
            "W_A used transposed (nn.Linear's layout)"),
        Bug("(features @ weight).softmax(dim=1)",
            "(features.float() @ weight.float()).softmax(dim=1)",
            "computed in float32 whatever the input's dtype"),
        Bug("(features @ weight).softmax(dim=1)",
            "(features @ weight).exp() / (features @ weight).exp().sum(dim=1, keepdim=True)",
            "softmax written with exp and no max shift (overflows on large logits)"),
    ],
    "2.2": [
        Bug("attention.transpose(1, 2) @ features",
            "(features.transpose(1, 2) @ attention).reshape(features.shape[0], "
            "attention.shape[2], features.shape[2])", "(C, L) reshaped to (L, C), not transposed"),
        Bug("attention.transpose(1, 2) @ features",
            "attention.transpose(1, 2) @ features / features.shape[1]",
            "divided by the pixel count (A already averages)"),
        Bug("return attention.transpose(1, 2) @ features",
            "attention /= attention.sum(dim=1, keepdim=True)\n"
            "    return attention.transpose(1, 2) @ features",
            "renormalises the attention in place"),
        Bug("attention.transpose(1, 2) @ features",
            "attention.transpose(1, 2).float() @ features.float()", "dtype drift to float32"),
    ],
    "2.3": [
        Bug("(features @ w_r.transpose(1, 2))", "(features @ w_r)",
            "X W_R as printed, without the transpose"),
        Bug("w_r = tokens @ weight ", "w_r = tokens @ weight.T ",
            "W_T→R applied transposed"),
        Bug(".softmax(dim=1)", ".softmax(dim=-1)", "softmax over the tokens instead of the pixels"),
        Bug("w_r = tokens @ weight ", "w_r = tokens ", "W_T→R left out (tokens used as filters)"),
    ],
    "2.4": [
        Bug("logits.softmax(dim=-1) @ tokens", "logits.softmax(dim=1) @ tokens",
            "softmax over the wrong token axis"),
        Bug("(tokens @ key_weight) @ (tokens @ query_weight).transpose(1, 2)",
            "(tokens @ query_weight) @ (tokens @ key_weight).transpose(1, 2)",
            "K and Q swapped ((T Q)(T K)ᵀ is the transpose)"),
        Bug("mixed = tokens + logits", "mixed = logits", "no residual around the attention"),
        Bug("torch.relu(mixed @ f1_weight) @ f2_weight", "torch.relu(mixed @ f1_weight @ f2_weight)",
            "ReLU after F2 instead of between F1 and F2"),
        Bug("logits.softmax(dim=-1) @ tokens", "(logits / math.sqrt(key_weight.shape[1]))"
            ".softmax(dim=-1) @ tokens", "a 1/sqrt(dk) scale the paper does not have"),
    ],
    "2.5": [
        Bug("logits.softmax(dim=-1)", "logits.softmax(dim=1)",
            "softmax over the pixels instead of the tokens"),
        Bug("(features @ query_weight) @ (tokens @ key_weight)",
            "(features @ key_weight) @ (tokens @ query_weight)", "W_Q and W_K swapped"),
        Bug("(features @ query_weight)", "(features @ query_weight.T)",
            "W_Q used transposed (nn.Linear's layout)"),
        Bug("return logits.softmax(dim=-1)", "return logits.float().softmax(dim=-1)",
            "dtype drift to float32"),
    ],
    "2.6": [
        Bug("return features + attention @ tokens",
            "features += attention @ tokens\n    return features", "residual added in place"),
        Bug("return features + attention @ tokens", "return attention @ tokens",
            "no residual (X_in left out)"),
        Bug("attention @ tokens", "attention.softmax(dim=1) @ tokens",
            "a second softmax, over the pixels"),
        Bug("return features + attention @ tokens", "return (features + attention @ tokens).float()",
            "dtype drift to float32"),
    ],
}

# Exercises whose first bug `make grade-demo` plants in its "buggy" learner (whole nbgrader pipeline).
DEMO = ("2.1", "2.3", "2.5")
