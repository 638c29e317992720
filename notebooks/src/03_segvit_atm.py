# %% [markdown]
# # Chapter 03 — SegViT: attention is the mask
#
# [SegViT](https://arxiv.org/abs/2210.05844) (Zhang et al., NeurIPS 2022) segments images with a
# *plain* ViT and a small decoder, the **attention-to-mask (ATM)** module, built on one
# observation: when a learnable **class token** cross-attends to the image's tokens, the
# similarity scores it computes *already say where its class is*. The same numbers that, after a
# softmax, decide what the token reads are, after a sigmoid, the class's mask. No pixel decoder,
# no mask head: the attention logits **are** the masks.
#
# | # | exercise | points |
# |---|---|---|
# | 3.1 | `atm_similarity` — class tokens vs layer tokens, per head | 15 |
# | 3.2 | `atm_mask_logits` — the mask: pre-softmax, averaged over heads | 10 |
# | 3.3 | `cascade_masks` — stages deepest-first, mask logits accumulate | 15 |
# | 3.4 | `semantic_scores` — class probabilities × masks at inference | 15 |
# | 3.5 | `sigmoid_focal_loss` — the mask loss for rare positives | 15 |
# | 3.6 | `dice_loss` — the overlap loss | 10 |
# | 3.7 | `query_downsample` — the Shrunk structure's queries | 10 |
#
# **How exercises work.** Write each function's body where it says `YOUR CODE HERE` and run the
# cell: `@plug(segvit)` (or `@plug(losses)`) puts your function into the library, so the SegViT
# model, the loss, the mask explorer and the training loop call *your* code from then on. The cell
# after it tests your function; the nbgrader **Validate** button checks the whole notebook.
#
# Shapes: `B` batch · `K` classes = class tokens · `L = h·w` patch tokens · `C` ViT width ·
# `d` decoder width · `nh` heads · `h, w` patch grid · `H, W` pixels · `S` cascade stages.
#
# ## The method in one picture
#
# 1. A ViT (here trained from scratch; at full scale an ImageNet-21k ViT-B/16) turns the image into
#    $L$ patch tokens, layer after layer. SegViT reads a few layers: blocks 6, 8, 12 of ViT-B.
# 2. **Layer tokens**: each chosen layer $F_l \in \mathbb{R}^{L\times C}$ goes through
#    `Linear(C → d)` and `LayerNorm`.
# 3. **Class tokens**: $K$ learned vectors $q \in \mathbb{R}^{K \times d}$, token $k$ bound to
#    class $k$ — no Hungarian matching as in DETR or MaskFormer.
# 4. A **decoder layer**: self-attention among the class tokens → cross-attention to the layer
#    tokens (the ATM) → FFN, each with a residual and a LayerNorm. In the cross-attention, per head,
#    $$S = \frac{(qW_q)(FW_k)^\top}{\sqrt{d_h}} \in \mathbb{R}^{K\times L},\qquad
#    q \leftarrow q + \mathrm{softmax}_L(S)\,(FW_v),\qquad
#    \text{mask} = \sigma\big(\tfrac{1}{n_h}\textstyle\sum_{\text{heads}} S\big).$$
# 5. A **cascade**: the layers are decoded deepest first; the class tokens flow from stage to
#    stage and the mask logits add up.
# 6. A class head `Linear(d → K+1)` says, per token, which class it is — or **"no object"** (index
#    $K$) when its class is absent. At inference
#    $\mathrm{seg}[c, y, x] = \sum_k \mathrm{softmax}(\text{cls}_k)[c]\cdot\sigma(\text{mask}_k[y,x])$,
#    then an argmax over $c$.

# %%
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor

import vitseg_lab as vl
from vitseg_lab import flops, losses, plug, segvit, shrunk, viz, widgets
from vitseg_lab.data.shapes import COLORS, ShapeScenes

vl.setup_notebook(seed=0)
cfg = segvit.SegViTConfig.for_scale(vl.scale())   # the training run's scale
teach = segvit.SegViTConfig.quick()               # teaching cells: this size at any scale
print(f"scale: {vl.scale()} · device: {vl.device()}")

# %% [markdown]
# ## The data: ShapeScenes, semantic masks
#
# At quick scale the course runs on **ShapeScenes**: procedural 64×64 scenes with 10 classes,
# background plus 3 colours × 3 shapes. The bottom row is the semantic mask SegViT learns; white
# pixels are **ignore** (label 255), a 1-pixel outline around every object where the label is
# uncertain, the convention of PASCAL VOC.

# %%
scenes = ShapeScenes(6, size=teach.img_size, colors=teach.colors, shapes=teach.shapes,
                     min_objects=teach.min_objects, max_objects=teach.max_objects, seed=1)
viz.scene_grid([scenes[i] for i in range(6)], scenes.num_classes)
plt.show()
print("classes:", ", ".join(f"{k} {n}" for k, n in enumerate(scenes.class_names)))

