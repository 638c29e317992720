# %% [markdown]
# # Chapter 02 — Visual Transformers: a few tokens summarise the image
#
# In chapter 01 every 8×8 patch was a token: a 224×224 image is 196 of them, and attention costs
# grow with their square. [Visual Transformers](https://arxiv.org/abs/2006.03677) (VT; Wu et al.,
# 2020) take the opposite view: an image is a handful of **semantic concepts**, so represent it by
# a handful of **visual tokens** — 8 or 16 — each a weighted average of the pixels it is about.
# Relate the tokens with a transformer (cheap: 16 tokens), then write what they learned back into
# the pixels. A **VT module** is three steps:
#
# 1. **Tokenizer** — pixels → L tokens, each token gathering the pixels of its spatial attention;
# 2. **Transformer** — the L tokens attend to each other;
# 3. **Projector** — every pixel reads the tokens back.
#
# The paper replaces the last stage of a ResNet by VT modules (**VT-ResNet**: ImageNet R18 69.9 →
# **72.0** top-1 with *fewer* FLOPs) and the convolutions of an FPN by tokens (**VT-FPN**: the same
# segmentation mIoU for **6.4×** fewer FPN FLOPs). There is no official code; the equations below
# are the paper's, and where they are ambiguous this notebook says so.
#
# | # | exercise | points |
# |---|---|---|
# | 2.1 | `filter_attention` — the filter-based tokenizer's spatial attention | 10 |
# | 2.2 | `gather_tokens` — tokens as attention-weighted averages of pixels | 10 |
# | 2.3 | `recurrent_attention` — tokens choose where the next tokens look (with the transpose) | 15 |
# | 2.4 | `token_transformer` — the transformer as the paper writes it | 20 |
# | 2.5 | `projector_attention` — every pixel queries the tokens | 15 |
# | 2.6 | `project` — the tokens written back to the pixels | 10 |
#
# **How exercises work.** Write each function's body where it says `YOUR CODE HERE` and run the
# cell: `@plug(tokens)` puts your function into the library, so the VT module, the token explorer
# and the training loop call *your* code from then on. The cell after it tests your function; the
# nbgrader **Validate** button checks the whole notebook.
#
# Shapes: `B` batch · `H, W` image pixels · `h, w` the feature map's grid · `HW = h·w` its pixels
# (row-major) · `C` channels of the map *and* of the tokens · **`L` visual tokens** (the paper's
# letter; in chapter 01 `L` counted patch tokens — here a few learned tokens replace them) ·
# `dk` the transformer's key width · `K` classes. Weights are in the paper's layout: `X W` with
# `W` of shape (in, out) — not `nn.Linear`'s (out, in).

# %%
import math
from dataclasses import replace

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor

import vitseg_lab as vl
from vitseg_lab import plug, tokens, viz
from vitseg_lab.data.shapes import COLORS, ShapeScenes

vl.setup_notebook(seed=0)
cfg = tokens.TokensConfig.for_scale(vl.scale())
teach = cfg if cfg.dataset == "shapes" else tokens.TokensConfig.quick()  # teaching size at any scale
print(f"scale: {vl.scale()} · device: {vl.device()}")

# %% [markdown]
# ## The data: ShapeScenes
#
# Procedural 64×64 scenes with 10 classes: background plus 3 colours × 3 shapes, each shape with
# its own surface texture. The bottom row is the semantic mask a VT model will learn to predict
# (white = ignore, a 1-pixel outline around every object).

# %%
scenes = ShapeScenes(6, size=teach.img_size, colors=teach.colors, shapes=teach.shapes, seed=1)
viz.scene_grid([scenes[i] for i in range(6)], scenes.num_classes)
plt.show()
image = scenes[0]["image"]

