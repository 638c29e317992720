"""Chapter 03 — SegViT: the attention-to-mask (ATM) decoder and the Shrunk structure.

Zhang et al., "SegViT: Semantic Segmentation with Plain Vision Transformers", NeurIPS 2022
(official code zbwxp/SegVit); the facts used here are in METHODS.md §1.

One learnable *class token* per class cross-attends to *layer tokens* (projected ViT layers). The
cross-attention's pre-softmax similarity, averaged over heads, *is* the class's mask: the same
logits are soft-maxed over the spatial tokens to update the class token and passed through a
sigmoid to segment. Stages run over the chosen ViT layers deepest first; class tokens flow on and
mask logits accumulate. The Shrunk structure runs the second half of the ViT at 1/32 resolution
(query-based down-sampling, QD) and recovers a 1/16 map with learnable queries (QU).

Shapes: B batch · K classes = class tokens (token k is class k) · L = h*w patch tokens ·
C ViT width · d decoder width · nh heads · h, w patch grid · H, W pixels · S cascade stages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses
from .exercises import expect_shape
from .train import TrainConfig

__all__ = [
    "PAPER",
    "ATMDecoderLayer",
    "ATMHead",
    "ATMOutput",
    "LayerTokens",
    "QueryUpsampler",
    "SegViT",
    "SegViTConfig",
    "ShrunkSegViT",
    "atm_mask_logits",
    "atm_similarity",
    "build_segvit",
    "cascade_masks",
    "full_scale_check",
    "qd_block",
    "query_downsample",
    "run",
    "segvit_loss",
    "segvit_metrics",
    "semantic_scores",
    "slide_inference",
]


#: The paper's numbers (README = paper tables, METHODS.md §1.2-1.3): ADE20K val, 640 crop.
PAPER = {
    "vit_b_ade_miou_ss": 51.3,
    "vit_l_ade_miou_ss": 54.6,
    "vit_l_shrunk_ade_miou_ss": 53.9,
    "vit_l_gflops": 637.9,
    "vit_l_shrunk_gflops": 373.5,
}


# ----------------------------------------------------------------------------------------------
# Exercises
# ----------------------------------------------------------------------------------------------

def atm_similarity(queries: Tensor, keys: Tensor, num_heads: int) -> Tensor:
    """Exercise 3.1 · per-head similarity between class tokens and layer tokens.

    The channels split into ``num_heads`` heads of width dh = d / num_heads (head j owns channels
    j·dh ... (j+1)·dh - 1); per head, S = Q Kᵀ / sqrt(dh).

    Args:
        queries: (B, K, d) projected class tokens Q = q W_q.
        keys: (B, L, d) projected layer tokens K = F W_k.
        num_heads: nh, a divisor of d.
    Returns:
        (B, nh, K, L) pre-softmax similarity logits.
    """
    ### BEGIN SOLUTION
    B, K, d = queries.shape
    L, dh = keys.shape[1], d // num_heads
    q = queries.reshape(B, K, num_heads, dh).transpose(1, 2)  # (B, nh, K, dh)
    k = keys.reshape(B, L, num_heads, dh).transpose(1, 2)     # (B, nh, L, dh)
    return q @ k.transpose(-2, -1) / math.sqrt(dh)
    ### END SOLUTION


def atm_mask_logits(sim: Tensor, grid: tuple[int, int]) -> Tensor:
    """Exercise 3.2 · the ATM mask: pre-softmax similarity averaged over heads, as a map.

    Args:
        sim: (B, nh, K, L) similarity logits (before any softmax), L = h*w in row-major order.
        grid: (h, w) patch grid.
    Returns:
        (B, K, h, w) mask logits (apply a sigmoid to get masks).
    """
    ### BEGIN SOLUTION
    B, _, K, _ = sim.shape
    return sim.mean(dim=1).reshape(B, K, grid[0], grid[1])
    ### END SOLUTION


def cascade_masks(stage_logits: list[Tensor]) -> Tensor:
    """Exercise 3.3 · accumulate mask logits over the cascade.

    Each stage's logits are resized (bilinear, ``align_corners=False``) to the *last* stage's
    grid; the output for stage i is the sum of the resized logits of stages 1..i.

    Args:
        stage_logits: S tensors (B, K, h_i, w_i), in decoding order (deepest ViT layer first).
    Returns:
        (S, B, K, h, w) accumulated mask logits, (h, w) = the last stage's grid.
    """
    ### BEGIN SOLUTION
    size = stage_logits[-1].shape[-2:]
    resized = [F.interpolate(m, size=size, mode="bilinear", align_corners=False)
               for m in stage_logits]
    return torch.stack(resized).cumsum(dim=0)
    ### END SOLUTION


def semantic_scores(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Exercise 3.4 · combine class predictions and masks into per-class score maps.

    p = softmax(class_logits) without its last column ("no object");
    seg[b, c, y, x] = Σ_q p[b, q, c] · sigmoid(mask_logits[b, q, y, x]).
    (In SegViT Q = K and token q is class q; the formula does not need it.)

    Args:
        class_logits: (B, Q, K+1) class logits of Q tokens, the last column "no object".
        mask_logits: (B, Q, H, W) mask logits of the same tokens.
    Returns:
        (B, K, H, W) scores; the prediction is their argmax over K.
    """
    ### BEGIN SOLUTION
    probs = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, K)
    return torch.einsum("bqk,bqhw->bkhw", probs, mask_logits.sigmoid())
    ### END SOLUTION