# %% [markdown]
# ## 3.1 Similarity between class tokens and layer tokens
#
# The ATM's cross-attention is standard multi-head attention with the class tokens as queries.
# Given the projected class tokens $Q = qW_q \in \mathbb{R}^{B\times K\times d}$ and the projected
# layer tokens $K = FW_k \in \mathbb{R}^{B\times L\times d}$, split the $d$ channels into $n_h$ heads
# of width $d_h = d/n_h$ (head $j$ owns channels $j d_h \dots (j+1)d_h - 1$) and compute, per head,
# $S = QK^\top/\sqrt{d_h}$: **one score per (head, class token, patch token)**, before any softmax.
#
# *Hint:* `reshape` to `(B, K, nh, dh)`, `transpose` the head axis forward, one `@`.

# %% [solution] segvit.atm_similarity

# %% [test] atm_similarity_test points=15
g = torch.Generator().manual_seed(0)
B, K, L, d, nh = 2, 3, 5, 12, 4
q, k = torch.randn(B, K, d, generator=g), torch.randn(B, L, d, generator=g)
sim = vl.expect_shape(atm_similarity(q, k, nh), "B nh K L", name="atm_similarity(q, k, 4)",
                      B=B, nh=nh, K=K, L=L)

# Worked example, one class token and one patch token, d = 4.
qe, ke = torch.tensor([[[1.0, 0.0, 2.0, 0.0]]]), torch.tensor([[[3.0, 1.0, 1.0, 0.0]]])
one = atm_similarity(qe, ke, 1).flatten().tolist()
assert math.isclose(one[0], 5 / 2, rel_tol=1e-5), \
    f"one head of width 4: (1·3 + 0·1 + 2·1 + 0·0) / sqrt(4) = 2.5, got {one}"
two = atm_similarity(qe, ke, 2).flatten().tolist()
assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(two, [3 / math.sqrt(2), 2 / math.sqrt(2)])), \
    f"two heads of width 2 see channels [0, 1] and [2, 3]: expected [2.121, 1.414], got {two}"

# A literal loop over batch, head, class token and patch token.
dh = d // nh
naive = torch.empty(B, nh, K, L)
for b in range(B):
    for j in range(nh):
        for i in range(K):
            for l in range(L):
                naive[b, j, i, l] = q[b, i, j * dh:(j + 1) * dh] @ k[b, l, j * dh:(j + 1) * dh] / math.sqrt(dh)
assert torch.allclose(sim, naive, atol=1e-5), \
    "values differ from the loop: check which channels belong to which head, and the 1/sqrt(dh) scale"
print("atm_similarity: all visible tests passed")

# %% [markdown]
# Your similarity at work, before any training. Make "layer tokens" out of the image itself —
# each 4×4 patch's mean colour (centred) and a constant 1 — and "class tokens" out of the three
# colours (with −0.2 against the constant, a threshold), copied into two heads. A class token is
# most similar to the patches of its colour (red = positive, blue = negative):

# %%
def colour_tokens(image, patch):
    """(3, H, W) -> layer tokens (1, L, 8): [mean colour - 0.5, 1] per patch, in 2 heads."""
    rgb = F.avg_pool2d(image[None], patch).flatten(2).transpose(1, 2) - 0.5
    one = torch.cat([rgb, torch.ones_like(rgb[..., :1])], dim=-1)
    return torch.cat([one, one], dim=-1)

def show_maps(maps, titles, label, **kw):
    fig, axes = plt.subplots(1, len(maps), figsize=(2.4 * len(maps) + 0.8, 2.5), layout="constrained")
    for ax, m, t in zip(axes, maps, titles):
        viz.show_heatmap(image, m, ax, title=t, alpha=0.8, **kw)
    fig.colorbar(axes[-1].images[-1], ax=list(axes), shrink=0.85, label=label)
    plt.show()

toy_names = ["background"] + list(teach.colors)
protos = torch.tensor([COLORS[c] for c in teach.colors]) - 0.5
colour_q = torch.cat([protos, torch.full((len(protos), 1), -0.2)], dim=-1)
toy_queries = 24 * torch.cat([torch.zeros(1, 8), torch.cat([colour_q, colour_q], -1)])[None]
image = scenes[0]["image"]                                         # (3, 64, 64)
side = image.shape[-1] // 4                                          # a 16 x 16 grid of 4 x 4 patches
toy_sim = atm_similarity(toy_queries, colour_tokens(image, 4), 2)    # (1, 2, 4, 256)
show_maps(toy_sim[0, 0, 1:].reshape(-1, side, side), [f"'{c}' token, head 0" for c in teach.colors],
          "similarity S", cmap="coolwarm", vmin=-4, vmax=4)

# %% [markdown]
# ## 3.2 The mask: pre-softmax logits, averaged over heads
#
# The attention itself soft-maxes $S$ over the $L$ patch tokens, which makes the row sum to 1: a
# token reading a huge object and one reading a single patch would look alike. SegViT takes the
# mask **before** the softmax, averages the $n_h$ heads into one map per class (the maintainers
# confirm it in SegVit issue #4), and lays the $L$ scores back on the $h\times w$ patch grid
# (row-major). A sigmoid of these logits is the mask.