# %% [markdown]
# ## 2.1 The filter-based tokenizer: where does each token look?
#
# Flatten a feature map into $X \in \mathbb{R}^{HW\times C}$, one row per pixel. The filter-based
# tokenizer has one learned filter per token, $W_A \in \mathbb{R}^{C\times L}$; $XW_A$ scores every
# pixel for every token, and a softmax **over the pixels** turns each token's column into a
# spatial attention map:
# $$A = \mathrm{softmax}_{HW}(X W_A) \in \mathbb{R}^{HW\times L},\qquad \sum_{i=1}^{HW} A_{il} = 1 .$$
# That axis is the whole idea: a softmax over the *tokens* would ask "which token owns this
# pixel?" (a segmentation); over the *pixels* it asks "which pixels does this token read?" — and a
# token can then ignore most of the image. The features arrive batched, `(B, HW, C)`.

# %% [solution] tokens.filter_attention

# %% [test] filter_attention_test points=10
g = torch.Generator().manual_seed(0)
B, HW, C, L = 2, 15, 6, 4
x, w = torch.randn(B, HW, C, generator=g), torch.randn(C, L, generator=g)
a = vl.expect_shape(filter_attention(x, w), "B HW L", name="filter_attention(x, w)", B=B, HW=HW, L=L)
assert torch.allclose(a.sum(dim=1), torch.ones(B, L), atol=1e-5), \
    "each token's column should sum to 1 over the pixels (dim 1): softmax over HW, not over L"

# Worked example: 3 pixels with one channel, 1 token whose filter is 2: scores 0, 2, 4.
ex = filter_attention(torch.tensor([[[0.0], [1.0], [2.0]]]), torch.tensor([[2.0]]))
want = [1 / (1 + math.e**2 + math.e**4), math.e**2 / (1 + math.e**2 + math.e**4), math.e**4 / (1 + math.e**2 + math.e**4)]
assert torch.allclose(ex.flatten(), torch.tensor(want), atol=1e-5), \
    f"softmax of scores (0, 2, 4) over the 3 pixels is {[round(v, 4) for v in want]}, got {ex.flatten().tolist()}"

# A literal loop over batch, token and pixel.
naive = torch.empty(B, HW, L)
for b in range(B):
    for l in range(L):
        scores = torch.stack([x[b, i] @ w[:, l] for i in range(HW)])
        naive[b, :, l] = torch.exp(scores) / torch.exp(scores).sum()
assert torch.allclose(a, naive, atol=1e-5), "values differ from the loop: A = softmax over pixels of X W_A"
print("filter_attention: all visible tests passed")

# %% [markdown]
# Your tokenizer on a real picture, before any training. Take as "features" each 4×4 patch's mean
# colour (centred) and give four tokens the filters *grey, red, green, blue* (a colour minus
# grey, sharpened ×12). Each token's attention lands on the pixels of its colour:

# %%
def colour_features(img, patch=4):
    """(3, H, W) -> X (1, HW, 3): the mean colour of each patch, centred on grey."""
    return F.avg_pool2d(img[None], patch).flatten(2).transpose(1, 2) - 0.5

names = ["grey"] + list(teach.colors)
filters = 12 * torch.tensor([[0.0, 0.0, 0.0]] + [list(COLORS[c]) for c in teach.colors]).T  # (3, 4)
filters = filters - filters.mean(dim=0, keepdim=True)   # score colour, not brightness
X = colour_features(image)                                # (1, 256, 3)
A = filter_attention(X, filters)                          # (1, 256, 4)
fig, axes = plt.subplots(1, 5, figsize=(12, 2.6))
viz.show_image(image, axes[0], title="scene")
for l in range(4):
    viz.show_heatmap(image, A[0, :, l].reshape(16, 16), axes[l + 1], title=f"token {l} ('{names[l]}'): A[:, {l}]")
plt.show()

# %% [markdown]
# ## 2.2 Tokens are weighted averages of pixels
#
# With the attention in hand, the tokens are one matrix product,
# $$T = A^\top X \in \mathbb{R}^{L\times C},\qquad T_l = \sum_i A_{il}\, X_i ,$$
# a weighted average of the pixels, token $l$ reading pixel $i$ with weight $A_{il}$. Batched:
# `(B, HW, L)` and `(B, HW, C)` → `(B, L, C)`. Mind which axes the transpose swaps.

# %% [solution] tokens.gather_tokens