def query_downsample(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Exercise 3.7 · QD's queries: every other row and column of the token grid.

    Keeps grid rows 0, 2, 4, ... and columns 0, 2, 4, ... (a nearest sub-sampling), so an h x w
    grid becomes ceil(h/2) x ceil(w/2), still row-major.

    Args:
        tokens: (B, L, C) patch tokens, L = h*w in row-major order.
        grid: (h, w).
    Returns:
        (B, ceil(h/2) * ceil(w/2), C).
    """
    ### BEGIN SOLUTION
    B, _, C = tokens.shape
    h, w = grid
    return tokens.reshape(B, h, w, C)[:, ::2, ::2].reshape(B, -1, C)
    ### END SOLUTION


# ----------------------------------------------------------------------------------------------
# The ATM decoder (calls the exercises through this module's globals, so plug() reaches them)
# ----------------------------------------------------------------------------------------------

class LayerTokens(nn.Module):
    """Layer tokens: a ViT layer's patch tokens through Linear(C -> d) and LayerNorm.

    tokens: (B, L, C) -> (B, L, d)
    """

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.norm(self.proj(tokens))


class ATMDecoderLayer(nn.Module):
    """One decoder layer: self-attention among class tokens -> ATM cross-attention -> FFN (4d),
    each with a residual and a post-LayerNorm.

    The cross-attention keeps its similarity logits: they are both the attention (soft-maxed over
    the L spatial tokens) and, averaged over heads, the mask.

    Args:
        dim: d, the decoder width. num_heads: nh (d must be a multiple). mlp_ratio: FFN width / d.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not a multiple of num_heads={num_heads}; "
                             "pick a head count that divides it.")
        self.num_heads = num_heads
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, class_tokens: Tensor, layer_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """class_tokens: (B, K, d), layer_tokens: (B, L, d)
        -> (class_tokens (B, K, d), sim (B, nh, K, L) pre-softmax logits)."""
        x = class_tokens
        x = self.norm1(x + self.dropout(self.self_attn(x, x, x, need_weights=False)[0]))
        B, L, d = layer_tokens.shape
        sim = atm_similarity(self.q_proj(x), self.k_proj(layer_tokens), self.num_heads)
        expect_shape(sim, "B nh K L", name="atm_similarity(...)", B=B, nh=self.num_heads,
                     K=x.shape[1], L=L)
        v = self.v_proj(layer_tokens).reshape(B, L, self.num_heads, -1).transpose(1, 2)
        out = sim.softmax(dim=-1) @ v                      # softmax over L: (B, nh, K, dh)
        out = out.transpose(1, 2).reshape(B, -1, d)        # (B, K, d)
        x = self.norm2(x + self.dropout(self.out_proj(out)))
        x = self.norm3(x + self.dropout(self.ffn(x)))
        return x, sim


@dataclass
class ATMOutput:
    """What the ATM head returns; lists run over the S cascade stages in decoding order.

    class_logits: S x (B, K, K+1), the class head on the tokens after each stage.
    mask_logits: S x (B, K, h, w), accumulated (``cascade_masks``); the last one is the prediction.
    stage_logits: S x (B, K, h, w), each stage's own head-averaged similarity (``atm_mask_logits``).
    grid: (h, w) of the mask logits.
    """

    class_logits: list[Tensor]
    mask_logits: list[Tensor]
    stage_logits: list[Tensor]
    grid: tuple[int, int]