# %% [solution] segvit.atm_mask_logits

# %% [test] atm_mask_logits_test points=10
sim = torch.randn(2, 3, 4, 15, generator=torch.Generator().manual_seed(1))
m = vl.expect_shape(atm_mask_logits(sim, (3, 5)), "B K h w", name="atm_mask_logits(sim, (3, 5))",
                    B=2, K=4, h=3, w=5)

# Worked example: 2 heads, a 2 x 3 grid; token 4 is row 1, column 1.
ex = torch.zeros(1, 2, 1, 6)
ex[0, 0, 0, 4], ex[0, 1, 0, 4] = 10.0, -2.0
got = atm_mask_logits(ex, (2, 3))
assert math.isclose(got[0, 0, 1, 1].item(), 4.0, rel_tol=1e-6), \
    f"(10 + (-2)) / 2 = 4 at row 1, column 1; got {got[0, 0].tolist()}"
assert got.abs().sum().item() == 4.0, \
    "every other entry should be 0: no softmax (it would spread mass) and no sigmoid (the mask applies it)"

naive = torch.zeros(2, 4, 3, 5)
for b in range(2):
    for c in range(4):
        for y in range(3):
            for x in range(5):
                naive[b, c, y, x] = sum(sim[b, j, c, y * 5 + x] for j in range(3)) / 3
assert torch.allclose(m, naive, atol=1e-6), "values differ from the loop: mean over heads, row-major grid"
print("atm_mask_logits: all visible tests passed")

# %% [markdown]
# The colour tokens' masks, $\sigma$ of your head-averaged logits — already a segmentation of
# colours, with no training at all:

# %%
toy_masks = atm_mask_logits(toy_sim, (side, side))                  # (1, 4, 16, 16)
show_maps(toy_masks[0, 1:].sigmoid(), [f"mask of '{c}'" for c in teach.colors], "σ(mask logit)",
          vmin=0, vmax=1)

# %% [markdown]
# ## 3.3 The cascade
#
# SegViT decodes several ViT layers, **deepest first** (for ViT-B: blocks 12, 8, 6). The class
# tokens flow on from one stage to the next, and each stage adds its mask logits to the previous
# ones: stage $i$'s prediction is $M_1 + \dots + M_i$, so later stages only correct the earlier
# masks. In the official code the stages' maps are resized (bilinear, `align_corners=False`) to
# the last stage's grid before adding; do the same — it matters when the grids differ.
#
# Return all the partial sums, stacked: `(S, B, K, h, w)`.

# %% [solution] segvit.cascade_masks

# %% [test] cascade_masks_test points=15
g = torch.Generator().manual_seed(2)
ms = [torch.randn(2, 3, 4, 5, generator=g) for _ in range(3)]
acc = vl.expect_shape(cascade_masks(ms), "S B K h w", name="cascade_masks(...)", S=3, B=2, K=3, h=4, w=5)
assert torch.allclose(acc[0], ms[0]), "stage 1's output is its own logits"
assert torch.allclose(acc[2], ms[0] + ms[1] + ms[2], atol=1e-6), "stage 3 should be M1 + M2 + M3"

# Different grids: everything is resized to the last stage's grid first.
mixed = [torch.randn(1, 2, 3, 3, generator=g), torch.randn(1, 2, 6, 4, generator=g)]
out = vl.expect_shape(cascade_masks(mixed), "S B K h w", name="cascade_masks(mixed)", S=2, B=1, K=2, h=6, w=4)
up = F.interpolate(mixed[0], size=(6, 4), mode="bilinear", align_corners=False)
assert torch.allclose(out[0], up, atol=1e-6), \
    "stage 1 (3 x 3) should be resized bilinearly (align_corners=False) to the last grid, 6 x 4"
assert torch.allclose(out[1], up + mixed[1], atol=1e-6), "stage 2 = resized stage 1 + stage 2"
print("cascade_masks: all visible tests passed")

# %% [markdown]
# A coarse-to-fine cascade through your functions: the colour tokens read 16×16, then 8×8, then
# 4×4 patches. Top: each stage's own "red" logits — a 16×16 patch mixes the object with the
# background, so stage 1 alone stays below 0 (blue) everywhere, only *less* negative on the
# object. Bottom: the mask of the accumulated logits, which crosses 0.5 only once the finer
# stages have added their evidence:

# %%
stages = [atm_mask_logits(atm_similarity(toy_queries, colour_tokens(image, p), 2),
                          (image.shape[-2] // p, image.shape[-1] // p)) for p in (16, 8, 4)]
acc = cascade_masks(stages)                                          # (3, 1, 4, 16, 16)
fig, axes = plt.subplots(2, 3, figsize=(8, 5.2), layout="constrained")
for s in range(3):
    viz.show_heatmap(image, stages[s][0, 1], axes[0, s], cmap="coolwarm", vmin=-4, vmax=4, alpha=0.8,
                     title=f"stage {s + 1}'s own logits ({stages[s].shape[-1]}×{stages[s].shape[-1]})")
    viz.show_heatmap(image, acc[s, 0, 1].sigmoid(), axes[1, s], vmin=0, vmax=1, alpha=0.8,
                     title=f"'{teach.colors[0]}' mask after stage {s + 1}")
fig.colorbar(axes[0, 2].images[-1], ax=list(axes[0]), shrink=0.85, label="logit")
fig.colorbar(axes[1, 2].images[-1], ax=list(axes[1]), shrink=0.85, label="σ(sum of logits)")
plt.show()

# %% [markdown]
# ## 3.4 Classes × masks at inference
#
# Each token $q$ has a class distribution $p_q = \mathrm{softmax}(\text{cls}_q)$ over $K$ classes
# and "no object" (the last column), and a mask $\sigma(M_q)$. The score of class $c$ at a pixel
# sums every token's vote,
# $$\mathrm{seg}[b, c, y, x] = \sum_q p_{b,q}[c]\;\sigma(M_{b,q}[y, x]),$$
# with the "no object" column dropped: a token sure its class is absent votes for nothing. In
# SegViT token $q$ is class $q$, so this is mostly a gate on each mask — but the formula (an
# `einsum`) does not need it, and here $Q$ may differ from $K$.

# %% [solution] segvit.semantic_scores

# %% [test] semantic_scores_test points=15
g = torch.Generator().manual_seed(3)
cls, masks = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 6, 7, generator=g)
seg = vl.expect_shape(semantic_scores(cls, masks), "B K H W", name="semantic_scores(cls, masks)",
                      B=2, K=4, H=6, W=7)

# Worked example: token 0 is sure of class 1 (of 2); token 1 is sure it is "no object".
cls_ex = torch.tensor([[[-30.0, 30.0, -30.0], [-30.0, -30.0, 30.0]]])
m_ex = torch.tensor([[[[30.0, -30.0]], [[30.0, 30.0]]]])
got = semantic_scores(cls_ex, m_ex)
assert torch.allclose(got, torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]]]]), atol=1e-5), \
    f"class 1 should score 1 where token 0's mask is on and 0 elsewhere; 'no object' votes for nothing; got {got.tolist()}"

naive = torch.zeros(2, 4, 6, 7)
for b in range(2):
    for t in range(3):
        p = torch.softmax(cls[b, t], 0)
        for c in range(4):
            naive[b, c] += p[c] * torch.sigmoid(masks[b, t])
assert torch.allclose(seg, naive, atol=1e-5), \
    "values differ from the loop: softmax over K+1 classes, drop the last column, sum over tokens"
print("semantic_scores: all visible tests passed")

# %% [markdown]
# The whole untrained colour "SegViT" through your four functions: token $k$ is class $k$
# (background is a token too, whose similarity is 0 everywhere, so its mask is 0.5: a colour wins
# where its mask is above that), each token sure of its class; the argmax of your scores
# segments the scene by colour.

# %%
toy_cls = 8 * torch.eye(4, 5)[None]                                  # (1, 4 tokens, 4 + 1)
up = F.interpolate(toy_masks, size=image.shape[-2:], mode="bilinear", align_corners=False)
toy_seg = semantic_scores(toy_cls, up)[0].argmax(0)                  # (64, 64)
fig, axes = plt.subplots(1, 2, figsize=(5, 2.6))
viz.show_image(image, axes[0], title="scene")
viz.show_mask(image, toy_seg, 4, axes[1], title="argmax of your scores: " + ", ".join(toy_names[1:]))
plt.show()

# %% [markdown]
# ## The loss: classes, then masks of the classes present
#
# Token $k$'s class target is $k$ if class $k$ occurs in the image, else "no object"; the
# $(K+1)$-way cross-entropy weighs "no object" by **0.1** (most tokens are absent in most images
# of ADE20K's 150 classes). The masks of the **present** classes are compared to the binary
# targets $[\text{label} = k]$ upsampled to the label size with
# $$\mathcal L = 1\cdot\mathrm{CE} + 20\cdot\mathrm{focal} + 1\cdot\mathrm{dice},$$
# at every stage of the cascade (deep supervision), normalised by the number of present classes.
#
# **Ignore pixels.** The official code counts label-255 pixels as *negatives* of every mask. This
# course leaves them out of focal and dice (a `valid` mask): an ignored pixel is one whose class is
# unknown — here the object outlines — and calling it "not class $k$" for every $k$ teaches each
# mask to stop one pixel short of its object. `losses.atm_loss(..., ignore_in_masks="negative")`
# reproduces the paper.
#
# ## 3.5 Sigmoid focal loss
#
# Most pixels are outside a given mask, and most of them are easy. The **focal loss** (Lin et al.
# 2017) scales the binary cross-entropy down where the prediction is already right. With
# $p = \sigma(x)$ and target $t \in \{0, 1\}$:
# $$p_t = p\,t + (1-p)(1-t), \qquad \alpha_t = \alpha t + (1-\alpha)(1-t), \qquad
# \mathrm{FL} = -\alpha_t\,(1-p_t)^\gamma \log p_t,$$
# with $\alpha = 0.25$, $\gamma = 2$. Average it over each mask's **valid** pixels (a mask with none
# costs 0). *Hint:* $-\log p_t$ is exactly `F.binary_cross_entropy_with_logits(x, t,
# reduction="none")`, which stays finite for huge logits where `torch.log(p)` would not.