# %% [test] gather_tokens_test points=10
g = torch.Generator().manual_seed(1)
B, HW, C, L = 2, 12, 5, 3
x = torch.randn(B, HW, C, generator=g)
a = torch.randn(B, HW, L, generator=g).softmax(dim=1)
t = vl.expect_shape(gather_tokens(x, a), "B L C", name="gather_tokens(x, a)", B=B, L=L, C=C)

# Worked example: 2 pixels (values 10 and 20 in one channel); token 0 reads them 1:3, token 1 only the first.
ex = gather_tokens(torch.tensor([[[10.0], [20.0]]]), torch.tensor([[[0.25, 1.0], [0.75, 0.0]]]))
assert torch.allclose(ex.flatten(), torch.tensor([17.5, 10.0])), \
    f"token 0 = 0.25·10 + 0.75·20 = 17.5 and token 1 = 10; got {ex.flatten().tolist()}"

naive = torch.zeros(B, L, C)
for b in range(B):
    for l in range(L):
        for i in range(HW):
            naive[b, l] += a[b, i, l] * x[b, i]
assert torch.allclose(t, naive, atol=1e-5), "values differ from the loop T[l] = Σ_i A[i, l] X[i]"
print("gather_tokens: all visible tests passed")

# %% [markdown]
# The four colour tokens of the scene, through your two functions: each is the average colour of
# the pixels it attends to — a 4-number summary of 256 pixels.

# %%
T = gather_tokens(X, A)                                   # (1, 4, 3)
fig, ax = plt.subplots(figsize=(4, 1.2))
ax.imshow((T[0] + 0.5).clamp(0, 1)[None].numpy())
ax.set_xticks(range(4), [f"token {l}" for l in range(4)]); ax.set_yticks([])
plt.show()

# %% [markdown]
# ## 2.3 The recurrent tokenizer, and the transpose the paper needs
#
# A fixed set of filters looks for the same concepts in every image. From the second VT module
# on, the paper lets the **previous module's tokens** decide where to look: it turns them into
# this module's filters,
# $$W_R = T_{in} W_{T\to R} \in \mathbb{R}^{L\times C},\qquad W_{T\to R}\in\mathbb{R}^{C\times C},$$
# and then tokenizes with them. The paper prints $T = \mathrm{softmax}_{HW}(X W_R)^\top X$ — but
# $X$ is $HW\times C$ and $W_R$ is $L\times C$: the product only exists with the transpose,
# $$A = \mathrm{softmax}_{HW}(X W_R^\top) \in \mathbb{R}^{HW\times L}.$$
# (When $L = C$ the printed version *runs* and is silently wrong — the tests use $L \ne C$.) Write
# the attention; `gather_tokens` turns it into tokens as before. Batched: one $W_R$ per image.

# %% [solution] tokens.recurrent_attention

# %% [test] recurrent_attention_test points=15
g = torch.Generator().manual_seed(2)
B, HW, L, C = 2, 15, 4, 6
x, t_in, w = torch.randn(B, HW, C, generator=g), torch.randn(B, L, C, generator=g), torch.randn(C, C, generator=g)
a = vl.expect_shape(recurrent_attention(x, t_in, w), "B HW L", name="recurrent_attention(x, t_in, w)", B=B, HW=HW, L=L)
assert torch.allclose(a.sum(dim=1), torch.ones(B, L), atol=1e-5), "softmax over the pixels (dim 1)"

# Worked example: W_T→R = I makes the tokens themselves the filters (a filter tokenizer with W_A = T_inᵀ).
same = recurrent_attention(x[:1], t_in[:1], torch.eye(C))
assert torch.allclose(same, filter_attention(x[:1], t_in[0].T), atol=1e-5), \
    "with W_T→R = I, recurrent_attention(x, t, I) should equal filter_attention(x, t[0].T)"

naive = torch.empty(B, HW, L)
for b in range(B):
    w_r = t_in[b] @ w                                     # (L, C)
    for l in range(L):
        scores = torch.stack([x[b, i] @ w_r[l] for i in range(HW)])
        naive[b, :, l] = scores.softmax(0)
assert torch.allclose(a, naive, atol=1e-5), \
    "values differ from the loop: W_R = T_in W_T→R, A[i, l] = softmax over pixels of X[i] · W_R[l]"