class ATMHead(nn.Module):
    """The SegViT decoder: class tokens decoded against layer tokens, deepest layer first.

    Args:
        in_dim: C, the ViT width. num_classes: K (one class token each; token k is class k).
        dim: d, decoder width (the paper: C / 2). num_heads: nh of every decoder layer.
        num_stages: S, how many ViT layers are decoded (one LayerTokens projection each).
        layers_per_stage: decoder layers per stage (the paper: 3); the mask comes from the last.
    """

    def __init__(self, *, in_dim: int, num_classes: int, dim: int, num_heads: int,
                 num_stages: int = 3, layers_per_stage: int = 3, dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.class_tokens = nn.Parameter(torch.randn(num_classes, dim) * 0.02)
        self.layer_tokens = nn.ModuleList(LayerTokens(in_dim, dim) for _ in range(num_stages))
        self.stages = nn.ModuleList(
            nn.ModuleList(ATMDecoderLayer(dim, num_heads, dropout=dropout)
                          for _ in range(layers_per_stage))
            for _ in range(num_stages))
        self.class_head = nn.Linear(dim, num_classes + 1)  # index K = "no object"

    def forward(self, features: Sequence[Tensor], grid: tuple[int, int]) -> ATMOutput:
        """features: S x (B, L, C) ViT layer tokens, shallow to deep; grid: (h, w), L = h*w."""
        if len(features) != len(self.stages):
            raise ValueError(f"the ATM head has {len(self.stages)} stages but got "
                             f"{len(features)} feature maps; match out_layers to num_stages.")
        B = features[0].shape[0]
        q = self.class_tokens.expand(B, -1, -1)                      # (B, K, d)
        class_logits, stage_logits = [], []
        # Deepest layer first; the class tokens flow from one stage into the next.
        for proj, layers, feats in zip(self.layer_tokens, self.stages, reversed(features)):
            tokens = proj(feats)                                     # (B, L, d)
            for layer in layers:
                q, sim = layer(q, tokens)
            logits = atm_mask_logits(sim, grid)
            expect_shape(logits, "B K h w", name="atm_mask_logits(...)", B=B,
                         K=self.num_classes, h=grid[0], w=grid[1])
            stage_logits.append(logits)
            class_logits.append(self.class_head(q))
        acc = cascade_masks(stage_logits)
        expect_shape(acc, "S B K h w", name="cascade_masks(...)", S=len(stage_logits), B=B,
                     K=self.num_classes, h=grid[0], w=grid[1])
        return ATMOutput(class_logits, list(acc.unbind(0)), stage_logits, grid)


class SegViT(nn.Module):
    """A plain ViT read at a few layers + the ATM head (SAM-style: submodules injected).

    Args:
        backbone: ``vitseg_lab.backbone.ViTBackbone`` with ``out_layers`` = the decoded layers.
        head: ``ATMHead`` with one stage per out layer.
        pixel_mean, pixel_std: input normalisation, done here because the loaders never
            normalise (images arrive in [0, 1]); the paper's ViTs use mean = std = 0.5.
    """

    def __init__(self, backbone: nn.Module, head: ATMHead, *,
                 pixel_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 pixel_std: Sequence[float] = (0.5, 0.5, 0.5)):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), False)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: Tensor) -> ATMOutput:
        """images: (B, 3, H, W) -> ATMOutput (mask logits at the 1/patch grid)."""
        out = self.backbone((images - self.pixel_mean) / self.pixel_std)
        return self.head(out.tokens, out.grid)

    def predict(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) -> (B, K, H, W) class scores (argmax over K = the segmentation)."""
        out = self(images)
        masks = F.interpolate(out.mask_logits[-1], size=images.shape[-2:], mode="bilinear",
                              align_corners=False)
        scores = semantic_scores(out.class_logits[-1], masks)
        expect_shape(scores, "B K H W", name="semantic_scores(...)", B=images.shape[0],
                     K=self.num_classes, H=images.shape[-2], W=images.shape[-1])
        return scores


# ----------------------------------------------------------------------------------------------
# The Shrunk structure: QD at one block, QU back to 1/16, a single-stage ATM head
# ----------------------------------------------------------------------------------------------

def qd_block(blk: nn.Module, x: Tensor, grid: tuple[int, int], num_prefix: int
             ) -> tuple[Tensor, tuple[int, int]]:
    """Run a timm ``Block`` as query-based down-sampling: queries on every other row and column,
    keys and values on the full grid; the residual identity is the sub-sampled query.

    x: (B, P + h*w, C) -> ((B, P + h'*w', C), (h', w')) with h' = ceil(h/2), w' = ceil(w/2).
    """
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    x_q = torch.cat([prefix, query_downsample(patches, grid)], dim=1)    # (B, P + L', C)
    attn = blk.attn
    B = x.shape[0]
    nh, hd = attn.num_heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    b_q, b_k, b_v = (attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None,) * 3)
    kv_in, q_in = blk.norm1(x), blk.norm1(x_q)

    def heads(t: Tensor) -> Tensor:                                     # (B, n, nh*hd) -> heads
        return t.reshape(B, t.shape[1], nh, hd).transpose(1, 2)

    q = attn.q_norm(heads(F.linear(q_in, w_q, b_q)))
    k = attn.k_norm(heads(F.linear(kv_in, w_k, b_k)))
    v = heads(F.linear(kv_in, w_v, b_v))
    y = F.scaled_dot_product_attention(q, k, v)                         # (B, nh, P + L', hd)
    y = attn.proj(attn.norm(y.transpose(1, 2).reshape(B, -1, nh * hd)))
    x = x_q + blk.drop_path1(blk.ls1(y))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, ((grid[0] + 1) // 2, (grid[1] + 1) // 2)


class QueryUpsampler(nn.Module):
    """QU: learnable queries, one per 1/16 position, cross-attend to the 1/16 layer tokens and then
    to the 1/32 ones (a transformer decoder each), giving back a 1/16 token map.

    Args:
        in_dim: C. dim: d. num_heads: nh. grid: (h, w) at 1/16 (e.g. 40 x 40 for 640 px).
        depth: decoder layers per pass (the paper: 3).
    """

    def __init__(self, *, in_dim: int, dim: int, num_heads: int, grid: tuple[int, int],
                 depth: int = 3):
        super().__init__()
        self.grid = tuple(grid)
        self.queries = nn.Parameter(torch.randn(grid[0] * grid[1], dim) * 0.02)
        self.shallow = LayerTokens(in_dim, dim)
        self.deep = LayerTokens(in_dim, dim)

        def decoder() -> nn.TransformerDecoder:
            layer = nn.TransformerDecoderLayer(dim, num_heads, 4 * dim, dropout=0.0,
                                               batch_first=True)
            return nn.TransformerDecoder(layer, depth)

        self.decode_shallow, self.decode_deep = decoder(), decoder()

    def forward(self, shallow: Tensor, deep: Tensor, grid: tuple[int, int]) -> Tensor:
        """shallow: (B, h*w, C) at 1/16, deep: (B, h'*w', C) at 1/32, grid: (h, w)
        -> (B, h*w, d)."""
        q = self.queries
        if tuple(grid) != self.grid:  # another input size: resample the query grid like a pos-embed
            q = q.T.reshape(1, -1, *self.grid)
            q = F.interpolate(q, size=grid, mode="bilinear", align_corners=False)
            q = q.flatten(2)[0].T
        q = q.expand(shallow.shape[0], -1, -1)
        q = self.decode_shallow(q, self.shallow(shallow))
        return self.decode_deep(q, self.deep(deep))


class ShrunkSegViT(nn.Module):
    """SegViT-Shrunk: the ViT runs blocks ``qd_index``.. at 1/32 (QD), QU restores 1/16 and a
    single-stage ATM head decodes it.

    Args:
        backbone: ``ViTBackbone`` (only its ``.vit`` is used: the blocks are run here).
        upsampler: ``QueryUpsampler`` with ``in_dim`` = C.
        head: ``ATMHead`` with ``num_stages=1`` and ``in_dim`` = the upsampler's d.
        qd_index: 0-based block run as QD (the paper: 8, the 9th of 24).
        pixel_mean, pixel_std: input normalisation, as in ``SegViT``.
    """

    def __init__(self, backbone: nn.Module, upsampler: QueryUpsampler, head: ATMHead,
                 qd_index: int = 8, *, pixel_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 pixel_std: Sequence[float] = (0.5, 0.5, 0.5)):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), False)
        depth = len(backbone.vit.blocks)
        if not 0 < qd_index < depth:
            raise ValueError(f"qd_index={qd_index} must be in 1..{depth - 1} for a {depth}-block "
                             "ViT (the paper uses 8 for ViT-L).")
        self.backbone, self.upsampler, self.head = backbone, upsampler, head
        self.qd_index = qd_index

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: Tensor) -> ATMOutput:
        vit, P = self.backbone.vit, self.backbone.num_prefix_tokens
        grid = self.backbone.grid_size(*images.shape[-2:])
        x = vit.patch_embed((images - self.pixel_mean) / self.pixel_std)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))           # (B, P + h*w, C)
        small = grid
        for i, blk in enumerate(vit.blocks):
            if i == self.qd_index:
                shallow = x[:, P:]                        # (B, h*w, C): the 1/16 layer tokens
                x, small = qd_block(blk, x, small, P)
            else:
                x = blk(x)
        deep = vit.norm(x)[:, P:]                         # (B, h'*w', C) at 1/32
        return self.head([self.upsampler(shallow, deep, grid)], grid)

    predict = SegViT.predict


@torch.no_grad()
def slide_inference(model: nn.Module, images: Tensor, *, crop: int, stride: int) -> Tensor:
    """Sliding-window inference (mmseg's "slide" mode): score windows, average the overlaps.

    images: (B, 3, H, W) -> (B, K, H, W) averaged ``model.predict`` scores. Windows are
    ``crop`` x ``crop`` every ``stride`` pixels, the last one flush with the border; a side
    smaller than ``crop`` is one window of that side (the ViT resamples its position embedding).
    """
    if not 0 < stride <= crop:
        raise ValueError(f"stride={stride} must be in 1..crop={crop}; the paper uses crop 640, "
                         "stride 608 on ADE20K.")
    B, _, H, W = images.shape
    scores, count = None, images.new_zeros(1, 1, H, W)
    for y in _window_starts(H, crop, stride):
        for x in _window_starts(W, crop, stride):
            y2, x2 = min(y + crop, H), min(x + crop, W)
            s = model.predict(images[:, :, y:y2, x:x2])
            if scores is None:
                scores = images.new_zeros(B, s.shape[1], H, W)
            scores[:, :, y:y2, x:x2] += s
            count[:, :, y:y2, x:x2] += 1
    return scores / count


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    n = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, size - crop), 0) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Configuration, building, training
# ----------------------------------------------------------------------------------------------

FULL_MODEL = "vit_base_patch16_384.orig_in21k_ft_in1k"  # the original JAX ViT-B/16 (in21k -> 1k)
ADE_CLASSES = 150


@dataclass(frozen=True)
class SegViTConfig:
    """Knobs of chapter 03's run. ``for_scale`` picks quick / full / smoke; change a field with
    ``dataclasses.replace(cfg, out_layers=(1, 3))``.

    Backbone: ``model_name="quick"`` builds ``backbone.quick_vit`` from the size fields (random
    init); any other name is a timm ViT (``create_vit``). ``out_layers``: 0-based blocks decoded,
    one ATM stage each (decoded deepest first). Head: ``head_dim`` d, ``head_heads`` nh,
    ``layers_per_stage``. Loss: METHODS.md §1.1 weights. Data: ShapeScenes (quick) or ADE20K.
    """

    # backbone
    model_name: str = "quick"
    pretrained: bool = False
    img_size: int = 64
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    drop_path: float = 0.0
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)   # the paper: mean = std = 127.5
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    out_layers: tuple[int, ...] = (1, 2, 3)
    # ATM head
    head_dim: int = 96
    head_heads: int = 3
    layers_per_stage: int = 1
    # loss
    ce_weight: float = 1.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    no_object_weight: float = 0.1
    ignore_in_masks: str = "skip"
    # data
    dataset: str = "shapes"          # "shapes" | "ade20k"
    num_train: int = 2048
    num_val: int = 256
    colors: tuple[str, ...] = ("red", "green", "blue")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    min_objects: int = 1
    max_objects: int = 3
    crop: int = 640                   # full scale: training crop and sliding window
    slide_stride: int = 608
    target: float = 0.80              # the mIoU the run is expected to reach (full: the paper's)
    # CPU threads while training (None: leave torch's setting). The quick model's matmuls are too
    # small to split: on a shared 2-core machine 2 threads ran 6x *slower* than 1 (spin-waiting).
    num_threads: int | None = 1
    # From scratch, the ViT must learn shapes, not only colours, within a few hundred steps. It
    # does so suddenly (around step 200) and only with a high LR: at 2e-3 it stays near mIoU 0.3
    # (colours only) for 500 steps, 4e-3-5e-3 reaches 0.84-0.88 in 300, 6e-3+ is unstable. A
    # linear ("poly") decay keeps the LR up through that transition, where cosine has let it drop.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, batch_size=16, lr=4e-3, weight_decay=0.05, warmup_steps=20, schedule="poly",
        poly_power=1.0, eval_every=0, log_every=25, grad_clip=1.0))

    @classmethod
    def quick(cls) -> SegViTConfig:
        """Tiny ViT from scratch on 64 x 64 ShapeScenes, CPU, well under a minute."""
        return cls()

    @classmethod
    def smoke(cls) -> SegViTConfig:
        """What nbgrader runs: a few steps that prove the code path, not accuracy."""
        q = cls.quick()
        return replace(q, num_train=32, num_val=16, target=0.0,
                       train=replace(q.train, steps=3, batch_size=8, warmup_steps=1,
                                     progress=False))

    @classmethod
    def full(cls) -> SegViTConfig:
        """The paper's ViT-B/16 on ADE20K (METHODS.md §1.4): crop 640, 160k iterations, batch 16
        (2 per GPU on 8 GPUs; ``batch_size`` is per process), AdamW lr 2e-5, wd 0.01, poly 1.0,
        1,500 warmup, head lr x10, clip 35, drop-path 0.1, layers [5, 7, 11], d = C/2 = 384.
        51.3 mIoU single-scale is the paper's number."""
        return cls(model_name=FULL_MODEL, pretrained=True, img_size=640, patch_size=16,
                   embed_dim=768, depth=12, num_heads=12, drop_path=0.1, out_layers=(5, 7, 11),
                   head_dim=384, head_heads=12, layers_per_stage=3, dataset="ade20k",
                   num_train=0, num_val=0, target=PAPER["vit_b_ade_miou_ss"], num_threads=None,
                   train=TrainConfig(steps=160_000, batch_size=16, lr=2e-5, weight_decay=0.01,
                                     warmup_steps=1500, schedule="poly", poly_power=1.0,
                                     grad_clip=35.0, eval_every=16_000, log_every=50,
                                     ckpt_every=2000, head_lr_mult=10.0, num_workers=8,
                                     out_dir="runs/ch03_segvit_full"))

    @classmethod
    def for_scale(cls, scale: str) -> SegViTConfig:
        presets = {"quick": cls.quick, "smoke": cls.smoke, "full": cls.full}
        if scale not in presets:
            raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(presets)}.")
        return presets[scale]()


