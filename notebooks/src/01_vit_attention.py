# %% [markdown]
# # Chapter 01 — ViT patch tokens and attention
#
# Every model in this course — SegViT, AFA, ReSTR, the zero-shot head — starts the same way: a
# **Vision Transformer** cuts the image into patches, turns each patch into a token, and lets
# the tokens exchange information through **self-attention**. In this chapter you write that
# forward pass yourself, function by function, and then watch *your* functions run a real
# [timm](https://github.com/huggingface/pytorch-image-models) ViT: they train it, and they draw
# its attention maps.
#
# | # | exercise | points |
# |---|---|---|
# | 1.1 | `patchify` — image → flattened patches | 10 |
# | 1.2 | `embed_tokens` — linear embedding, CLS token, position embedding | 10 |
# | 1.3 | `resize_pos_embed` — run a ViT at a new resolution | 15 |
# | 1.4 | `softmax` — written out, numerically stable | 10 |
# | 1.5 | `multi_head_attention` — heads, scaled dot products, the attention map | 20 |
# | 1.6 | `attention_rollout` — where the CLS token looks, through all layers | 15 |
#
# **How exercises work.** Each exercise is a function whose signature and docstring are given.
# Write its body where it says `YOUR CODE HERE` and run the cell: `@plug(attention)` puts your
# function into the `vitseg_lab.attention` module, so the library's model, widgets and training
# loop call *your* code from then on. The cell after it tests your function (shapes, a tiny worked
# example, a comparison with a slow loop). When everything passes, the nbgrader **Validate**
# button in the toolbar checks the whole notebook the way the grader will.
#
# Shapes use one notation throughout: `B` batch, `H, W` pixels, `p` patch size, `h, w` patch
# grid, `L = h·w` patch tokens, `C` channels, `nh` heads, `dh = C / nh` head width.

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import vitseg_lab as vl
from vitseg_lab import attention, plug, viz, widgets
from vitseg_lab.data.shapes import ShapeScenes

vl.setup_notebook(seed=0)
cfg = attention.AttentionConfig.for_scale(vl.scale())   # the training run's scale
teach = attention.AttentionConfig.quick()               # teaching cells: this size at any scale
print(f"scale: {vl.scale()} · device: {vl.device()}")

# %% [markdown]
# ## The data: ShapeScenes
#
# At quick scale the course runs on **ShapeScenes**: procedural 64×64 scenes of coloured shapes,
# generated on the fly from a seed. They carry every label the six chapters need; this chapter
# uses the **image-level labels** — which of the 9 classes (3 colours × 3 shapes) appear in the
# image. Recognising a class needs both the colour of a region and its outline, so a model has
# to relate patches to each other: that is what attention is for.

# %%
scenes = ShapeScenes(6, size=teach.img_size, colors=teach.colors, shapes=teach.shapes, seed=0)
viz.scene_grid([scenes[i] for i in range(6)], scenes.num_classes)
plt.show()
print("classes:", scenes.class_names[1:])

# %% [markdown]
# ## 1.1 Patches
#
# A ViT with patch size $p$ reads an image $x \in \mathbb{R}^{3 \times H \times W}$ as a sequence
# of $L = \frac{H}{p}\cdot\frac{W}{p}$ patches $x_i \in \mathbb{R}^{3p^2}$, row by row, each
# patch flattened. The order inside a patch matters because it must match the order of the
# embedding weights: timm embeds patches with a `Conv2d(3, C, kernel=p, stride=p)` whose weight
# has shape `(C, 3, p, p)`, so we flatten each patch as (channel, row, column).
#
# *Hint:* one `reshape` to split `H` into `(h, p)` and `W` into `(w, p)`, one `permute`, one
# `reshape`. Try it on paper with a 1×4×4 image and p = 2 first.

# %% [solution] attention.patchify

# %% [test] patchify_test points=10
# Shape contract, with all sizes distinct so a transposition cannot pass by luck.
x = torch.randn(2, 3, 12, 8)
out = vl.expect_shape(patchify(x, 4), "B L D", name="patchify(x, 4)", B=2, L=6, D=48)

# Worked example: one 1-channel-looking image (same values in all 3 channels), 4x4, p = 2.
img = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 3, 1, 1)
first = patchify(img, 2)[0, 0, :4]
assert torch.equal(first, torch.tensor([0.0, 1.0, 4.0, 5.0])), (
    f"the first patch's first channel should be [0, 1, 4, 5] (top-left 2x2 block), got {first.tolist()}")