print("recurrent_attention: all visible tests passed")

# %% [markdown]
# Run your recurrent tokenizer on the colour tokens with $W_{T\to R}$ = 40·I: each token's new
# filter is its own average colour. Start from deliberately bad filters (random), tokenize,
# and repeat — every round the tokens move toward the colours present in the scene, like the
# steps of a soft k-means. That is why the paper calls it *recurrent*.

# %%
torch.manual_seed(3)
A_r = filter_attention(X, torch.randn(3, 4) * 4)
fig, axes = plt.subplots(1, 4, figsize=(10, 2.6))
for r, ax in enumerate(axes):
    T_r = gather_tokens(X, A_r)                           # tokens of this round
    viz.show_mask(image, F.interpolate(A_r.argmax(-1).reshape(1, 1, 16, 16).float(), size=(64, 64))[0, 0].long(),
                  5, ax, title=f"round {r}: token of largest A")
    A_r = recurrent_attention(X, T_r, 40 * torch.eye(3))
plt.show()

# %% [markdown]
# ## 2.4 The transformer on the tokens
#
# With only $L$ tokens, a transformer is cheap. The paper's version is a standard one "with minor
# changes": there is **no value projection** (the tokens themselves are the values), no
# LayerNorm in the equations, and no $1/\sqrt{d_k}$:
# $$T' = T + \mathrm{softmax}\big((TK)(TQ)^\top\big)\,T,\qquad T_{out} = T' + \mathrm{ReLU}(T'F_1)\,F_2,$$
# with $K, Q\in\mathbb{R}^{C\times d_k}$ (earlier arXiv versions: $d_k = C/2$) and
# $F_1, F_2\in\mathbb{R}^{C\times C}$. The paper writes the softmax as $\mathrm{softmax}_L$, but
# both axes of the $L\times L$ matrix have length $L$; this course normalises **each row** (the
# last axis), so token $i$ adds a weighted *average* of all tokens — the standard reading.

# %% [solution] tokens.token_transformer

# %% [test] token_transformer_test points=20
g = torch.Generator().manual_seed(4)
B, L, C, dk = 2, 5, 6, 3
t = torch.randn(B, L, C, generator=g)
k, q = torch.randn(C, dk, generator=g) / C**0.5, torch.randn(C, dk, generator=g) / C**0.5
f1, f2 = torch.randn(C, C, generator=g) / C**0.5, torch.randn(C, C, generator=g) / C**0.5
out = vl.expect_shape(token_transformer(t, k, q, f1, f2), "B L C", name="token_transformer(...)", B=B, L=L, C=C)

# Worked example: one token attends to itself with weight 1, so T' = T + T; with F2 = 0, T_out = T'.
one = token_transformer(t[:, :1], k, q, f1, torch.zeros(C, C))
assert torch.allclose(one, 2 * t[:, :1], atol=1e-5), "one token: T' = T + 1·T = 2T, and F2 = 0 adds nothing"

naive = torch.empty(B, L, C)
for b in range(B):
    mixed = []
    for i in range(L):
        scores = torch.stack([(t[b, i] @ k) @ (t[b, j] @ q) for j in range(L)])
        weights = scores.softmax(0)
        mixed.append(t[b, i] + sum(weights[j] * t[b, j] for j in range(L)))
    for i in range(L):
        naive[b, i] = mixed[i] + torch.relu(mixed[i] @ f1) @ f2
assert torch.allclose(out, naive, atol=1e-5), \
    "values differ from the loop: row i of softmax((TK)(TQ)ᵀ) weights the tokens j; residuals on both steps; ReLU between F1 and F2"
print("token_transformer: all visible tests passed")

# %% [markdown]
# ## 2.5 The projector's attention: every pixel queries the tokens
#
# Many tasks need pixels back (segmentation, the next stage of a network). The projector lets each
# pixel read the tokens:
# $$P = \mathrm{softmax}_L\big((X W_Q)(T W_K)^\top\big)\in\mathbb{R}^{HW\times L},\qquad
# X_{out} = X + P\,T,$$
# with $W_Q, W_K \in\mathbb{R}^{C\times C}$. Here the softmax is over the **tokens**: each pixel's
# row sums to 1 — the mirror image of the tokenizer, whose columns summed to 1 over the pixels.
# First the attention:

# %% [solution] tokens.projector_attention

# %% [test] projector_attention_test points=15
g = torch.Generator().manual_seed(5)
B, HW, L, C = 2, 15, 4, 6
x, t = torch.randn(B, HW, C, generator=g), torch.randn(B, L, C, generator=g)
wq, wk = torch.randn(C, C, generator=g) / C**0.5, torch.randn(C, C, generator=g) / C**0.5
p = vl.expect_shape(projector_attention(x, t, wq, wk), "B HW L", name="projector_attention(...)", B=B, HW=HW, L=L)
assert torch.allclose(p.sum(dim=-1), torch.ones(B, HW), atol=1e-5), \
    "each pixel's row should sum to 1 over the tokens (dim -1), not over the pixels"

# Worked example, C = 1, W_Q = W_K = 1: a pixel of value 2 and tokens 0 and 1 -> softmax(0, 2).
ex = projector_attention(torch.tensor([[[2.0]]]), torch.tensor([[[0.0], [1.0]]]), torch.ones(1, 1), torch.ones(1, 1))
assert torch.allclose(ex.flatten(), torch.tensor([1.0, math.e**2]) / (1 + math.e**2), atol=1e-5), \
    f"scores (2·0, 2·1) = (0, 2), softmax = (0.119, 0.881); got {ex.flatten().tolist()}"

naive = torch.empty(B, HW, L)
for b in range(B):
    for i in range(HW):
        scores = torch.stack([(x[b, i] @ wq) @ (t[b, l] @ wk) for l in range(L)])
        naive[b, i] = scores.softmax(0)
assert torch.allclose(p, naive, atol=1e-5), "values differ from the loop: softmax over tokens of (X W_Q)·(T W_K)"
print("projector_attention: all visible tests passed")

# %% [markdown]
# ## 2.6 Writing the tokens back
#
# $X_{out} = X_{in} + P\,T$: a residual, so a pixel keeps what it had and adds the tokens it reads.
# (Return a new tensor: the caller still needs $X_{in}$.)

# %% [solution] tokens.project

# %% [test] project_test points=10
g = torch.Generator().manual_seed(6)
x, t = torch.randn(2, 15, 6, generator=g), torch.randn(2, 4, 6, generator=g)
p = torch.randn(2, 15, 4, generator=g).softmax(-1)
x_before = x.clone()
out = vl.expect_shape(project(x, t, p), "B HW C", name="project(x, t, p)", B=2, HW=15, C=6)
assert torch.equal(x, x_before), "project changed its input X in place; return X + P T as a new tensor"
ex = project(torch.tensor([[[1.0]]]), torch.tensor([[[10.0], [20.0]]]), torch.tensor([[[0.5, 0.5]]]))
assert ex.item() == 16.0, f"1 + 0.5·10 + 0.5·20 = 16, got {ex.item()}"
naive = x.clone()
for b in range(2):
    for i in range(15):
        for l in range(4):
            naive[b, i] += p[b, i, l] * t[b, l]
assert torch.allclose(out, naive, atol=1e-5), "values differ from the loop X[i] + Σ_l P[i, l] T[l]"
print("project: all visible tests passed")

# %% [markdown]
# ## A VT module, end to end, on your functions
#
# `tokens.VisualTransformer` (open `vitseg_lab/tokens.py`: its `forward` is a dozen lines) holds
# $W_A$ (or $W_{T\to R}$), $K, Q, F_1, F_2, W_Q, W_K$ and calls your six functions. Check a filter
# module followed by a recurrent one against the equations written out once more:

# %%
torch.manual_seed(0)
first, second = tokens.VisualTransformer(6, 4), tokens.VisualTransformer(6, 4, recurrent=True)
x = torch.randn(2, 15, 6)
with torch.no_grad():
    o1 = first(x)
    o2 = second(o1.features, o1.tokens)
    A1 = (x @ first.tokenizer).softmax(1)
    T1 = A1.transpose(1, 2) @ x
    M1 = T1 + ((T1 @ first.key) @ (T1 @ first.query).transpose(1, 2)).softmax(-1) @ T1
    T1 = M1 + torch.relu(M1 @ first.f1) @ first.f2
    X1 = x + ((x @ first.proj_query) @ (T1 @ first.proj_key).transpose(1, 2)).softmax(-1) @ T1
    A2 = (X1 @ (o1.tokens @ second.tokenizer).transpose(1, 2)).softmax(1)