# %% [solution] losses.sigmoid_focal_loss

# %% [test] sigmoid_focal_loss_test points=15
g = torch.Generator().manual_seed(4)
x, t = torch.randn(3, 7, generator=g) * 2, (torch.rand(3, 7, generator=g) < 0.4).float()
v = torch.rand(3, 7, generator=g) < 0.8
fl = vl.expect_shape(sigmoid_focal_loss(x, t, v), "N", name="sigmoid_focal_loss(x, t, valid)", N=3)

# Worked example: one pixel, logit 0 (p = 0.5), target 1: 0.25 * 0.5**2 * log 2.
one = sigmoid_focal_loss(torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool))
assert math.isclose(one.item(), 0.25 * 0.25 * math.log(2), rel_tol=1e-5), \
    f"expected 0.25 · (1 - 0.5)² · log 2 = 0.0433, got {one.item():.4f}"
assert sigmoid_focal_loss(x, t, torch.zeros_like(v)).abs().sum() == 0, "a mask with no valid pixel costs 0"
big = sigmoid_focal_loss(torch.tensor([[-300.0, 300.0]]), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool))
assert torch.isfinite(big).all(), f"huge logits gave {big.tolist()}: compute -log p_t from the logits"

naive = torch.zeros(3)
for n in range(3):
    terms = []
    for i in range(7):
        if v[n, i]:
            p = torch.sigmoid(x[n, i])
            pt = p if t[n, i] == 1 else 1 - p
            at = 0.25 if t[n, i] == 1 else 0.75
            terms.append(-at * (1 - pt) ** 2 * torch.log(pt))
    naive[n] = sum(terms) / max(len(terms), 1)
assert torch.allclose(fl, naive, atol=1e-5), \
    "values differ from the loop: check α_t, (1 - p_t)^γ, and the mean over valid pixels only"
print("sigmoid_focal_loss: all visible tests passed")

# %% [markdown]
# ## 3.6 Dice loss
#
# Focal judges pixels one by one; **dice** judges the mask as a whole — the overlap between the
# soft mask $p = \sigma(x)$ and the target, insensitive to how many background pixels there are:
# $$\mathrm{dice} = 1 - \frac{2\sum_i p_i t_i + 1}{\sum_i p_i + \sum_i t_i + 1},$$
# with sums over the valid pixels only (the +1 keeps an empty mask from dividing by zero).

# %% [solution] losses.dice_loss