# A slow loop over patches, row by row.
naive = torch.stack([x[:, :, i:i + 4, j:j + 4].reshape(2, -1)
                     for i in range(0, 12, 4) for j in range(0, 8, 4)], dim=1)
assert torch.equal(out, naive), "patch order or flattening order differs from the row-by-row loop"
print("patchify: all visible tests passed")

# %% [markdown]
# Your `patchify` at work: the first scene cut into 8×8 patches (each tile below is one row of
# `patchify(image, 8)[0]`, reshaped back to a picture).

# %%
p = teach.patch_size
tiles = patchify(scenes[0]["image"][None], p)[0]             # (L, 3*p*p)
h = teach.img_size // p
fig, axes = plt.subplots(h, h, figsize=(3.2, 3.2))
for t, ax in zip(tiles, axes.flat):
    ax.imshow(t.reshape(3, p, p).permute(1, 2, 0).clamp(0, 1)); ax.set_axis_off()
fig.suptitle(f"{len(tiles)} tokens of {tiles.shape[1]} numbers each", fontsize=9)
plt.show()

# %% [markdown]
# ## 1.2 Tokens: embedding, CLS and position
#
# Each patch is projected to a $C$-dimensional token with a learned matrix $E$ (and bias). A
# learned **CLS token** is put in front of the sequence — at the end, its output summarises the
# image for the classifier. Attention has no notion of order, so a learned **position
# embedding** $E_{pos}$ is added to every token (ViT, eq. 1):
#
# $$z_0 = [\,x_{cls};\; x_1E;\; x_2E;\; \dots;\; x_LE\,] + E_{pos}, \qquad E_{pos} \in \mathbb{R}^{(1+L)\times C}$$

# %% [solution] attention.embed_tokens

# %% [test] embed_tokens_test points=10
B, L, D, C = 2, 5, 12, 7
g = torch.Generator().manual_seed(0)
patches, weight, bias = torch.randn(B, L, D, generator=g), torch.randn(C, D, generator=g), torch.randn(C, generator=g)
cls_token, pos = torch.randn(1, 1, C, generator=g), torch.randn(1, L + 1, C, generator=g)
z = vl.expect_shape(embed_tokens(patches, weight, bias, cls_token, pos), "B N C", name="embed_tokens(...)",
                    B=B, N=L + 1, C=C)
assert torch.allclose(z[:, 0], (cls_token[0, 0] + pos[0, 0]).expand(B, C)), \
    "token 0 should be the CLS token plus the first position embedding"
naive = torch.stack([torch.stack([weight @ patches[b, t] + bias + pos[0, t + 1] for t in range(L)])
                     for b in range(B)])
assert torch.allclose(z[:, 1:], naive, atol=1e-5), "patch tokens should be x_t E + b + E_pos[t + 1]"

# Your patchify + embed_tokens reproduce timm's convolutional patch embedding exactly.
from vitseg_lab.backbone import quick_vit
vit = quick_vit(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2).eval()
imgs = torch.randn(2, 3, 32, 32)
ours = embed_tokens(patchify(imgs, 8), vit.patch_embed.proj.weight.flatten(1), vit.patch_embed.proj.bias,
                    vit.cls_token, vit.pos_embed)
timms = vit._pos_embed(vit.patch_embed(imgs))
assert torch.allclose(ours, timms, atol=1e-5), "patchify + embed_tokens should equal timm's patch embedding"
print("embed_tokens: all visible tests passed (and match timm)")

# %% [markdown]
# ## 1.3 A new resolution: resizing position embeddings
#
# Segmentation wants larger inputs than the 224×224 a ViT was pre-trained on: SegViT fine-tunes
# at 640×640, so the 14×14 grid of position embeddings must become 40×40. The embeddings of
# neighbouring patches are similar (they are smooth over the grid), so we treat the $h\times w$
# grid part as a $C$-channel image and **resize it with bicubic interpolation**, leaving the CLS
# entry alone. timm does exactly this (`align_corners=False`, `antialias=True`).
#
# *Hint:* `torch.nn.functional.interpolate` works on `(N, C, h, w)` tensors.

# %% [solution] attention.resize_pos_embed