def build_segvit(cfg: SegViTConfig, num_classes: int) -> SegViT:
    """The whole model in one function: ViT backbone read at ``out_layers`` + ATM head."""
    from .backbone import ViTBackbone, create_vit, quick_vit

    if cfg.model_name == "quick":
        vit = quick_vit(img_size=cfg.img_size, patch_size=cfg.patch_size,
                        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                        drop_path_rate=cfg.drop_path)
    else:
        vit = create_vit(cfg.model_name, pretrained=cfg.pretrained, img_size=cfg.img_size,
                         drop_path_rate=cfg.drop_path)
    # The head reads raw block outputs through its own Linear + LayerNorm: the ViT's final norm
    # would get no gradient (and DDP refuses unused parameters).
    vit.norm = nn.Identity()
    backbone = ViTBackbone(vit, out_layers=sorted(cfg.out_layers))
    head = ATMHead(in_dim=backbone.embed_dim, num_classes=num_classes, dim=cfg.head_dim,
                   num_heads=cfg.head_heads, num_stages=len(cfg.out_layers),
                   layers_per_stage=cfg.layers_per_stage)
    return SegViT(backbone, head, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std)


def segvit_loss(model: nn.Module, batch: dict, *, cfg: SegViTConfig) -> dict[str, Tensor]:
    """``fit``'s loss_fn: deep-supervised ATM loss on ``batch["semantic"]`` (B, H, W)."""
    out = model(batch["image"])
    return losses.atm_loss(out.class_logits, out.mask_logits, batch["semantic"],
                           ce_weight=cfg.ce_weight, focal_weight=cfg.focal_weight,
                           dice_weight=cfg.dice_weight, no_object_weight=cfg.no_object_weight,
                           ignore_in_masks=cfg.ignore_in_masks)


