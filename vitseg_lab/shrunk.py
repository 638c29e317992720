"""SegViT-Shrunk (chapter 03): the second half of the ViT at 1/32 resolution.

Zhang et al., "SegViT: Semantic Segmentation with Plain Vision Transformers", NeurIPS 2022, §3.3.
At one block the *queries* are the token grid sub-sampled by 2 (query-based down-sampling, QD:
the learner's ``segvit.query_downsample``) while keys and values stay the full grid; the blocks
after it run on a quarter of the tokens. Query-based up-sampling (QU) -- learnable queries, one per
1/16 position, cross-attending to the 1/16 and then the 1/32 tokens -- gives back a 1/16 map for a
single-stage ATM head. ``vitseg_lab.flops`` measures what it saves.

As the official Shrunk (``vit_shrink.py``, ``tpn_atm_head.py``; METHODS §1.6): no final LayerNorm
on the 1/32 tokens (``final_norm=False``); the head is ``ATMSingleHead`` -- one stage, no
Linear + LayerNorm on its input (``use_proj=False``), and each of its decoder layers predicts
classes and its *own* mask (not accumulated), all supervised by the loss.

Shapes: B batch · P prefix (CLS) tokens · h, w patch grid · C ViT width · d decoder width ·
nh heads · dh = C / nh timm's per-head width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import segvit
from .backbone import ViTBackbone, block_residual
from .exercises import expect_shape, expect_tensor

__all__ = ["ATMSingleHead", "QueryUpsampler", "ShrunkSegViT", "build_shrunk", "qd_block",
           "sincos_pos"]


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


def sincos_pos(grid: tuple[int, int], dim: int, stride: int = 1) -> Tensor:
    """Fixed 2-D sine-cosine position code (MAE's): dim/2 channels code the row, dim/2 the
    column, each as sin and cos at dim/4 frequencies 1 / 10000^(i / (dim/4)).

    Args:
        grid: (h, w) token grid. dim: d, a multiple of 4. stride: the grid's step in 1/16 units
            (2 for the 1/32 grid: QD keeps rows and columns 0, 2, 4, ..., so its token (r, c)
            sits at 1/16 position (2r, 2c) and gets that position's code).
    Returns:
        (h*w, d), row-major.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine code needs a width divisible by 4, got {dim}; "
                         "pick decoder_dim as a multiple of 4 or qu_pos='none'.")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows = torch.arange(grid[0], dtype=torch.float32) * stride
    cols = torch.arange(grid[1], dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")             # (h, w) each

    def code(t: Tensor) -> Tensor:                                  # (h, w) -> (h*w, d/2)
        a = t.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([code(yy), code(xx)], dim=1)


class QueryUpsampler(nn.Module):
    """QU: learnable queries, one per 1/16 position, cross-attend to the 1/16 layer tokens and then
    to the 1/32 ones (a transformer decoder each), giving back a 1/16 token map.

    The official QU has no position code and no skip: query i must learn which 1/16 position it
    stands for and find that position's tokens by attention, guided by the position embedding a
    pretrained ViT has mixed into them. From scratch at quick scale that never happened: at init
    every query's attention is near-uniform, so every query receives the same image average, the
    head's masks are flat and the run predicts background everywhere (mIoU 0.088 in
    ``benchmarks/bench_shrunk_quick.py`` with every init, depth, lr and norm placement tried;
    adding a position code alone, or starting the queries from the 1/16 tokens, did not change
    it). Two quick-scale options, official values ``pos="none"``, ``skip=False``:

    - ``pos="sincos"`` adds the fixed ``sincos_pos`` code to the queries and to both memories
      (the 1/32 tokens at their 1/16 positions), so query i and the tokens at position i share a
      code from the first step;
    - ``skip=True`` adds the projected 1/16 tokens to QU's output (a residual around QU), so the
      head sees each position's own content from step 1 while QU learns what the 1/32 tokens add.

    With both the quick Shrunk run learns (0.878 mIoU in 240 steps, beside plain SegViT's 0.862:
    ``benchmarks/results/bench_shrunk_quick.json``). In 120-step trials the skip alone reached
    0.34 and code + skip 0.78; the code alone stayed at 0.088.

    Args:
        in_dim: C. dim: d. num_heads: nh. grid: (h, w) at 1/16 (e.g. 40 x 40 for 640 px).
        depth: decoder layers per pass (the paper: 3).
        dropout: of the ``nn.TransformerDecoderLayer``s (official: their default, 0.1).
        official_init: ``segvit.init_official`` and queries ~ N(0, 1) (the official
            ``nn.Embedding``); False: PyTorch's init, queries ~ N(0, 0.02²).
        pos: "none" (official) or "sincos" (see above).
        skip: add the projected 1/16 tokens to the output (official: False; see above).
    """

    def __init__(self, *, in_dim: int, dim: int, num_heads: int, grid: tuple[int, int],
                 depth: int = 3, dropout: float = 0.0, official_init: bool = False,
                 pos: str = "none", skip: bool = False):
        super().__init__()
        if pos not in ("none", "sincos"):
            raise ValueError(f"QU pos={pos!r} (SegViTConfig.qu_pos); use 'none' (official) or "
                             "'sincos'.")
        if pos == "sincos":
            sincos_pos((1, 1), dim)  # the width check, before anything is built
        self.grid, self.pos, self.skip = tuple(grid), pos, skip
        self.queries = nn.Parameter(torch.randn(grid[0] * grid[1], dim) * 0.02)
        self.shallow = segvit.LayerTokens(in_dim, dim)
        self.deep = segvit.LayerTokens(in_dim, dim)

        def decoder() -> nn.TransformerDecoder:
            layer = nn.TransformerDecoderLayer(dim, num_heads, 4 * dim, dropout=dropout,
                                               batch_first=True)
            return nn.TransformerDecoder(layer, depth)

        self.decode_shallow, self.decode_deep = decoder(), decoder()
        if official_init:
            segvit.init_official(self)
            nn.init.normal_(self.queries, std=1.0)

    def forward(self, shallow: Tensor, deep: Tensor, grid: tuple[int, int]) -> Tensor:
        """shallow: (B, h*w, C) at 1/16, deep: (B, h'*w', C) at 1/32 (h' = ceil(h/2)),
        grid: (h, w) -> (B, h*w, d)."""
        q = self.queries
        if tuple(grid) != self.grid:  # another input size: resample the query grid like a pos-embed
            q = q.T.reshape(1, -1, *self.grid)
            q = F.interpolate(q, size=grid, mode="bilinear", align_corners=False)
            q = q.flatten(2)[0].T
        tokens16, mem32 = self.shallow(shallow), self.deep(deep)     # (B, h*w, d), (B, h'*w', d)
        mem16 = tokens16
        if self.pos == "sincos":
            d, small = q.shape[-1], ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
            pos16 = sincos_pos(grid, d).to(q)
            q = q + pos16
            mem16 = mem16 + pos16
            mem32 = mem32 + sincos_pos(small, d, stride=2).to(q)
        q = q.expand(shallow.shape[0], -1, -1)
        q = self.decode_deep(self.decode_shallow(q, mem16), mem32)
        return q + tokens16 if self.skip else q


class ATMSingleHead(nn.Module):
    """The official Shrunk head (``ATMSingleHead(use_proj=False)``): class tokens decoded by
    ``num_layers`` ATM decoder layers against the QU tokens as they are (no LayerTokens
    projection); *each* layer gives class logits (shared class head) and its own head-averaged
    mask logits, not accumulated, and the loss supervises all of them.

    Args:
        num_classes: K. dim: d (= the QU width). num_heads: nh. num_layers: the paper's 3.
        dropout, attn_dropout, official_init: as ``segvit.ATMHead``.
    forward: tokens (B, h*w, d), grid (h, w) -> ``segvit.ATMOutput`` with one entry per layer
    (``mask_logits`` = ``stage_logits``: each layer's own logits).
    """

    def __init__(self, *, num_classes: int, dim: int, num_heads: int, num_layers: int = 3,
                 dropout: float = 0.0, attn_dropout: float = 0.0, official_init: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.class_tokens = nn.Parameter(torch.randn(num_classes, dim) * 0.02)
        self.layers = nn.ModuleList(
            segvit.ATMDecoderLayer(dim, num_heads, dropout=dropout, attn_dropout=attn_dropout)
            for _ in range(num_layers))
        self.class_head = nn.Linear(dim, num_classes + 1)  # index K = "no object"
        if official_init:
            segvit.init_official(self)
            nn.init.normal_(self.class_tokens, std=1.0)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> segvit.ATMOutput:
        B = tokens.shape[0]
        q = self.class_tokens.expand(B, -1, -1)                      # (B, K, d)
        class_logits, masks = [], []
        for layer in self.layers:
            q, sim = layer(q, tokens)
            logits = expect_tensor(segvit.atm_mask_logits(sim, grid), name="atm_mask_logits")
            expect_shape(logits, "B K h w", name="atm_mask_logits(...)", B=B,
                         K=self.num_classes, h=grid[0], w=grid[1])
            masks.append(logits)
            class_logits.append(self.class_head(q))
        return segvit.ATMOutput(class_logits, masks, masks, tuple(grid))


class ShrunkSegViT(nn.Module):
    """SegViT-Shrunk: the ViT runs blocks ``qd_index``.. at 1/32 (QD), QU restores 1/16 and a
    single-stage ATM head decodes it.

    Args:
        backbone: ``ViTBackbone`` (only its ``.vit`` is used: the blocks are run here).
        upsampler: ``QueryUpsampler`` with ``in_dim`` = C.
        head: ``ATMSingleHead`` (official) reading the QU tokens, or an ``ATMHead`` with
            ``num_stages=1`` and ``in_dim`` = the upsampler's d (which re-projects them).
        qd_index: 0-based block run as QD (the paper: 8, the 9th of 24).
        final_norm: apply the ViT's final norm to the 1/32 tokens (official: False).
        drop_cls_token: drop the CLS token before the first block (official: True).
        pixel_mean, pixel_std: input normalisation, as in ``SegViT``.
    """

    def __init__(self, backbone: nn.Module, upsampler: QueryUpsampler, head: nn.Module,
                 qd_index: int = 8, *, final_norm: bool = False, drop_cls_token: bool = False,
                 pixel_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 pixel_std: Sequence[float] = (0.5, 0.5, 0.5)):
        super().__init__()
        self.final_norm, self.drop_cls_token = final_norm, drop_cls_token
        if drop_cls_token:  # no gradient reaches it: frozen, so DDP finds no unused parameter
            for name in ("cls_token", "reg_token"):
                p = getattr(backbone.vit, name, None)
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(False)
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
        if self.drop_cls_token:
            x, P = x[:, P:], 0                                        # (B, h*w, C)
        small = grid
        for i, blk in enumerate(vit.blocks):
            if i == self.qd_index:
                shallow = x[:, P:]                        # (B, h*w, C): the 1/16 layer tokens
                x, small = qd_block(blk, x, small, P)
            else:
                x = blk(x)
        deep = (vit.norm(x) if self.final_norm else x)[:, P:]   # (B, h'*w', C) at 1/32
        tokens = self.upsampler(shallow, deep, grid)              # (B, h*w, d) at 1/16
        if isinstance(self.head, ATMSingleHead):
            return self.head(tokens, grid)
        return self.head([tokens], grid)

    predict = segvit.SegViT.predict


def build_shrunk(cfg, vit: nn.Module, num_classes: int) -> ShrunkSegViT:
    """SegViT-Shrunk from a ``segvit.SegViTConfig`` (``structure="shrunk"``) and its timm ViT:
    QD at ``cfg.qd_index``, QU with one query per 1/``patch`` position of a ``cfg.img_size`` image
    and ``cfg.layers_per_stage``-layer decoders (dropout ``cfg.decoder_dropout``), and the
    official ``ATMSingleHead`` with ``cfg.layers_per_stage`` supervised layers. The final norm
    is never applied (official ``final_norm=False``)."""
    grid = (cfg.img_size // cfg.patch_size,) * 2
    backbone = ViTBackbone(vit)
    C = backbone.embed_dim
    up = QueryUpsampler(in_dim=C, dim=cfg.decoder_dim, num_heads=cfg.decoder_heads, grid=grid,
                        depth=cfg.layers_per_stage, dropout=cfg.decoder_dropout,
                        official_init=cfg.official_init, pos=cfg.qu_pos, skip=cfg.qu_skip)
    head = ATMSingleHead(num_classes=num_classes, dim=cfg.decoder_dim,
                         num_heads=cfg.decoder_heads, num_layers=cfg.layers_per_stage,
                         dropout=cfg.decoder_dropout, attn_dropout=cfg.atm_attn_dropout,
                         official_init=cfg.official_init)
    return ShrunkSegViT(backbone, up, head, qd_index=cfg.qd_index, final_norm=False,
                        drop_cls_token=cfg.drop_cls_token, pixel_mean=cfg.pixel_mean,
                        pixel_std=cfg.pixel_std)