for name, got, want in [("tokens", o1.tokens, T1), ("features", o1.features, X1), ("recurrent A", o2.attention, A2)]:
    assert torch.allclose(got, want, atol=1e-5), f"the VT module's {name} differ from the equations"
print(f"VT module: {tuple(x.shape)} -> tokens {tuple(o1.tokens.shape)} -> features {tuple(o1.features.shape)}; "
      "filter + recurrent modules match the equations")

# %% [markdown]
# ## The quick model and its baseline
#
# A small convolutional stem turns a 64×64 scene into a 16×16×32 feature map (a 4×4 patchify
# convolution and a 3×3 one). Then either **two VT modules of 8 tokens** (filter, then
# recurrent; your functions) or the **baseline**: a residual pair of 3×3 convolutions with
# *the same number of parameters*. A 1×1 classifier and a bilinear upsampling give the
# segmentation. What does each head cost? `torch.utils.flop_counter` counts (in multiply-adds):

# %%
vt_model = tokens.build(teach, scenes.num_classes)
conv_model = tokens.build(replace(teach, head="conv"), scenes.num_classes)
rows = tokens.quick_flops(teach)
for r in rows:
    extra = f" · parameters {r['params']:,} (conv) vs {r['params_vt']:,} (VT)" if "params" in r else ""
    print(f"{r['what']}: {1e3 * r['ours']:.2f} M (conv) vs {1e3 * r['ours_vt']:.2f} M (VT), {r['ratio']:.1f}x{extra}")

# %% [markdown]
# ## Token explorer, before training
#
# Pick a **token**: left, the pixels it gathers (its column of $A$, your tokenizer); next, every
# pixel coloured by the token that attends to it most. Pick a **pixel** (the white square): the
# bars are its row of $P$ — which tokens your projector reads back there. Module 1 is
# filter-based, module 2 recurrent. Untrained, the filters are random: the attention is diffuse
# and the prediction noise.

# %%
explorer_before = tokens.token_explorer(vt_model, scenes)
explorer_before

# %% [markdown]
# ## Training on your CPU
#
# `tokens.run(cfg)` trains the VT model with `fit()` — 200 AdamW steps of 16 scenes on one CPU
# thread — and then, **in the same run**, the conv baseline with the same data, steps and
# seed; both are scored by mIoU on 256 held-out scenes. The stated goal: **mIoU ≥ 0.80**.
# (Under nbgrader it runs 3 steps only.)

# %% tags=long-running
result = tokens.run(teach)
print(result.summary())
print(f"VT: mIoU {result.value:.3f}, pixel accuracy {result.metrics['pixel_acc']:.3f} · "
      f"conv baseline (same parameters): mIoU {result.baseline['mIoU']:.3f}, "
      f"pixel accuracy {result.baseline['pixel_acc']:.3f}")
cost = tokens.quick_flops(teach)[0]
print(f"head cost per image: VT {1e6 * cost['ours_vt']:.0f} k multiply-adds, conv {1e6 * cost['ours']:.0f} k "
      f"({cost['ratio']:.1f}x fewer for VT) · parameters {cost['params_vt']:,} vs {cost['params']:,}")
result.history.plot()
plt.show()

# %% [markdown]
# **What to expect.** In two of our runs (one thread, 200 steps, seeds 0 and 1) the VT model
# reached mIoU 0.886 and 0.852, the conv head of equal parameters 0.939 and 0.940. On ShapeScenes a
# pixel's class is mostly *local* (its colour and its shape's texture), which two 3×3
# convolutions capture directly; the VT head adds global context the task barely needs, for 2.6×
# fewer multiply-adds. The paper's claim — the same accuracy for fewer FLOPs — is measured on
# ImageNet and COCO-Stuff, where context matters (full scale below).
#
# ## Token explorer, after training
#
# Now the tokens have meanings. Step through the tokens of module 1: some gather one colour,
# some one shape's texture, some the background. In module 2 (recurrent), the tokens were chosen
# *by this image's* module-1 tokens. Move the pixel onto an object and off it: the projector
# reads different tokens back.