@torch.no_grad()
def segvit_metrics(model: nn.Module, loader, *, cfg: SegViTConfig) -> dict[str, Any]:
    """``fit``'s metric_fn: mIoU / pixel accuracy over the loader (a confusion matrix over all of
    it). Full scale: each image resized to short side ``crop`` (long side <= 2048, as the paper's
    test pipeline), scored by sliding windows, and the scores resized back to the label size."""
    from .metrics import SegMeter

    meter = SegMeter(model.num_classes)
    for batch in loader:
        images, labels = batch["image"], batch["semantic"]
        if cfg.dataset == "shapes":
            meter.update(model.predict(images).argmax(1), labels)
            continue
        for image, label in zip(images, labels):  # ADE images differ in size: one at a time
            x = _resize_short(image[None], cfg.crop, long_max=2048)
            s = slide_inference(model, x, crop=cfg.crop, stride=cfg.slide_stride)
            s = F.interpolate(s, size=label.shape[-2:], mode="bilinear", align_corners=False)
            meter.update(s.argmax(1), label[None])
    m = meter.compute()
    return {"mIoU": m["mIoU"], "pixel_acc": m["pixel_acc"], "iou": m["iou"]}


def _resize_short(images: Tensor, short: int, long_max: int) -> Tensor:
    H, W = images.shape[-2:]
    s = min(short / min(H, W), long_max / max(H, W))
    return F.interpolate(images, size=(round(H * s), round(W * s)), mode="bilinear",
                         align_corners=False)


