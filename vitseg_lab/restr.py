"""Chapter 05 — ReSTR: convolution-free referring image segmentation with transformers.

Kim, Kim, Lan, Zeng, Kwak, "ReSTR: Convolution-free Referring Image Segmentation Using
Transformers", CVPR 2022. There is no official code; the facts used here are in METHODS.md §4.

A sentence names one object; the model segments it, with transformers and linear layers only:

1. **Visual encoder**: a ViT over P×P patches (its patch embedding a ``Linear`` on flattened
   patches, so not even that is a convolution) -> ``z_v`` (B, L, D).
2. **Language encoder**: word vectors -> ``Linear`` to D + position embeddings -> transformer
   blocks, with the padding mask -> ``z_l`` (B, T, D).
3. **Visual-linguistic encoder**: self-attention over the concatenation ``[z_v, z_l]`` (padded
   words masked out) -> ``z_v'``, ``z_l'``.
4. **Linguistic-seed encoder**: a learnable seed ``e_s`` appended to ``z_l'`` -> ``e_s'`` (B, D),
   the *adaptive classifier* of this image–expression pair.
5. **Patch prediction** ``ŷ_p = σ(z_v' e_s'ᵀ / √D)`` and the **coarse-to-fine decoder**:
   ``[z_v', z_v' ⊗ ŷ_p]`` on the h×w grid, K = log2 P blocks of ×2 up-sampling + a channel-halving
   ``Linear``, a final ``Linear`` logit per pixel.
6. **Loss** ``λ·BCE(ŷ_p, y_p) + BCE(Ŷ_m, Y_m)``, patch labels ``y_p = [h(p) > τ]`` (h = the
   fraction of the patch inside the mask), λ = 0.1, τ = 0.8.

Three points where our notes disagree (METHODS.md §4); each is a config field, and the graded
exercises take the choice as an argument, so no grade depends on it:
``seed_input="language"`` (the seed reads ``[z_l', e_s]``; ``"fused"`` reads ``[z_v', z_l', e_s]``),
``score_scale="sqrt_d"`` (÷√D in the patch score; ``"none"`` drops it), ``decoder_input="concat"``
(``[z_v', z_v' ⊗ ŷ_p]``; ``"masked"`` feeds ``z_v' ⊗ ŷ_p`` alone).

Shapes: B batch · H, W pixels · p patch size · h, w patch grid · L = h·w patch tokens · T words ·
D model width · nh heads · dh = D / nh head width · C a decoder stage's channels.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import chapters
from .exercises import expect_shape
from .train import TrainConfig

__all__ = [
    "PAPER",
    "PRECISION_THRESHOLDS",
    "FusionOutput",
    "ReSTR",
    "ReSTRConfig",
    "RestrOutput",
    "TransformerBlock",
    "build",
    "decoder_block",
    "expression_explorer",
    "expression_kind",
    "full_scale_check",
    "load",
    "loss_fn",
    "metric_fn",
    "padded_attention",
    "patch_labels",
    "patch_logits",
    "quick_data",
    "referring_metrics",
    "restr_loss",
    "run",
]

#: The paper's overall IoU (%) on RefCOCO (unc) — a third-party leaderboard mirror, METHODS.md §4;
#: verify against the paper's Table before relying on it.
PAPER = {"refcoco_val": 67.22, "refcoco_testA": 69.30, "refcoco_testB": 64.45,
         "refcoco+_val": 55.78, "refcoco+_testA": 60.44, "refcoco+_testB": 48.27}
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


# ----------------------------------------------------------------------------------------------
# Exercises
# ----------------------------------------------------------------------------------------------

def patch_labels(mask: Tensor, patch_size: int, tau: float) -> Tensor:
    """Exercise 5.1 · patch labels from the referred mask: y_p = 1 where h(p) > τ.

    h(p) is the average of the mask over patch p (the fraction of its pixels inside the object);
    patches are numbered row-major over the h×w grid, h = H / p, w = W / p.

    Args:
        mask: (B, H, W) float in {0, 1}, H and W multiples of ``patch_size``.
        patch_size: p.
        tau: the threshold τ (the paper: 0.8); strictly greater.
    Returns:
        (B, L) of mask's dtype, 1.0 where h(p) > τ else 0.0, L = h·w.
    """
    ### BEGIN SOLUTION
    B, H, W = mask.shape
    p = patch_size
    frac = mask.reshape(B, H // p, p, W // p, p).mean(dim=(2, 4))   # (B, h, w)
    return (frac > tau).to(mask.dtype).reshape(B, -1)
    ### END SOLUTION


def padded_attention(q: Tensor, k: Tensor, v: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
    """Exercise 5.2 · scaled dot-product attention that never attends to padding.

    A = softmax_M(q kᵀ / √dh) over the M keys, with padded keys (``padding`` True) given zero
    weight; out = A v. A query whose keys are *all* padding attends to nothing: its row of A and
    its output are 0 (not NaN).

    Args:
        q: (B, nh, N, dh) queries. k: (B, nh, M, dh) keys. v: (B, nh, M, dv) values.
        padding: (B, M) bool, True = a padded key (the same for every head and query).
    Returns:
        (out (B, nh, N, dv), A (B, nh, N, M)).
    """
    ### BEGIN SOLUTION
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])            # (B, nh, N, M)
    pad = padding[:, None, None, :]                                      # (B, 1, 1, M)
    scores = scores.masked_fill(pad, float("-inf"))
    attn = scores.softmax(dim=-1).nan_to_num(0.0)        # all-padding rows: 0/0 -> 0
    return attn @ v, attn
    ### END SOLUTION


def patch_logits(z_v: Tensor, e_s: Tensor, scale: float) -> Tensor:
    """Exercise 5.3 · the adaptive classifier scores every patch: z_v' e_s'ᵀ · scale.

    ``e_s`` is this image–expression pair's own classifier, one D-vector per batch item; its dot
    product with each multimodal patch token is that patch's logit (ŷ_p = σ of it). The paper
    (as our notes read it) uses scale = 1/√D; ``scale`` is an argument so both readings fit.

    Args:
        z_v: (B, L, D) multimodal visual tokens z_v'. e_s: (B, D) adaptive classifiers e_s'.
        scale: multiplies the dot products.
    Returns:
        (B, L) logits (apply a sigmoid for ŷ_p).
    """
    ### BEGIN SOLUTION
    return torch.einsum("bld,bd->bl", z_v, e_s) * scale
    ### END SOLUTION


def decoder_block(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Exercise 5.4 · one coarse-to-fine block: ×2 up-sampling, then a Linear that halves channels.

    Up-sample the grid bilinearly by 2 in both directions (``align_corners=False``), then apply
    y = x Wᵀ + b to every position's channel vector. Channels-last throughout: no convolution.

    Args:
        x: (B, h, w, C) features on the patch grid (channels last).
        weight: (C', C) with C' = C / 2 (any C' works). bias: (C',).
    Returns:
        (B, 2h, 2w, C').
    """
    ### BEGIN SOLUTION
    grid = x.permute(0, 3, 1, 2)                                        # (B, C, h, w)
    up = F.interpolate(grid, scale_factor=2, mode="bilinear", align_corners=False)
    return up.permute(0, 2, 3, 1) @ weight.T + bias                      # (B, 2h, 2w, C')
    ### END SOLUTION