# %% [test] resize_pos_embed_test points=15
pe = torch.randn(1, 1 + 4 * 6, 5)
out = vl.expect_shape(resize_pos_embed(pe, (4, 6), (3, 7)), "_ N C", name="resize_pos_embed", N=1 + 21, C=5)
assert torch.equal(out[:, 0], pe[:, 0]), "the CLS entry must be kept unchanged"
same = resize_pos_embed(pe, (4, 6), (4, 6))
assert torch.allclose(same, pe, atol=1e-5), "resizing to the same grid should change nothing"
const = torch.ones(1, 1 + 9, 2)
assert torch.allclose(resize_pos_embed(const, (3, 3), (5, 4)), torch.ones(1, 21, 2), atol=1e-5), \
    "a constant grid must stay constant after interpolation"
from timm.layers import resample_abs_pos_embed
want = resample_abs_pos_embed(pe, new_size=[3, 7], old_size=[4, 6], num_prefix_tokens=1)
assert torch.allclose(out, want, atol=1e-5), \
    "values differ from timm's resample_abs_pos_embed: check the (h, w) reshape order and the bicubic settings"
print("resize_pos_embed: all visible tests passed")

# %% [markdown]
# One channel of a smooth 4×4 position field, resized to 9×12 by your function:

# %%
yy, xx = torch.meshgrid(torch.linspace(0, 1, 4), torch.linspace(0, 1, 4), indexing="ij")
field = torch.stack([torch.sin(3 * xx) * torch.cos(2 * yy)] * 2, dim=-1).reshape(1, 16, 2)
field = torch.cat([torch.zeros(1, 1, 2), field], dim=1)
big = resize_pos_embed(field, (4, 4), (9, 12))
fig, axes = plt.subplots(1, 2, figsize=(5, 2.2))
axes[0].imshow(field[0, 1:, 0].reshape(4, 4)); axes[0].set_title("4 × 4", fontsize=9)
axes[1].imshow(big[0, 1:, 0].reshape(9, 12)); axes[1].set_title("9 × 12 (yours)", fontsize=9)
for ax in axes: ax.set_axis_off()
plt.show()

# %% [markdown]
# ## 1.4 Softmax, written out
#
# Attention turns similarity scores into weights with a softmax:
# $\mathrm{softmax}(x)_i = \frac{e^{x_i}}{\sum_j e^{x_j}}$. Written literally, $e^{1000}$
# overflows to `inf` and the result becomes `nan`. Since
# $\mathrm{softmax}(x) = \mathrm{softmax}(x - c)$ for any constant $c$, subtract the maximum
# first. A row of only $-\infty$ (every key masked out) should give zeros, not `nan`.

# %% [solution] attention.softmax

# %% [test] softmax_test points=10
x = torch.randn(3, 4, 5)
s = vl.expect_shape(softmax(x, dim=1), "A B C", name="softmax(x, dim=1)", A=3, B=4, C=5)
assert torch.allclose(s.sum(dim=1), torch.ones(3, 5)), "each slice along dim=1 should sum to 1"
assert torch.allclose(softmax(torch.tensor([0.0, math.log(3.0)])), torch.tensor([0.25, 0.75])), \
    "softmax([0, log 3]) should be [0.25, 0.75]"
big = softmax(torch.tensor([1000.0, 1000.0 + math.log(3.0)]))
assert torch.isfinite(big).all(), f"large logits overflowed: got {big.tolist()} (subtract the maximum before exp)"
assert torch.allclose(big, torch.tensor([0.25, 0.75]), atol=1e-4), f"softmax([1000, 1000 + log 3]) gave {big.tolist()}"
masked = softmax(torch.full((2, 3), float("-inf")))
assert torch.equal(masked, torch.zeros(2, 3)), f"an all -inf row should give zeros, got {masked.tolist()}"
print("softmax: all visible tests passed")

# %% [markdown]
# Dividing the scores by a **temperature** sharpens or flattens the weights — the reason
# attention divides by $\sqrt{d_h}$: without it, dot products of long vectors get large and the
# softmax saturates to a single key.

# %%
scores = torch.tensor([2.0, 1.0, 0.5, -1.0])
fig, axes = plt.subplots(1, 3, figsize=(7, 1.8), sharey=True)
for ax, t in zip(axes, [0.25, 1.0, 4.0]):
    ax.bar(range(4), softmax(scores / t)); ax.set_title(f"temperature {t}", fontsize=9)
plt.show()

# %% [markdown]
# ## 1.5 Multi-head self-attention
#
# Each token is projected to a query, a key and a value (one `Linear(C, 3C)` in timm, laid out
# `[q | k | v]`, each split into `nh` heads of width $d_h = C/n_h$). For each head,
#
# $$A = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d_h}}\right), \qquad \mathrm{head} = AV,$$
#
# the heads are concatenated back to $C$ channels and projected once more. Row $i$ of $A$ says
# how much token $i$ takes from every other token: that is the **attention map** we will draw.
# Return it along with the output. Use **your `softmax`** for $A$.