def quick_data(cfg: SegViTConfig):
    """ShapeScenes train / val splits (different seeds, no overlap)."""
    from .data.shapes import ShapeScenes

    kw = {"size": cfg.img_size, "colors": cfg.colors, "shapes": cfg.shapes,
              "min_objects": cfg.min_objects, "max_objects": cfg.max_objects}
    return ShapeScenes(cfg.num_train, seed=0, **kw), ShapeScenes(cfg.num_val, seed=1, **kw)


def full_scale_check(cfg: SegViTConfig | None = None) -> str | None:
    """One line saying what the full-scale run lacks (CUDA, ViT-B/16 weights, ADE20K), or None."""
    cfg = cfg or SegViTConfig.full()
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (none found; on a GPU machine run `VITSEG_SCALE=full jupyter "
                       "lab notebooks/03_segvit_atm.ipynb` or `torchrun --nproc_per_node 8 -m "
                       "vitseg_lab.cli train segvit --scale full`)")
    from .backbone import weights_available

    if not weights_available(cfg.model_name):
        missing.append(f"the timm weights {cfg.model_name!r} (`python -c \"import timm; "
                       f"timm.create_model('{cfg.model_name}', pretrained=True)\"` with network)")
    try:
        from .data.ade20k import ADE20K

        ADE20K(split="validation")
    except ImportError:
        missing.append("the ADE20K loader (vitseg_lab.data.ade20k is not installed)")
    except FileNotFoundError as e:  # DatasetNotFound: its message names the command
        missing.append(f"ADE20K ({str(e).rstrip('.')})")
    if not missing:
        return None
    return "Full scale needs " + "; ".join(missing) + "."