def restr_loss(patch_logits: Tensor, patch_targets: Tensor, mask_logits: Tensor,
               mask_targets: Tensor, lam: float) -> Tensor:
    """Exercise 5.5 · ReSTR's loss: λ·BCE(ŷ_p, y_p) + BCE(Ŷ_m, Y_m), each BCE a mean.

    Both terms take *logits* (the sigmoid is inside the BCE, which keeps huge logits finite).

    Args:
        patch_logits: (B, L) patch logits. patch_targets: (B, L) in {0, 1} (``patch_labels``).
        mask_logits: (B, H, W) pixel logits. mask_targets: (B, H, W) in {0, 1}.
        lam: λ, the patch term's weight (the paper: 0.1).
    Returns:
        () scalar.
    """
    ### BEGIN SOLUTION
    patch = F.binary_cross_entropy_with_logits(patch_logits, patch_targets)
    pixel = F.binary_cross_entropy_with_logits(mask_logits, mask_targets)
    return lam * patch + pixel
    ### END SOLUTION


def referring_metrics(logits: Tensor, target: Tensor) -> dict[str, float]:
    """Exercise 5.6 · overall IoU, mean IoU and prec@X over a set of expressions.

    The predicted mask of expression i is where its logit is > 0 (probability > 0.5). Then
    I_i = |pred_i ∧ target_i|, U_i = |pred_i ∨ target_i|, IoU_i = I_i / U_i (1.0 when U_i = 0:
    nothing to find and nothing found). oIoU = Σ I_i / Σ U_i (big objects weigh more); mIoU = the
    mean of IoU_i (every expression counts the same); prec@X = the fraction of expressions with
    IoU_i > X, for X in 0.5, 0.6, 0.7, 0.8, 0.9.

    Args:
        logits: (N, H, W) mask logits, one map per expression. target: (N, H, W) bool.
    Returns:
        {"oIoU": float, "mIoU": float, "prec@0.5": float, ..., "prec@0.9": float} (plain floats).
    """
    ### BEGIN SOLUTION
    pred = logits > 0
    inter = (pred & target).flatten(1).sum(1).double()
    union = (pred | target).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    total = union.sum()
    out = {"oIoU": float(inter.sum() / total) if total > 0 else 1.0,
           "mIoU": float(iou.mean())}
    for x in PRECISION_THRESHOLDS:
        out[f"prec@{x}"] = float((iou > x).double().mean())
    return out
    ### END SOLUTION


# ----------------------------------------------------------------------------------------------
# The model: plain nn.Modules; every attention is padded_attention, looked up at call time
# ----------------------------------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
    """Multi-head self-attention through ``padded_attention``.

    x: (B, N, D), padding: (B, N) bool -> (out (B, N, D), A (B, nh, N, N))
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not a multiple of num_heads={num_heads}; pick a "
                             "head count that divides it.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                       # 3 x (B, nh, N, dh)
        out, attn = padded_attention(q, k, v, padding)
        expect_shape(out, "B nh N dh", name="padded_attention(...)[0]", B=B,
                     nh=self.num_heads, N=N, dh=D // self.num_heads)
        return self.proj(out.transpose(1, 2).reshape(B, N, D)), attn


class TransformerBlock(nn.Module):
    """Pre-norm block (METHODS.md §4): z̄ = MSA(LN(z)) + z, z' = MLP(LN(z̄)) + z̄.

    x: (B, N, D), padding: (B, N) bool -> (x (B, N, D), A (B, nh, N, N))
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        y, attn = self.attn(self.norm1(x), padding)
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