# %% [test] dice_loss_test points=10
dl = vl.expect_shape(dice_loss(x, t, v), "N", name="dice_loss(x, t, valid)", N=3)
perfect = dice_loss(40 * (2 * t - 1), t, torch.ones_like(v))
assert (perfect.abs() < 1e-3).all(), f"a perfect mask should cost ~0, got {perfect.tolist()}"
worst = dice_loss(torch.tensor([[40.0, -40.0]]), torch.tensor([[0.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool))
assert math.isclose(worst.item(), 2 / 3, rel_tol=1e-4), \
    f"one pixel predicted, the other true: 1 - (2·0 + 1) / (1 + 1 + 1) = 0.667, got {worst.item():.3f}"

naive = torch.zeros(3)
for n in range(3):
    p = torch.sigmoid(x[n])[v[n]]
    tt = t[n][v[n]]
    naive[n] = 1 - (2 * (p * tt).sum() + 1) / (p.sum() + tt.sum() + 1)
assert torch.allclose(dl, naive, atol=1e-5), "values differ from the formula over valid pixels"
print("dice_loss: all visible tests passed")

# %% [markdown]
# Your two losses on one positive pixel as its logit moves (left), and on a 100-pixel mask whose
# predicted area grows across a 30-pixel object (right). Focal all but ignores pixels that are
# already right; dice is lowest when the areas match.

# %%
logits = torch.linspace(-6, 6, 121)[:, None]
ones = torch.ones_like(logits)
target = (torch.arange(100) < 30).float()[None]
areas = torch.arange(0, 101, 5)
dices = [dice_loss(torch.where(torch.arange(100) < a, 8.0, -8.0)[None], target,
                   torch.ones(1, 100, dtype=torch.bool)).item() for a in areas]
fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
axes[0].plot(logits, F.binary_cross_entropy_with_logits(logits, ones, reduction="none"), label="BCE")
axes[0].plot(logits, sigmoid_focal_loss(logits, ones, ones.bool()), label="your focal (α 0.25, γ 2)")
axes[0].set_xlabel("logit of a positive pixel"); axes[0].legend(fontsize=8)
axes[1].plot(areas, dices, "o-"); axes[1].axvline(30, ls=":", c="k")
axes[1].set_xlabel("predicted area (pixels); the object has 30"); axes[1].set_ylabel("your dice")
plt.show()

# %% [markdown]
# ## Your functions drive SegViT
#
# `segvit.SegViT` is a timm ViT read at `cfg.out_layers` plus `segvit.ATMHead`; open
# `vitseg_lab/segvit.py` — `ATMDecoderLayer.forward` and `ATMHead.forward` are a dozen lines each,
# and call *your* `atm_similarity`, `atm_mask_logits` and `cascade_masks`; `predict` calls your
# `semantic_scores`, and the loss (`losses.atm_loss`) your focal and dice. One forward pass:

# %%
model = segvit.build(teach, num_classes=scenes.num_classes)
batch = ShapeScenes.collate([scenes[i] for i in range(4)])
out = model(batch["image"])
print(f"{len(out.mask_logits)} stages (0-based blocks {list(reversed(model.backbone.out_layers))}), "
      f"mask logits {tuple(out.mask_logits[-1].shape)} on a {out.grid[0]}×{out.grid[1]} grid, "
      f"class logits {tuple(out.class_logits[-1].shape)}")
terms = segvit.loss_fn(model, batch)
print("untrained loss:", {k: round(float(v.detach()), 3) for k, v in terms.items()})

# %% [markdown]
# ## Training SegViT on your CPU
#
# Now train it, from scratch, on 2,048 ShapeScenes: a 4-layer, 96-wide ViT with 8×8 patches
# (an 8×8 token grid — SegViT's masks live at token resolution and are upsampled bilinearly),
# its blocks 4, 3, 2 (`out_layers=(1, 2, 3)`, 0-based) decoded in that order, one decoder layer
# each, with the paper's loss and deep supervision. 240 AdamW steps of 16 scenes take about 40 s
# on one CPU core and should reach **mIoU ≥ 0.80** on 256 held-out scenes (`run` trains on
# `cfg.num_threads = 1` thread: these matmuls are too small to split). Watch the eval curve
# (right): for the first ~120 steps mIoU stays near 0.2-0.4 — the model knows colours, not
# shapes — then it learns shapes and mIoU climbs past 0.8 by the end (0.85-0.87 in our runs,
# over three seeds).
# On the left, `loss` is the weighted total summed over the 3 stages; `ce`, `focal` and `dice` are
# the last stage's terms, unweighted, so they do not add up to it. (Under nbgrader the run is 3
# steps.) The run evaluates the untrained model first
# (the baseline, step 0 of the curve), then every 80 steps, and saves a checkpoint
# (`result.checkpoint`; `vitseg-lab eval segvit --ckpt PATH` evaluates it again). At
# `VITSEG_SCALE=full` on a machine without a GPU, the weights or ADE20K, this cell lists every
# missing piece instead, and the cells below keep using the untrained teaching model.
#
# **Quick scale is not the official model in five small ways**, each a `SegViTConfig` field
# whose full-scale value is the official code's: the CLS token stays in the ViT
# (`drop_cls_token`; the official ViT drops it before the first block), no dropout
# (`decoder_dropout`, `atm_attn_dropout`; official 0.1 each), PyTorch's default init
# (`official_init`; official trunc-normal 0.02 Linears and N(0, 1) class queries) and weight decay
# also off for biases (`train.no_decay_norm_bias=True`; official `"norm"`: norm layers only). A
# 4-block ViT trained from scratch for 240 steps has no pretrained features for dropout to
# protect and learns its shapes in a sudden jump that these settings were tuned for; the fifth,
# the loss normaliser averaged over GPUs (`reduce_num_masks`), is on at both scales and does
# nothing on one process.

# %% tags=long-running
result = segvit.run(cfg)
print(result.summary())
val = result.val if result.val is not None else segvit.quick_data(teach)[1]
if result.model is not None:
    model = result.model
    print(f"pixel accuracy {result.metrics['pixel_acc']:.3f} on {len(val)} held-out scenes · "
          f"checkpoint: {result.checkpoint}")
    result.history.plot()
    plt.show()

# %% [markdown]
# ## Mask explorer
#
# Pick a held-out scene, a class token and a cascade stage. Left to right: the ground truth of
# that class (ignore pixels half-way), the stage's own similarity map (your head-averaged logits, blue
# below 0), the mask after that stage ($\sigma$ of your accumulated logits) with the token's
# probability of its class, and the segmentation the model would output after that stage. Try a
# class that is *absent* from the scene: its mask may still light up on a look-alike — it is the
# class head's "no object" that silences it.

# %%
explorer = widgets.mask_explorer(model, val, val.class_names)
explorer

# %% [markdown]
# ## 3.7 The Shrunk structure: query-based down-sampling
#
# A plain ViT keeps $L = (H/16)^2$ tokens in every block: 1,600 at 640×640, and its cost grows
# with them. **SegViT-Shrunk** runs the second half of the ViT at 1/32 resolution. At one block
# (index 8 of ViT-L's 24) the **queries** are the token grid sub-sampled by 2 in each direction —
# every other row and column, a nearest sampling — while the keys and values stay the full grid,
# so the sub-sampled tokens still gather information from everywhere; the residual is the
# sub-sampled token itself. Afterwards a **query-based up-sampling** (QU) module, $(H/16)^2$ learned
# queries cross-attending to the 1/16 and then the 1/32 tokens, gives back a 1/16 map for a
# one-stage ATM head.
#
# Write the sub-sampling: from `(B, h·w, C)` row-major tokens keep rows and columns 0, 2, 4, … —
# an $h\times w$ grid becomes $\lceil h/2\rceil\times\lceil w/2\rceil$.

# %% [solution] segvit.query_downsample

# %% [test] query_downsample_test points=10
tok = torch.arange(35.0).reshape(1, 35, 1).repeat(2, 1, 3)          # token i holds the value i
qd = vl.expect_shape(query_downsample(tok, (5, 7)), "B L C", name="query_downsample(tokens, (5, 7))",
                     B=2, L=12, C=3)
want = [0, 2, 4, 6, 14, 16, 18, 20, 28, 30, 32, 34]
assert qd[0, :, 0].tolist() == want, f"on a 5 x 7 grid keep tokens {want}, got {qd[0, :, 0].tolist()}"

x = torch.randn(3, 24, 4, generator=torch.Generator().manual_seed(5))
naive = torch.stack([x[:, r * 6 + c] for r in range(0, 4, 2) for c in range(0, 6, 2)], dim=1)
assert torch.equal(query_downsample(x, (4, 6)), naive), "differs from the loop over even rows and columns"
print("query_downsample: all visible tests passed")

# %% [markdown]
# Because attention rows are independent, a QD block gives *exactly* the full block's output at
# the kept positions — at a quarter of the query-side cost. Check it with your function on a
# trained block, and look at which tokens stay:

# %%
blk, P = model.backbone.vit.blocks[1], model.backbone.num_prefix_tokens
with torch.no_grad():
    x = model.backbone.vit._pos_embed(model.backbone.vit.patch_embed(batch["image"][:1]))
    small, grid2 = shrunk.qd_block(blk, x, out.grid, P)
    full = blk(x)
print(f"QD: {out.grid} -> {grid2} tokens; max |QD − full block at the kept tokens| = "
      f"{(small[:, P:] - query_downsample(full[:, P:], out.grid)).abs().max():.1e}")
cells = colour_tokens(batch["image"][0], 4)[0, :, :3] + 0.5          # (256, 3) patch colours
fig, axes = plt.subplots(1, 2, figsize=(5, 2.6))
axes[0].imshow(cells.reshape(16, 16, 3).clamp(0, 1)); axes[0].set_title("16×16 tokens", fontsize=9)
axes[1].imshow(query_downsample(cells[None], (16, 16))[0].reshape(8, 8, 3).clamp(0, 1))
axes[1].set_title("your QD queries, 8×8", fontsize=9)
for a in axes:
    a.set_axis_off()
plt.show()

# %% [markdown]
# The official SegViT-Shrunk (`shrunk.py`, built by `segvit.build` with
# `structure="shrunk"`) differs from the plain model in three more places: **no final LayerNorm**
# on the 1/32 tokens; a **single-stage head** (`shrunk.ATMSingleHead`) that reads the QU tokens
# as they are, without the Linear + LayerNorm of the layer tokens; and in that head **each of its
# 3 decoder layers predicts** classes and its *own* mask — not added up as in the cascade — and
# the loss supervises all three.
#
# It trains at quick scale too: `vitseg-lab bench bench_shrunk_quick` trains plain SegViT and
# SegViT-Shrunk (QD at block index 2 of 4, 3-layer QU decoders, 3 supervised head layers) with the
# quick recipe (240 steps each), and writes their mIoU and cost to
# `benchmarks/results/bench_shrunk_quick.json`. The cell below prints that file (it does not
# train: two more runs would not fit this notebook's minute).
#
# **At quick scale QU differs from the official one in two ways**, each a `SegViTConfig` field
# whose full-scale value is the official code's. The official QU's learned queries carry no
# position: query $i$ must learn which 1/16 position it stands for and find that position's tokens
# by attention, guided by the position embedding a *pretrained* ViT has mixed into them. From
# scratch that never starts — at init every query attends almost uniformly, so all 64 QU outputs
# are the same image average, the head's masks are flat and the model predicts background
# everywhere (mIoU 0.088, the "official QU" row: the background's IoU / 10 classes). So the quick
# run adds a fixed 2-D sine-cosine **position code** to the queries and to both memories
# (`qu_pos="sincos"`; official `"none"`), and a **skip**: the projected 1/16 tokens added to QU's
# output (`qu_skip=True`; official `False`), so the head sees each position's own content from the
# first step while QU learns what the 1/32 tokens add. In 120-step trials the code alone, or the
# queries started from the 1/16 tokens, stayed at 0.088; the skip alone reached mIoU 0.34 and
# code + skip 0.78.
#
# Shrunk is also *dearer* here than plain SegViT: on a 4-block, 96-wide ViT the decoders dominate
# the cost, and the saving only appears when most of a large ViT runs at 1/32 — the table below.

# %%
recorded = Path(vl.__file__).resolve().parents[1] / "benchmarks/results/bench_shrunk_quick.json"
if recorded.is_file():
    quick_rows = json.loads(recorded.read_text())
    print(f"recorded by `vitseg-lab bench bench_shrunk_quick` ({quick_rows[0]['steps']} steps "
          "each, 64×64 ShapeScenes):")
    for r in quick_rows:
        print(f"  {r['model']:<26} mIoU {r['mIoU']:.3f}   {r['gmacs_fvcore'] * 1e3:5.1f} M "
              f"multiply-adds per image (fvcore rules; torch {r['gmacs_torch'] * 1e3:.1f} M), "
              f"{r['params_M']:.2f} M parameters, trained in {r['train_seconds']:.0f} s")
    print("(wall times on a shared 2-core CPU: they move with its load)")
else:
    print("no recorded run here: `vitseg-lab bench bench_shrunk_quick` trains them and records it")

# %% [markdown]
# ### What the Shrunk structure saves, measured — counted the paper's way
#
# The table counts ViT-L/16 SegViT and SegViT-Shrunk on one 640×640 image and ViT-B/16 on one
# 512×512 image, 150 classes (ADE20K) — the chapter's full-scale configs built on PyTorch's `meta`
# device: shapes only, no weights and no memory. Two counts, both in multiply-adds:
#
# - **torch**: `torch.utils.flop_counter.FlopCounterMode` over the forward pass (matmuls,
#   convolutions, attention), halved since it counts 2 FLOPs per multiply-add;
# - **fvcore rules**: how the official repository counted the paper's GFLOPs, with fvcore's
#   `FlopCountAnalysis` (not mmcv's counter: that call is commented out there) over the whole
#   inference at crop size — it adds the semantic-inference einsum ($K\times K\times H\times W$:
#   9.22 G for ViT-L), bilinear upsampling (4 per output pixel) and LayerNorm (5 per element).
#
# Under fvcore's rules the three paper figures come out exactly; the torch count is 6.3-10.2 G
# lower. On ViT-L the saving is the same either way: Shrunk runs 16 of 24 blocks on a quarter of
# the tokens and pays for it with a heavier decoder (QU).

# %%
rows = flops.flops_table()
flops.print_flops_table(rows)

# %% [markdown]
# ## Full scale: ViT-B/16 on ADE20K
#
# The same `segvit.run(cfg)` with `VITSEG_SCALE=full` trains the paper's ViT-B/16 SegViT — the
# row with **51.3 mIoU** and 120.9 GFLOPs — on ADE20K's 150 classes: ImageNet-21k AugReg weights
# `vit_base_patch16_384.augreg_in21k_ft_in1k` (what the official config converts from), blocks 6,
# 8, 12 decoded by 3-layer stages, d = 384, 512×512 crops, 160k iterations of a global batch of
# 16, AdamW lr 2e-5 (head ×10, weight decay 0.01 on all but norm layers), poly schedule, and
# single-scale sliding-window evaluation (512 crops, stride 341), with the official model
# behaviours above switched on. For several GPUs:
#
#     torchrun --nproc_per_node 8 -m vitseg_lab.cli train segvit --scale full
#
# `cfg.global_batch_size = 16` is split over the processes (`WORLD_SIZE`): 2 images per GPU on 8
# GPUs, 16 on one. The headline ViT-L/16 row (54.6 single-scale) is `SegViTConfig.full_large()`
# (`--scale full-large`): 640 crops, windows 640 / stride 608. The paper's multi-scale column
# (ViT-B 53.0, ViT-L 55.2, Shrunk 55.1) averages the windows' scores over six scales and their
# mirror images (`segvit.aug_test_scores`, mmsegmentation's `aug_test`): add
# `--test_ratios 0.5,0.75,1.0,1.25,1.5,1.75 --test_flip true` to the command (every evaluation
# then scores each image 12 times), or set those two fields on a trained model's `model.cfg`
# (`segvit.load(checkpoint)`) before `segvit.metric_fn`. Here, at quick scale, the cell below
# lists what this machine lacks for the ViT-B run, one line each.

# %%
if result.skipped:
    print("Full scale could not start: the training cell above lists what is missing.")
elif vl.scale() == "full":
    print(f"ADE20K val mIoU (single scale): {100 * result.value:.1f} · "
          f"paper (ViT-B): {segvit.PAPER['vit_b_ade_miou_ss']}")
else:
    print(segvit.full_scale_check() or "Full scale is ready: rerun with VITSEG_SCALE=full.")

# %% [markdown]
# ## What you built
#
# Class tokens that attend, and whose attention logits are the masks; a cascade that refines
# them; the class × mask combination that turns tokens into a segmentation; the losses that train
# them, with ignore pixels left out; and the query sub-sampling that lets SegViT-Shrunk cut the
# ViT's cost by about 40%.