def run(cfg: SegViTConfig) -> dict:
    """Build data and model, train with ``fit``; -> {"model", "history", "metrics", "mIoU",
    "target", "seconds", "val"}. Full scale without its pieces: {"skipped": the one line}."""
    from .train import fit

    t0 = time.perf_counter()
    if cfg.dataset == "ade20k":
        msg = full_scale_check(cfg)
        if msg:
            print(msg)
            return {"skipped": msg}
        from .data.ade20k import ADE20K
        from .data.common import collate
        from .data.transforms import segvit_train_transform

        train_ds = ADE20K(split="training", transform=segvit_train_transform(crop=cfg.crop))
        val_ds = ADE20K(split="validation")
        num_classes, collate_fn = ADE_CLASSES, collate
    elif cfg.dataset == "shapes":
        train_ds, val_ds = quick_data(cfg)
        num_classes, collate_fn = train_ds.num_classes, train_ds.collate
    else:
        raise ValueError(f"dataset={cfg.dataset!r}; use 'shapes' or 'ade20k'.")
    torch.manual_seed(cfg.train.seed)
    model = build_segvit(cfg, num_classes)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        history = fit(model, train_ds, cfg.train,
                      lambda m, b: segvit_loss(m, b, cfg=cfg),
                      lambda m, loader: segvit_metrics(m, loader, cfg=cfg),
                      val_data=val_ds, collate_fn=collate_fn)
    finally:
        torch.set_num_threads(threads)
    metrics = history.final
    return {"model": model, "history": history, "metrics": metrics,
            "mIoU": metrics.get("mIoU", float("nan")), "target": cfg.target,
            "seconds": time.perf_counter() - t0, "val": val_ds, "config": asdict(cfg)}