# %%
explorer = tokens.token_explorer(result.model, result.val)
explorer

# %% [markdown]
# ## What the paper's models cost, measured
#
# The paper's claim is efficiency. The table builds its models on PyTorch's `meta` device
# (shapes only, no memory) and counts their forward pass with `FlopCounterMode`, beside the
# paper's numbers (multiply-adds, which is what the paper's "FLOPs" are):
#
# - **ResNet-18 → VT-R18**: `layer4` of a torchvision ResNet-18 replaced by 2 VT modules of 16
#   tokens on the 14×14×256 stage-4 map (`tokens.VTResNet`);
# - **FPN → VT-FPN**: the FPN of Panoptic FPN on ResNet-50 features (1×1 laterals + a 3×3
#   convolution per level, 256 channels) against laterals + 8 tokens per level, one transformer
#   over the 32 tokens, and a projector per level (`tokens.VTFPN`), at the paper's input sizes.

# %%
tokens.print_flops_table(tokens.flops_table(teach))

# %% [markdown]
# **Reading the table honestly.** Our plain models match the paper's baselines to the digit
# (ResNet-18 1.81 G, the FPN module 55.1 G and 12.9 G), so the counter and the paper agree on
# units. Our VT side is *cheaper* than the paper's for VT-R18 (the equations at C = 256,
# L = 16 cost ~26 M multiply-adds per image where the paper's stage costs ~170 M; its modules
# must carry more than the equations show — the token width, for instance, is not given) and
# *dearer* for VT-FPN (4.1× where the paper has 6.4–6.5×): at stride 4 the projector's query
# $XW_Q$ with $W_Q\in\mathbb{R}^{256\times256}$ alone costs ~4 G on 800×1216, while the paper
# leaves ~1 G for all its VT parts after the laterals, so its projector must use a narrower query
# space than $C\times C$. The paper's headline ratios come from arXiv v1 ("stage MACs 6.9×, FPN
# 6.5×"); later versions restate them.

# %% [markdown]
# ## Full scale: VT-ResNet-18 on ImageNet
#
# With `VITSEG_SCALE=full`, `tokens.run(cfg)` trains VT-R18 (2 VT modules of 16 tokens replacing
# `layer4` of torchvision's ResNet-18) on ImageNet-1k through torchvision's `ImageNet` data set
# over the official ILSVRC2012 archives, 90 epochs of batch 256, then the plain ResNet-18 in the
# same run; the paper reports **69.9 → 72.0** top-1 (default recipe). `fit()` trains with AdamW
# (the paper: SGD, lr 0.1), so expect a different number. For 8 GPUs:
#
#     torchrun --nproc_per_node 8 -m vitseg_lab.cli train tokens --scale full
#
# VT-FPN is only measured here (FLOPs above): its data sets (LIP, COCO-Stuff-164k) have no
# loader in the course yet.

# %%
if vl.scale() == "full":
    full = tokens.run(cfg)   # returns at once, with every missing piece, when it cannot start
    if full.skipped:
        print(full.skipped)
    else:
        print(f"ImageNet top-1: VT-R18 {100 * full.value:.1f} (paper {tokens.PAPER['vt_r18_top1']}) · "
              f"ResNet-18 {100 * full.baseline['top1']:.1f} (paper {tokens.PAPER['r18_top1']})")
else:
    print(tokens.full_scale_check() or "Full scale is ready: rerun with VITSEG_SCALE=full.")

# %% [markdown]
# ## What you built
#
# A tokenizer that lets a few tokens each read the pixels they care about (softmax over pixels),
# its recurrent form whose filters come from the previous tokens (with the transpose the paper
# leaves out), a transformer over a handful of tokens instead of hundreds of patches, and a
# projector that writes them back (softmax over tokens) — a segmentation head with the
# parameters of two small convolutions and a fraction of their cost.
