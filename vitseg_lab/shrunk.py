"""SegViT-Shrunk (chapter 03): the second half of the ViT at 1/32 resolution.

Zhang et al., "SegViT: Semantic Segmentation with Plain Vision Transformers", NeurIPS 2022, §3.3.
At one block the *queries* are the token grid sub-sampled by 2 (query-based down-sampling, QD:
the learner's ``segvit.query_downsample``) while keys and values stay the full grid; the blocks
after it run on a quarter of the tokens. Query-based up-sampling (QU) -- learnable queries, one per
1/16 position, cross-attending to the 1/16 and then the 1/32 tokens -- gives back a 1/16 map for a
single-stage ATM head (``segvit.ATMHead``). ``vitseg_lab.flops`` measures what it saves.

Shapes: B batch · P prefix (CLS) tokens · h, w patch grid · C ViT width · d decoder width ·
nh heads · dh = C / nh timm's per-head width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import segvit
from .backbone import block_residual
from .exercises import expect_tensor

__all__ = ["QueryUpsampler", "ShrunkSegViT", "qd_block"]


def qd_block(blk: nn.Module, x: Tensor, grid: tuple[int, int], num_prefix: int
             ) -> tuple[Tensor, tuple[int, int]]:
    """Run a timm ``Block`` as query-based down-sampling: queries on every other row and column,
    keys and values on the full grid; the residual identity is the sub-sampled query.

    x: (B, P + h*w, C) -> ((B, P + h'*w', C), (h', w')) with h' = ceil(h/2), w' = ceil(w/2).
    """
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    # Through the module global at call time, so a plugged query_downsample runs here.
    kept = expect_tensor(segvit.query_downsample(patches, grid), name="query_downsample")
    x_q = torch.cat([prefix, kept], dim=1)                               # (B, P + L', C)
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
    return block_residual(blk, x_q, y), ((grid[0] + 1) // 2, (grid[1] + 1) // 2)


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
        self.shallow = segvit.LayerTokens(in_dim, dim)
        self.deep = segvit.LayerTokens(in_dim, dim)

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

    def __init__(self, backbone: nn.Module, upsampler: QueryUpsampler, head: segvit.ATMHead,
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

    def forward(self, images: Tensor) -> segvit.ATMOutput:
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

    predict = segvit.SegViT.predict