# ----------------------------------------------------------------------------------------------
# Cost: plain vs Shrunk at the paper's sizes, counted without weights or memory (meta device)
# ----------------------------------------------------------------------------------------------

def build_paper_models(img_size: int = 640, num_classes: int = ADE_CLASSES,
                       device: str | torch.device = "meta") -> dict[str, nn.Module]:
    """ViT-L/16 SegViT and SegViT-Shrunk at the paper's sizes (random init; ``meta``: no memory).

    Plain: layers 8, 16, 24 (``out_indices`` 7, 15, 23) decoded by 3 stages of 3 layers,
    d = 512, 16 heads. Shrunk: QD at block index 8, QU with (img/16)^2 queries and 3-layer
    decoders, then a single-stage ATM head. -> {"SegViT ViT-L": ..., "SegViT-Shrunk ViT-L": ...}
    """
    from .backbone import ViTBackbone, quick_vit

    C, d, nh, K = 1024, 512, 16, num_classes
    grid = (img_size // 16, img_size // 16)
    with torch.device(device):
        vit = quick_vit(img_size=img_size, patch_size=16, embed_dim=C, depth=24, num_heads=16)
        vit.norm = nn.Identity()
        plain = SegViT(ViTBackbone(vit, out_layers=(7, 15, 23)),
                       ATMHead(in_dim=C, num_classes=K, dim=d, num_heads=nh, num_stages=3))
        vit = quick_vit(img_size=img_size, patch_size=16, embed_dim=C, depth=24, num_heads=16)
        shrunk = ShrunkSegViT(
            ViTBackbone(vit), QueryUpsampler(in_dim=C, dim=d, num_heads=nh, grid=grid),
            ATMHead(in_dim=d, num_classes=K, dim=d, num_heads=nh, num_stages=1), qd_index=8)
    return {"SegViT ViT-L": plain.eval(), "SegViT-Shrunk ViT-L": shrunk.eval()}


def count_gmacs(model: nn.Module, img_size: int = 640) -> dict[str, float]:
    """Forward cost of one ``img_size`` image, by ``torch.utils.flop_counter.FlopCounterMode``.

    -> {"total": G multiply-adds, "backbone": ..., "head": ...}. FlopCounterMode counts 2 FLOPs
    per multiply-add; the paper's GFLOPs (mmcv's counter) are multiply-adds, so we halve.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    # Grad mode on: FlopCounterMode's module tracker needs it, and on meta it costs nothing.
    with FlopCounterMode(display=False) as counter:
        model(x)
    per_module = counter.get_flop_counts()
    top = type(model).__name__

    def g(name: str) -> float:
        return sum(per_module.get(f"{top}.{name}", {}).values()) / 2e9

    total = counter.get_total_flops() / 2e9
    head = g("head") + g("upsampler")
    return {"total": total, "backbone": total - head, "head": head}


def flops_table(img_size: int = 640, num_classes: int = ADE_CLASSES) -> list[dict[str, Any]]:
    """Measured G multiply-adds of plain vs Shrunk ViT-L SegViT beside the paper's GFLOPs."""
    paper = {"SegViT ViT-L": PAPER["vit_l_gflops"],
             "SegViT-Shrunk ViT-L": PAPER["vit_l_shrunk_gflops"]}
    rows = []
    for name, model in build_paper_models(img_size, num_classes).items():
        c = count_gmacs(model, img_size)
        rows.append({"model": name, "measured": round(c["total"], 1),
                     "backbone": round(c["backbone"], 1), "head": round(c["head"], 1),
                     "paper": paper[name]})
    base = rows[0]["measured"]
    for r in rows:
        r["saving"] = round(1 - r["measured"] / base, 3)
    return rows


def print_flops_table(rows: list[dict[str, Any]]) -> None:
    """The table ``flops_table`` returns, as text (G multiply-adds, the paper's unit)."""
    print("ViT-L/16, one 640x640 image, 150 classes   (G multiply-adds = the paper's GFLOPs)")
    print(f"{'model':<22}{'measured':>10}{'ViT':>8}{'head':>8}{'paper':>8}{'saving':>8}")
    for r in rows:
        print(f"{r['model']:<22}{r['measured']:>10.1f}{r['backbone']:>8.1f}{r['head']:>8.1f}"
              f"{r['paper']:>8.1f}{r['saving']:>8.0%}")
    paper = 1 - PAPER["vit_l_shrunk_gflops"] / PAPER["vit_l_gflops"]
    print(f"{'paper saving':<22}{'':>34}{paper:>8.0%}")