class Encoder(nn.Module):
    """A stack of ``TransformerBlock``s with a final LayerNorm.

    x: (B, N, D), padding: (B, N) -> (x (B, N, D), the last block's A (B, nh, N, N))
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, padding: Tensor) -> tuple[Tensor, Tensor | None]:
        attn = None
        for blk in self.blocks:
            x, attn = blk(x, padding)
        return self.norm(x), attn


class LinearPatchProj(nn.Module):
    """A P×P patch embedding as a ``Linear`` on flattened patches (ReSTR is convolution-free).

    Drop-in for timm's ``PatchEmbed.proj`` (a Conv2d with kernel = stride = P, which computes the
    same function): images (B, 3, H, W) -> (B, D, h, w). A timm conv weight (D, 3, P, P) loads
    into it, reshaped to (D, 3·P·P) (channel, row, column order, as the flattening here).
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.linear = nn.Linear(in_chans * patch_size * patch_size, dim)
        self._register_load_state_dict_pre_hook(self._from_conv)

    def _from_conv(self, state, prefix, *args):
        w = state.pop(prefix + "weight", None)           # a timm checkpoint's conv weight
        if w is not None:
            state[prefix + "linear.weight"] = w.reshape(w.shape[0], -1)
        b = state.pop(prefix + "bias", None)
        if b is not None:
            state[prefix + "linear.bias"] = b

    def forward(self, images: Tensor) -> Tensor:
        B, c, H, W = images.shape
        p = self.patch_size
        x = images.reshape(B, c, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.linear(x.reshape(B, H // p, W // p, c * p * p))   # (B, h, w, D)
        return x.permute(0, 3, 1, 2)


class VisualEncoder(nn.Module):
    """A timm ViT whose patch embedding is ``LinearPatchProj``: images -> z_v (B, L, D).

    Prefix (CLS) tokens are dropped: ReSTR keeps the L patch tokens only.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        pe = vit.patch_embed
        conv = pe.proj
        lin = LinearPatchProj(conv.in_channels, conv.out_channels, conv.kernel_size[0])
        if not conv.weight.is_meta:
            with torch.no_grad():  # keep pretrained weights: the same function
                lin.linear.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
                if conv.bias is not None:
                    lin.linear.bias.copy_(conv.bias)
        pe.proj = lin
        self.vit = vit
        self.patch_size = conv.kernel_size[0]
        self.num_prefix = vit.num_prefix_tokens

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        x = vit.norm(vit.blocks(x))
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return x[:, self.num_prefix:], grid


class LanguageEncoder(nn.Module):
    """Word vectors -> Linear to D -> + position embeddings -> transformer blocks (masked).

    ids: (B, T) int64, padding: (B, T) bool -> z_l (B, T, D)
    """

    def __init__(self, vocab_size: int, word_dim: int, dim: int, depth: int, num_heads: int,
                 max_len: int, *, frozen_words: bool = False, mlp_ratio: float = 4.0):
        super().__init__()
        from .text import WordVectors

        self.words = WordVectors(vocab_size, word_dim, frozen=frozen_words)
        self.proj = nn.Linear(word_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.encoder = Encoder(dim, depth, num_heads, mlp_ratio)

    def forward(self, ids: Tensor, padding: Tensor) -> Tensor:
        x = self.proj(self.words(ids)) + self.pos[:, :ids.shape[1]]
        return self.encoder(x, padding)[0]


@dataclass
class FusionOutput:
    """z_v (B, L, D) and z_l (B, T, D) after fusion; attn: the last fusion block's attention
    (B, nh, L+T, L+T) over [visual tokens, words]."""

    z_v: Tensor
    z_l: Tensor
    attn: Tensor | None


@dataclass
class RestrOutput:
    """What ``ReSTR.forward`` returns.

    patch_logits: (B, L) · mask_logits: (B, H, W) · grid: (h, w) · padding: (B, T) ·
    fusion_attn: (B, nh, L+T, L+T) the last visual-linguistic block's attention ·
    classifier: (B, D) e_s'.
    """

    patch_logits: Tensor
    mask_logits: Tensor
    grid: tuple[int, int]
    padding: Tensor
    fusion_attn: Tensor | None
    classifier: Tensor


class CoarseToFineDecoder(nn.Module):
    """K = log2 P blocks (``decoder_block``: ×2 up-sampling + Linear C -> C/2, then LayerNorm +
    GELU), and a final Linear logit per pixel.

    x: (B, h, w, C_in) -> (B, h·P, w·P) mask logits
    """

    def __init__(self, in_dim: int, patch_size: int):
        super().__init__()
        k = int(math.log2(patch_size))
        if 2 ** k != patch_size:
            raise ValueError(f"patch size {patch_size} is not a power of 2; the decoder doubles "
                             "the grid log2(P) times (use P = 8 or 16).")
        dims = [in_dim // 2 ** i for i in range(k + 1)]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.norms = nn.ModuleList(nn.LayerNorm(b) for b in dims[1:])
        self.logit = nn.Linear(dims[-1], 1)

    def forward(self, x: Tensor) -> Tensor:
        for lin, norm in zip(self.linears, self.norms):
            B, h, w, _ = x.shape
            x = decoder_block(x, lin.weight, lin.bias)
            expect_shape(x, "B H W C", name="decoder_block(...)", B=B, H=2 * h, W=2 * w,
                         C=lin.out_features)
            x = F.gelu(norm(x))
        return self.logit(x)[..., 0]


class ReSTR(nn.Module):
    """The whole model (SAM-style: submodules injected, ``build`` wires them).

    forward(images (B, 3, H, W) in [0, 1], expressions: B strings) -> ``RestrOutput``.

    Args:
        visual: ``VisualEncoder``. language: ``LanguageEncoder``. vocab: ``text.Vocabulary``.
        dim: D. fusion_depth / seed_depth / num_heads: the two multimodal encoders.
        max_len: words kept per expression (the paper: 20).
        seed_input, score_scale, decoder_input: the three readings (module docstring).
    """

    def __init__(self, visual: VisualEncoder, language: LanguageEncoder, vocab, *, dim: int,
                 fusion_depth: int, seed_depth: int, num_heads: int, max_len: int,
                 mlp_ratio: float = 4.0, seed_input: str = "language", score_scale: str = "sqrt_d",
                 decoder_input: str = "concat",
                 pixel_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 pixel_std: Sequence[float] = (0.5, 0.5, 0.5)):
        super().__init__()
        for name, value, options in (("seed_input", seed_input, ("language", "fused")),
                                     ("score_scale", score_scale, ("sqrt_d", "none")),
                                     ("decoder_input", decoder_input, ("concat", "masked"))):
            if value not in options:
                raise ValueError(f"{name}={value!r}; choose one of {', '.join(options)}.")
        self.visual, self.language, self.vocab = visual, language, vocab
        self.dim, self.max_len = dim, max_len
        self.seed_input, self.score_scale, self.decoder_input = (seed_input, score_scale,
                                                                 decoder_input)
        self.fusion = Encoder(dim, fusion_depth, num_heads, mlp_ratio)
        self.seed = nn.Parameter(torch.randn(1, 1, dim) * 0.02)      # e_s
        self.seed_encoder = Encoder(dim, seed_depth, num_heads, mlp_ratio)
        self.decoder = CoarseToFineDecoder(dim * (2 if decoder_input == "concat" else 1),
                                           visual.patch_size)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), False)

    def encode_text(self, expressions: Sequence[str] | tuple[Tensor, Tensor]
                    ) -> tuple[Tensor, Tensor]:
        """B strings (or already encoded (ids, padding)) -> (ids (B, T), padding (B, T))."""
        if isinstance(expressions, tuple) and len(expressions) == 2 and torch.is_tensor(
                expressions[0]):
            ids, padding = expressions
        else:
            ids, padding = self.vocab.encode(list(expressions), self.max_len)
        return ids.to(self.seed.device), padding.to(self.seed.device)

    def forward(self, images: Tensor, expressions) -> RestrOutput:
        ids, padding = self.encode_text(expressions)
        B = images.shape[0]
        if ids.shape[0] != B:
            raise ValueError(f"{B} images but {ids.shape[0]} expressions; pass one each.")
        z_v, grid = self.visual((images - self.pixel_mean) / self.pixel_std)   # (B, L, D)
        z_l = self.language(ids, padding)                                       # (B, T, D)
        L = z_v.shape[1]
        # Visual-linguistic encoder: one sequence [z_v, z_l]; visual tokens are never padding.
        vis_pad = padding.new_zeros(B, L)
        fused, fusion_attn = self.fusion(torch.cat([z_v, z_l], 1), torch.cat([vis_pad, padding], 1))
        z_v, z_l = fused[:, :L], fused[:, L:]
        # Linguistic-seed encoder: the seed reads the vision-attended words (and, in the "fused"
        # reading, the visual tokens too); its output is the adaptive classifier e_s'.
        seed = self.seed.expand(B, -1, -1)
        if self.seed_input == "language":
            seq, pad = torch.cat([z_l, seed], 1), torch.cat([padding, vis_pad[:, :1]], 1)
        else:
            seq = torch.cat([z_v, z_l, seed], 1)
            pad = torch.cat([vis_pad, padding, vis_pad[:, :1]], 1)
        e_s = self.seed_encoder(seq, pad)[0][:, -1]                                # (B, D)
        scale = 1 / math.sqrt(self.dim) if self.score_scale == "sqrt_d" else 1.0
        p_logits = patch_logits(z_v, e_s, scale)
        expect_shape(p_logits, "B L", name="patch_logits(...)", B=B, L=L)
        # Coarse-to-fine decoder on the h x w grid, channels last.
        gated = z_v * p_logits.sigmoid()[..., None]                             # z_v' ⊗ ŷ_p
        x = torch.cat([z_v, gated], -1) if self.decoder_input == "concat" else gated
        m_logits = self.decoder(x.reshape(B, grid[0], grid[1], -1))
        return RestrOutput(p_logits, m_logits, grid, padding, fusion_attn, e_s)

    @torch.no_grad()
    def predict(self, images: Tensor, expressions) -> Tensor:
        """-> (B, H, W) bool masks (pixel probability > 0.5)."""
        return self(images, expressions).mask_logits > 0


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

FULL_MODEL = "vit_base_patch16_224.augreg_in21k"   # ViT-B/16, ImageNet-21k (the paper's init)


@dataclass(frozen=True)
class ReSTRConfig(chapters.ScalePresets):
    """Knobs of chapter 05's run; change one with ``dataclasses.replace(cfg, fusion_depth=2)``.

    Visual: ``model_name="quick"`` builds a small ViT from the size fields (random init); any
    other name is a timm ViT. Text: ``word_dim`` (300 = GloVe), ``max_len`` words, ``vocab`` (the
    words; empty = ShapeScenes' vocabulary), ``glove`` (a GloVe file, full scale). Readings:
    ``seed_input``, ``score_scale``, ``decoder_input`` (module docstring). Loss: λ, τ.
    """

    # visual encoder
    model_name: str = "quick"
    pretrained: bool = False
    img_size: int = 64
    patch_size: int = 8
    dim: int = 48
    visual_depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    # language encoder
    word_dim: int = 32
    language_depth: int = 1
    max_len: int = 8
    vocab: tuple[str, ...] = ()
    glove: str = ""
    frozen_words: bool = False
    # multimodal fusion
    fusion_depth: int = 1
    seed_depth: int = 1
    seed_input: str = "language"
    score_scale: str = "sqrt_d"
    decoder_input: str = "concat"
    # loss (the paper: λ = 0.1; at quick scale the patch term carries most of the grounding
    # signal: λ = 1 reached attribute oIoU 0.72 in 300 steps where λ = 0.1 reached 0.63)
    lam: float = 1.0
    tau: float = 0.8
    # data
    dataset: str = "shapes"         # "shapes" | "refcoco" | "refcoco+" | "refcocog"
    num_train: int = 1024
    num_val: int = 256
    colors: tuple[str, ...] = ("red", "green", "blue")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    min_objects: int = 2
    max_objects: int = 4
    eval_splits: tuple[str, ...] = ("val",)
    target: float = 0.70
    target_metric: str = "oIoU_attribute"
    num_threads: int | None = 1
    # From scratch, one thread: 300 steps of 16 scenes. At 4e-3 training is noisier and ends
    # lower (attribute oIoU 0.56 vs 0.72 at 3e-3).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, batch_size=16, lr=3e-3, weight_decay=0.05, warmup_steps=20,
        schedule="cosine", eval_every=0, log_every=25, grad_clip=1.0, progress=False))

    @classmethod
    def quick(cls) -> ReSTRConfig:
        """A small ReSTR from scratch on 64×64 ShapeScenes referring expressions, one CPU thread."""
        return cls()

    @classmethod
    def smoke(cls) -> ReSTRConfig:
        """Builds and takes a few steps (what nbgrader runs): proves the code path only."""
        q = cls.quick()
        return replace(q, num_train=32, num_val=16, target=0.0,
                       train=replace(q.train, steps=2, batch_size=8, warmup_steps=1))

    @classmethod
    def full(cls) -> ReSTRConfig:
        """The paper's recipe (METHODS.md §4): ViT-B/16 (in21k) at 480×480, GloVe 840B.300d,
        expressions of 20 words, AdamW lr 1e-5, wd 5e-4, batch 8, 400k iterations, 40k warm-up,
        λ = 0.1, τ = 0.8, RefCOCO (unc). Encoder depths of the language / fusion / seed
        transformers are not in our notes; we use 12 / 4 / 1 (an assumption)."""
        return cls(model_name=FULL_MODEL, pretrained=True, img_size=480, patch_size=16, dim=768,
                   visual_depth=12, num_heads=12, mlp_ratio=4.0, word_dim=300, language_depth=12,
                   max_len=20, glove=f"data/glove/{_glove_name()}", frozen_words=True,
                   fusion_depth=4, seed_depth=1, lam=0.1, tau=0.8, dataset="refcoco", num_train=0, num_val=0,
                   eval_splits=("val", "testA", "testB"), target=PAPER["refcoco_val"] / 100,
                   target_metric="oIoU", num_threads=None,
                   train=TrainConfig(steps=400_000, batch_size=8, lr=1e-5, weight_decay=5e-4,
                                     warmup_steps=40_000, schedule="poly", poly_power=1.0,
                                     grad_clip=None, eval_every=40_000, log_every=100,
                                     ckpt_every=5000, num_workers=8, progress=True,
                                     out_dir="runs/ch05_restr_full"))


def _glove_name() -> str:
    from .text import GLOVE_FILE

    return GLOVE_FILE


def _vocabulary(cfg: ReSTRConfig):
    from .data.shapes import ShapeScenes
    from .text import Vocabulary

    if cfg.vocab:
        return Vocabulary(cfg.vocab)
    return Vocabulary(ShapeScenes(0, colors=cfg.colors, shapes=cfg.shapes).vocabulary)


def build(cfg: ReSTRConfig, num_classes: int = 1) -> ReSTR:
    """The whole model in one function. ``num_classes`` is 1 (the referred object) and unused:
    the protocol passes it to every chapter. The model keeps ``cfg`` as ``model.cfg``."""
    from .backbone import create_vit, quick_vit

    if cfg.model_name == "quick":
        vit = quick_vit(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.dim,
                        depth=cfg.visual_depth, num_heads=cfg.num_heads, class_token=False,
                        global_pool="avg", mlp_ratio=cfg.mlp_ratio)
    else:
        vit = create_vit(cfg.model_name, pretrained=cfg.pretrained, img_size=cfg.img_size)
    vocab = _vocabulary(cfg)
    language = LanguageEncoder(len(vocab), cfg.word_dim, cfg.dim, cfg.language_depth,
                               cfg.num_heads, cfg.max_len, frozen_words=cfg.frozen_words,
                               mlp_ratio=cfg.mlp_ratio)
    model = ReSTR(VisualEncoder(vit), language, vocab, dim=cfg.dim,
                  fusion_depth=cfg.fusion_depth, seed_depth=cfg.seed_depth,
                  num_heads=cfg.num_heads, max_len=cfg.max_len, mlp_ratio=cfg.mlp_ratio,
                  seed_input=cfg.seed_input,
                  score_scale=cfg.score_scale, decoder_input=cfg.decoder_input)
    model.cfg = cfg
    return model


def quick_data(cfg: ReSTRConfig):
    """ShapeScenes train / val splits with referring expressions (different seeds)."""
    from .data.shapes import ShapeScenes

    kw = {"size": cfg.img_size, "colors": cfg.colors, "shapes": cfg.shapes,
          "min_objects": cfg.min_objects, "max_objects": cfg.max_objects}
    return ShapeScenes(cfg.num_train, seed=0, **kw), ShapeScenes(cfg.num_val, seed=1, **kw)


def loss_fn(model: nn.Module, batch: dict) -> dict[str, Tensor]:
    """``fit``'s loss: λ·BCE(patch) + BCE(mask) on ``batch["ref_mask"]`` (B, H, W)."""
    from .train import unwrap

    cfg = unwrap(model).cfg
    out = model(batch["image"], batch["expression"])
    target = batch["ref_mask"].float()
    y_p = patch_labels(target, cfg.patch_size, cfg.tau)
    total = restr_loss(out.patch_logits, y_p, out.mask_logits, target, cfg.lam)
    with torch.no_grad():
        patch = F.binary_cross_entropy_with_logits(out.patch_logits, y_p)
        pixel = F.binary_cross_entropy_with_logits(out.mask_logits, target)
    return {"loss": total, "patch_bce": patch, "mask_bce": pixel}


SPATIAL_WORDS = {"left", "right", "top", "bottom", "leftmost", "rightmost", "topmost",
                 "bottommost"}
SIZE_WORDS = {"larger", "smaller", "largest", "smallest"}


def expression_kind(expression: str) -> str:
    """``"attribute"`` (colour + shape only), ``"spatial"`` (left/right/top/bottom...) or
    ``"size"`` (larger/smaller...), from the words of a ShapeScenes expression."""
    from .text import tokenize

    words = set(tokenize(expression))
    if words & SPATIAL_WORDS:
        return "spatial"
    if words & SIZE_WORDS:
        return "size"
    return "attribute"


@torch.no_grad()
def collect_predictions(model: nn.Module, loader, *, expressions=None) -> dict[str, Any]:
    """Run ``model`` over ``loader`` -> {"logits": (N, H, W) mask logits, "target": (N, H, W)
    bool, "expression": N strings}. ``expressions(batch)`` may replace a batch's sentences."""
    preds, targets, texts = [], [], []
    device = next(model.parameters()).device
    for batch in loader:
        sents = batch["expression"] if expressions is None else expressions(batch)
        out = model(batch["image"].to(device), sents)
        preds.append(out.mask_logits.float().cpu())
        targets.append(batch["ref_mask"].bool().cpu())
        texts += list(batch["expression"])
    return {"logits": torch.cat(preds), "target": torch.cat(targets), "expression": texts}


def metrics_by_kind(logits: Tensor, target: Tensor, texts: Sequence[str]) -> dict[str, float]:
    """``referring_metrics`` over everything and per expression kind: ``oIoU_attribute``,
    ``mIoU_spatial``, ``prec@0.5_size`` ... (a kind absent from ``texts`` has no keys)."""
    out = dict(referring_metrics(logits, target))
    kinds = [expression_kind(t) for t in texts]
    for kind in ("attribute", "spatial", "size"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            m = referring_metrics(logits[idx], target[idx])
            out.update({f"{k}_{kind}": v for k, v in m.items() if k in ("oIoU", "mIoU",
                                                                          "prec@0.5")})
    return out


@torch.no_grad()
def metric_fn(model: nn.Module, loader) -> dict[str, float]:
    """``fit``'s metric: oIoU, mIoU, prec@X overall and per expression kind (ShapeScenes)."""
    from .metrics import gather_over_ranks  # under DDP: every rank's expressions, in order

    p = {k: gather_over_ranks(v) for k, v in collect_predictions(model, loader).items()}
    return metrics_by_kind(p["logits"], p["target"], p["expression"])


def largest_object_baseline(dataset) -> dict[str, float]:
    """A sentence-blind baseline that is *given* the ground-truth instances: it predicts the
    largest object of every scene. -> the same keys as ``metric_fn``."""
    preds, targets, texts = [], [], []
    for i in range(len(dataset)):
        s = dataset[i]
        masks = s["instance_masks"]
        preds.append(masks[masks.flatten(1).sum(1).argmax()])
        targets.append(s["ref_mask"])
        texts.append(s["expression"])
    # masks as logits: +1 inside the chosen object, -1 elsewhere
    return metrics_by_kind(torch.stack(preds).float() * 2 - 1, torch.stack(targets), texts)


def shuffled_sentence_metrics(model: nn.Module, dataset, batch_size: int = 64
                              ) -> dict[str, float]:
    """The trained model, each scene given *another* scene's expression: what it reaches without
    the right sentence. -> the same keys as ``metric_fn`` (kinds of the true expressions)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size, shuffle=False, collate_fn=dataset.collate)
    was = model.training
    model.eval()
    try:
        p = collect_predictions(model, loader,
                                expressions=lambda b: b["expression"][1:] + b["expression"][:1])
    finally:
        model.train(was)
    return metrics_by_kind(p["logits"], p["target"], p["expression"])


# ----------------------------------------------------------------------------------------------
# Full scale
# ----------------------------------------------------------------------------------------------

def full_scale_check(cfg: ReSTRConfig | None = None) -> str | None:
    """Every piece the full-scale run lacks — a GPU, the ViT weights, the GloVe file, the data set —
    as ``fullscale.check``'s message (a header, then one ``- piece`` line each with the exact
    command), or None when it can start."""
    from .fullscale import gpu_line

    cfg = cfg or ReSTRConfig.full()
    lines = [gpu_line("restr", 1)]   # the paper: batch 8 in all (batch_size is per GPU)
    if cfg.model_name != "quick" and cfg.pretrained:
        from .backbone import weights_problem

        lines.append(weights_problem(cfg.model_name))
    if cfg.glove and not _glove_path(cfg).is_file():
        from .text import GLOVE_URL

        path = _glove_path(cfg)
        lines.append(f"the GloVe vectors {path}: run `wget {GLOVE_URL} && unzip "
                     f"glove.840B.300d.zip -d {path.parent}`")
    if cfg.dataset != "shapes":
        from .data.fetch import missing_message

        lines.append(missing_message(cfg.dataset))
    lines = [line for line in lines if line]
    if not lines:
        return None
    head = (f"Full scale of chapter 05 (restr) cannot start on this machine; {len(lines)} missing "
            f"piece{'s' if len(lines) > 1 else ''}:")
    return "\n".join([head, *(f"- {line}" for line in lines)])


def _glove_path(cfg: ReSTRConfig):
    from pathlib import Path

    from .data.common import data_root

    p = Path(cfg.glove)
    if p.is_absolute() or p.exists():
        return p
    if p.parts and p.parts[0] == "data":
        return data_root() / Path(*p.parts[1:])
    return data_root() / p


class _Resized:
    """RefCOCO sample -> image and mask resized to ``size``×``size`` (no flips: "left" matters)."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        s = self.dataset[i]
        img = F.interpolate(s["image"][None].float(), size=(self.size, self.size),
                            mode="bilinear", align_corners=False)[0]
        m = F.interpolate(s["ref_mask"][None, None].float(), size=(self.size, self.size),
                          mode="nearest")[0, 0] > 0.5
        return {"image": img, "ref_mask": m, "expression": s["expression"]}

    @staticmethod
    def collate(batch: list[dict]) -> dict:
        return {"image": torch.stack([b["image"] for b in batch]),
                "ref_mask": torch.stack([b["ref_mask"] for b in batch]),
                "expression": [b["expression"] for b in batch]}


def _refcoco_vocab(train) -> list[str]:
    from collections import Counter

    from .text import tokenize

    counts = Counter(w for r in train.refs for s in r["sentences"] for w in tokenize(s["sent"]))
    return [w for w, _ in counts.most_common()]


# ----------------------------------------------------------------------------------------------
# run / load
# ----------------------------------------------------------------------------------------------

def full_data(cfg: ReSTRConfig):
    """(train, val) of the full-scale benchmark: ``cfg.dataset`` (RefCOCO unc by default), resized
    to ``cfg.img_size`` squares, val = ``cfg.eval_splits[0]``; both with ``collate``."""
    from .data.refcoco import RefCOCO

    return (_Resized(RefCOCO(dataset=cfg.dataset, split="train"), cfg.img_size),
            _Resized(RefCOCO(dataset=cfg.dataset, split=cfg.eval_splits[0]), cfg.img_size))


def run(cfg: ReSTRConfig):
    """Train with ``fit`` (through ``train.run_chapter``) and evaluate beside sentence-blind
    baselines -> ``chapters.RunResult``.

    Quick: ShapeScenes; ``baseline`` = the largest ground-truth object of each scene (handed the
    instances, blind to the sentence); ``metrics`` also holds ``shuffled_*``, the trained model
    reading another scene's expression. Full: RefCOCO (vocabulary from its training expressions,
    GloVe vectors), every split of ``cfg.eval_splits``, baseline = the shuffled sentences. Full
    scale without its pieces: ``skipped`` = the missing-pieces message (printed).
    """
    from .train import evaluate, run_chapter, skipped_run

    if cfg.dataset != "shapes":
        msg = full_scale_check(cfg)
        if msg:
            print(msg)
            return skipped_run(cfg, msg)
        train_ds, val_ds = full_data(cfg)
        cfg = replace(cfg, vocab=tuple(_refcoco_vocab(train_ds.dataset)))
        collate = _Resized.collate
    else:
        train_ds, val_ds = quick_data(cfg)
        collate = train_ds.collate

    def build_model(c: ReSTRConfig, num_classes: int) -> ReSTR:
        model = build(c, num_classes)
        if c.glove:
            n = model.language.words.load_glove(model.vocab, _glove_path(c))
            print(f"GloVe: {n} of {len(model.vocab) - 2} words found")
        return model

    result = run_chapter("restr", cfg, build_model, loss_fn, metric_fn, (train_ds, val_ds), 1,
                         collate)
    model, metrics = result.model, result.metrics
    if int(os.environ.get("RANK", "0")) != 0:
        return result
    if cfg.dataset == "shapes":
        model.cpu()
        result.baseline = largest_object_baseline(val_ds)
    else:
        # the other splits (testA, testB): the paper reports oIoU on each; the baseline is the
        # trained model reading other expressions (RefCOCO loaders carry no instances)
        from .data.refcoco import RefCOCO

        for split in cfg.eval_splits[1:]:
            ds = _Resized(RefCOCO(dataset=cfg.dataset, split=split), cfg.img_size)
            m = evaluate(model, ds, cfg.train, loss_fn, metric_fn, collate)
            metrics.update({f"{split}_{k}": v for k, v in m.items()})
        result.baseline = {}
    shuffled = shuffled_sentence_metrics(model, val_ds, cfg.train.batch_size)
    metrics.update({f"shuffled_{k}": v for k, v in shuffled.items()})
    if cfg.dataset != "shapes":
        result.baseline = shuffled
    return result


def load(checkpoint) -> ReSTR:
    """The model rebuilt from a checkpoint written by ``run`` (``fit(..., meta=...)``)."""
    from . import chapters

    return chapters.load_model(checkpoint, "restr")


# ----------------------------------------------------------------------------------------------
# Cost: quadratic in the number of patches (the paper's stated limit)
# ----------------------------------------------------------------------------------------------

def attention_cost_curve(sides: Sequence[int], *, dim: int = 64, num_heads: int = 4,
                         words: int = 8, repeats: int = 5) -> list[dict[str, float]]:
    """Time one fusion ``TransformerBlock`` (through ``padded_attention``) on L = side² visual
    tokens + ``words`` words. -> rows {"L", "ms", "attn_entries"}; ms is the fastest of
    ``repeats`` runs, the one least disturbed by other processes on a shared machine."""
    blk = TransformerBlock(dim, num_heads).eval()
    rows = []
    for s in sides:
        n = s * s + words
        x = torch.randn(1, n, dim)
        pad = torch.zeros(1, n, dtype=torch.bool)
        times = []
        with torch.no_grad():
            blk(x, pad)
            for _ in range(repeats):
                t = time.perf_counter()
                blk(x, pad)
                times.append(time.perf_counter() - t)
        rows.append({"L": s * s, "ms": 1000 * min(times),
                     "attn_entries": float(num_heads * n * n)})
    return rows


# ----------------------------------------------------------------------------------------------
# Explorer
# ----------------------------------------------------------------------------------------------

def expression_explorer(model: ReSTR, dataset, index: int = 0):
    """Type or pick an expression about a scene; see the word-to-patch attention of the last
    fusion block, the patch scores ŷ_p and the final mask — computed by the learner's plugged
    functions (the model calls them at run time). An unknown word gets one sentence, never a
    KeyError. -> an ipywidgets VBox; ``.state`` holds the last drawing's inputs and outputs."""
    import html

    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    import numpy as np

    model.eval()
    vocab = model.vocab
    scene = widgets.IntSlider(value=index, min=0, max=max(len(dataset) - 1, 0),
                              description="scene")
    text = widgets.Text(value=dataset[index]["expression"], description="expression",
                        continuous_update=False, layout=widgets.Layout(width="420px"))
    picks = widgets.Dropdown(options=[], description="pick")
    word = widgets.Dropdown(options=["all words"], value="all words", description="word")
    message = widgets.HTML()
    out = widgets.Output()
    box = widgets.VBox([widgets.HBox([scene, picks]), widgets.HBox([text, word]), message, out])
    box.state = {}

    def choices(i: int) -> list[str]:
        s = dataset[i]
        classes = getattr(dataset, "class_names", None)
        names = ([f"the {classes[int(c)]}" for c in s.get("instance_labels", [])]
                 if classes else [])
        return list(dict.fromkeys([s["expression"], *names]))

    def draw(_=None):
        i = scene.value
        sent = text.value
        problem = vocab.explain_unknown(sent)
        from .text import tokenize

        if not tokenize(sent):
            problem = "Type an expression such as 'the red circle' (no words were found)."
        message.value = f"<b>{html.escape(problem)}</b>" if problem else ""
        box.state.update(scene=i, expression=sent, message=problem)
        if problem:
            with out:
                out.clear_output(wait=True)
            return
        s = dataset[i]
        dev = next(model.parameters()).device
        with torch.no_grad():
            o = model(s["image"][None].to(dev), [sent])
        h, w = o.grid
        L = h * w
        toks = tokenize(sent)[:model.max_len]
        # rows = words (positions L..L+T), columns = visual tokens; mean over heads
        a = o.fusion_attn[0].mean(0)[L:L + len(toks), :L].cpu()          # (T', L)
        opts = ["all words", *[f"{k}: {t}" for k, t in enumerate(toks)]]
        if list(word.options) != opts:
            word.unobserve(draw, "value")
            word.options, word.value = opts, "all words"
            word.observe(draw, "value")
        k = opts.index(word.value) - 1 if word.value in opts else -1
        amap = (a.mean(0) if k < 0 else a[k]).reshape(h, w)
        probs = o.patch_logits[0].sigmoid().reshape(h, w).cpu()
        mask = (o.mask_logits[0] > 0).cpu()
        box.state.update(attention=amap, patch_probs=probs, mask=mask)
        with out:
            out.clear_output(wait=True)
            fig, axes = plt.subplots(1, 4, figsize=(11, 3))
            img = s["image"].permute(1, 2, 0).numpy()
            axes[0].imshow(img)
            axes[0].set_title("scene + ground truth" if sent == s["expression"] else "scene",
                              fontsize=9)
            if sent == s["expression"]:
                axes[0].contour(s["ref_mask"].float().numpy(), levels=[0.5], colors="w")
            ext = (0, img.shape[1], img.shape[0], 0)
            axes[1].imshow(img)
            axes[1].imshow(amap.numpy(), cmap="magma", alpha=0.6, extent=ext)
            axes[1].set_title(f"fusion attention: {word.value}", fontsize=9)
            axes[2].imshow(probs.numpy(), vmin=0, vmax=1, cmap="viridis")
            axes[2].set_title("patch scores ŷ_p", fontsize=9)
            axes[3].imshow(img)
            shown = mask.numpy()
            axes[3].imshow(np.ma.masked_where(~shown, shown), alpha=0.6, cmap="autumn",
                           extent=ext)
            axes[3].set_title("mask", fontsize=9)
            for ax in axes:
                ax.set_axis_off()
            plt.show()
            plt.close(fig)

    def new_scene(_=None):
        opts = choices(scene.value)
        picks.unobserve(pick, "value")
        picks.options, picks.value = opts, opts[0]
        picks.observe(pick, "value")
        if text.value != opts[0]:
            text.value = opts[0]   # the observer draws
        else:
            draw()

    def pick(change):
        text.value = change["new"]

    scene.observe(new_scene, "value")
    picks.observe(pick, "value")
    text.observe(draw, "value")
    word.observe(draw, "value")
    opts = choices(index)
    picks.unobserve(pick, "value")
    picks.options, picks.value = opts, opts[0]
    picks.observe(pick, "value")
    draw()
    return box