# %% [solution] attention.multi_head_attention

# %% [test] multi_head_attention_test points=20
B, N, C, nh = 2, 5, 12, 3
g = torch.Generator().manual_seed(1)
x = torch.randn(B, N, C, generator=g)
blk = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
out, attn = multi_head_attention(x, blk[0].weight, blk[0].bias, blk[1].weight, blk[1].bias, nh)
vl.expect_shape(out, "B N C", name="output", B=B, N=N, C=C)
vl.expect_shape(attn, "B nh N M", name="attention map", B=B, nh=nh, N=N, M=N)
assert torch.allclose(attn.sum(-1), torch.ones(B, nh, N), atol=1e-5), "attention rows should sum to 1"

# A literal loop for head 1 of sample 0.
dh = C // nh
qkv = blk[0](x)
q, k, v = (qkv[0, :, j * C + dh:j * C + 2 * dh] for j in range(3))
a = torch.stack([torch.softmax(torch.stack([q[i] @ k[j] for j in range(N)]) / math.sqrt(dh), 0) for i in range(N)])
assert torch.allclose(attn[0, 1], a.detach(), atol=1e-5), "head 1's attention map differs from the loop"

# Same numbers as timm's own Attention module with the same weights.
from timm.models.vision_transformer import Attention
ref = Attention(C, num_heads=nh, qkv_bias=True).eval()
ref.qkv, ref.proj = blk
assert torch.allclose(out, ref(x), atol=1e-5), "output differs from timm's Attention with the same weights"
print("multi_head_attention: all visible tests passed (and match timm)")

# %% [markdown]
# ## Your functions run a real ViT
#
# `attention.ExplicitViT` takes a timm `VisionTransformer` and computes its forward pass with
# *your* `patchify`, `embed_tokens`, `resize_pos_embed` and `multi_head_attention` (look at
# `ExplicitViT.forward` in `vitseg_lab/attention.py`: a dozen lines). First check: with the same
# weights, it must give timm's output — at a *different resolution* than it was built for, so
# your position-embedding resize is used too.

# %%
model = attention.build(teach, num_classes=scenes.num_classes).eval()
imgs = torch.rand(2, 3, teach.img_size + 16, teach.img_size)
with torch.no_grad():
    ours = model(imgs).logits
    theirs = model.vit(imgs)
print("max |yours − timm| =", f"{(ours - theirs).abs().max().item():.2e}")
assert torch.allclose(ours, theirs, atol=1e-4)

# %% [markdown]
# ## Training a ViT with your code
#
# Now train that model — from scratch, on your CPU — to say which of the 9 classes appear in a
# scene. Every forward pass runs through your functions. Two heads read the tokens:
#
# - the classic ViT head: the **CLS token**'s output → one sigmoid per class;
# - **token labelling** (Jiang et al., 2021): a linear head labels *every* patch token with its
#   class, supervised by the fraction of each class inside the patch. One label per patch
#   instead of one per image is far more signal, which is why a tiny ViT learns in a minute.
#   A class is in the image when some patch says so: the image score of class $k$ is the
#   maximum over patches of the token logits for $k$ (a multiple-instance readout).
#
# At quick scale (a 4-layer, 96-wide ViT with 8×8 patches, 1,024 scenes, 150 steps) the token
# readout should reach **exact-match accuracy ≥ 0.80** on held-out scenes — all 9 labels right
# — and the CLS head, trained alongside, gets most of the way there too. The run evaluates the
# untrained model first (the baseline, step 0 of the curve) and then every 30 steps, and saves a
# checkpoint (`result.checkpoint`; `vitseg-lab eval attention --ckpt PATH` evaluates it again).
# At `VITSEG_SCALE=full` on a machine without a GPU, the weights or VOC, this cell lists every
# missing piece instead, and the cells below keep using the untrained teaching model.

# %% tags=long-running
result = attention.run(cfg)
print(result.summary())
val = result.val if result.val is not None else attention.quick_data(teach)[1]
if result.model is not None:
    model, m = result.model, result.metrics
    print(f"mAP {m['mAP']:.3f}, per-label accuracy {m['label_acc']:.3f}; "
          f"CLS head exact-match {m['cls_exact_match']:.3f} · checkpoint: {result.checkpoint}")
    result.history.plot()
    plt.show()

# %% [markdown]
# ## Attention explorer
#
# Pick a scene, a layer and a head, and a patch (row, column): the right panel shows where that
# patch's query attends — row $i$ of the attention map $A$ your `multi_head_attention` returned,
# laid back on the grid. Early layers tend to look at neighbours; later ones gather the patches
# of the same object. "mean" averages the heads.

# %%
explorer = widgets.attention_explorer(model, val)
explorer

# %% [markdown]
# ## 1.6 Attention rollout
#
# One layer's map shows one step of mixing. To ask *which patches the final CLS token depends
# on*, Abnar & Zuidema (2020) **roll out** attention through the layers: average the heads, add
# the identity for the residual connection, renormalise, and multiply the layers together,
#
# $$\hat A_\ell = \tfrac12 I + \tfrac12\,\overline{A_\ell}, \quad \hat A_\ell \leftarrow \hat A_\ell / \hat A_\ell \mathbf 1, \qquad R = \hat A_{n}\cdots\hat A_2 \hat A_1,$$
#
# and read the CLS row of $R$ over the patches.

# %% [solution] attention.attention_rollout

# %% [test] attention_rollout_test points=15
g = torch.Generator().manual_seed(2)
maps = [torch.randn(2, 3, 7, 7, generator=g).softmax(-1) for _ in range(4)]
r = vl.expect_shape(attention_rollout(maps), "B L", name="attention_rollout(maps)", B=2, L=6)
assert (r >= 0).all(), "rollout should be non-negative"
eye = [torch.eye(5).expand(1, 2, 5, 5)] * 3
assert torch.allclose(attention_rollout(eye), torch.zeros(1, 4), atol=1e-6), \
    "identity attention everywhere: the CLS token depends on itself only (zeros over patches)"
one = attention_rollout(maps[:1])
A = 0.5 * torch.eye(7) + 0.5 * maps[0].mean(1)
assert torch.allclose(one, (A / A.sum(-1, keepdim=True))[:, 0, 1:], atol=1e-6), \
    "one layer: the CLS row of 0.5 I + 0.5 mean_heads(A), renormalised"
R = torch.eye(7).expand(2, 7, 7)
for m in maps:
    A = 0.5 * torch.eye(7) + 0.5 * m.mean(1)
    R = (A / A.sum(-1, keepdim=True)) @ R
assert torch.allclose(r, R[:, 0, 1:], atol=1e-6), "four layers: multiply in order, last layer on the left"
print("attention_rollout: all visible tests passed")

# %% [markdown]
# Rollout of the trained model on held-out scenes, computed by your function (above each scene:
# the classes it contains; below: how much the final CLS token draws on each patch):

# %%
batch = torch.stack([val[i]["image"] for i in range(6)])
with torch.no_grad():
    out = model(batch)
roll = attention_rollout(out.attn).reshape(-1, *out.grid)
fig, axes = plt.subplots(2, 6, figsize=(11, 3.8))
for i in range(6):
    shown = [val.class_names[k + 1] for k in val[i]["labels"].nonzero().flatten().tolist()]
    viz.show_image(batch[i], axes[0, i], title="\n".join(shown))
    viz.show_heatmap(batch[i], roll[i], axes[1, i])
plt.show()

# %% [markdown]
# ## Full scale: a pre-trained ViT-B/16 on PASCAL VOC
#
# With a CUDA GPU, the timm weights `vit_base_patch16_224.augreg2_in21k_ft_in1k` and PASCAL VOC
# 2012 (`vitseg-lab data download voc`), run this notebook with `VITSEG_SCALE=full`: the same
# `run()` fine-tunes ViT-B/16 on VOC's 20 image-level labels through your functions, and the
# explorer above shows real attention maps. On several GPUs use
# `torchrun --nproc_per_node 4 -m vitseg_lab.cli train attention --scale full`. Here, at quick
# scale, the cell below lists what this machine lacks for it, one line each.

# %%
if result.skipped:
    print("Full scale could not start: the training cell above lists what is missing.")
elif vl.scale() == "full":
    print(f"VOC12 val: mAP {result.metrics['mAP']:.3f}, "
          f"exact-match {result.metrics['exact_match']:.3f}")
else:
    print(attention.full_scale_check() or "Full scale is ready: rerun with VITSEG_SCALE=full.")

# %% [markdown]
# ## What you built
#
# Patches → tokens → position → attention → rollout: the whole ViT forward pass, in your own
# code, checked against timm and trained. Chapter 03 builds a segmentation decoder on exactly
# these tokens, and uses the **pre-softmax** attention scores of a decoder as masks.
