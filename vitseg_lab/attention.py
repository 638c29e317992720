"""Chapter 01 — ViT patch tokens and attention (Dosovitskiy et al., ICLR 2021).

How a Vision Transformer turns an image into tokens and how attention relates them. The exercise
functions below are the whole ViT forward pass written out; ``ExplicitViT`` runs a timm
``VisionTransformer``'s own weights through them, so a learner's functions drive a real timm model
(and a test proves the reference path reproduces timm's output to float precision).

Shapes: B batch · H, W pixels · p patch size · h, w = H/p, W/p patch grid · L = h*w patch tokens ·
P prefix (CLS) tokens · C channels · nh heads · dh = C/nh head width · K classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from . import chapters, fullscale
from .backbone import block_residual, create_vit, quick_vit
from .data.common import collate
from .data.shapes import ShapeScenes
from .data.voc import VOCAug
from .exercises import expect_shape, expect_tensor
from .train import TrainConfig, run_chapter, skipped_run

# ----------------------------------------------------------------------------------------------
# Exercises
# ----------------------------------------------------------------------------------------------

def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Exercise 1.1 · cut images into non-overlapping patches and flatten each one.

    Patches are taken row by row (left to right, top to bottom); each patch is flattened in
    (channel, row, column) order — the order of timm's patch-embedding conv weight, so that
    ``patchify(x, p) @ W.reshape(C, -1).T`` equals that conv.

    Args:
        images: (B, 3, H, W), H and W divisible by ``patch_size``.
    Returns:
        (B, L, 3 * p * p) with L = (H / p) * (W / p).
    """
    ### BEGIN SOLUTION
    B, c, H, W = images.shape
    p = patch_size
    x = images.reshape(B, c, H // p, p, W // p, p)           # (B, c, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                          # (B, h, w, c, p, p)
    return x.reshape(B, (H // p) * (W // p), c * p * p)
    ### END SOLUTION


def embed_tokens(
    patches: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
) -> torch.Tensor:
    """Exercise 1.2 · linear patch embedding, a CLS token in front, position embeddings added.

    z0 = [x_cls; x_1 E; ...; x_L E] + E_pos   (ViT eq. 1, with E = weightᵀ and a bias).

    Args:
        patches: (B, L, D) flattened patches.
        weight: (C, D) projection; bias: (C,).
        cls_token: (1, 1, C) learned CLS embedding.
        pos_embed: (1, 1 + L, C) position embeddings (CLS position first).
    Returns:
        (B, 1 + L, C) tokens.
    """
    ### BEGIN SOLUTION
    x = patches @ weight.T + bias                            # (B, L, C)
    cls = cls_token.expand(x.shape[0], -1, -1)               # (B, 1, C)
    return torch.cat([cls, x], dim=1) + pos_embed
    ### END SOLUTION


def resize_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Exercise 1.3 · resample grid position embeddings to a new patch grid (CLS entry kept).

    The L = h*w grid entries are reshaped to an (h, w) image with C channels and resized with
    bicubic interpolation (``align_corners=False``, ``antialias=True``, as timm does), so a ViT
    trained at one resolution runs at another.

    Args:
        pos_embed: (1, 1 + h*w, C), first entry for the CLS token.
        old_grid: (h, w); new_grid: (h2, w2).
    Returns:
        (1, 1 + h2*w2, C).
    """
    ### BEGIN SOLUTION
    (h, w), (h2, w2) = old_grid, new_grid
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    C = grid.shape[-1]
    grid = grid.reshape(1, h, w, C).permute(0, 3, 1, 2)      # (1, C, h, w)
    grid = F.interpolate(grid.float(), size=(h2, w2), mode="bicubic", align_corners=False,
                         antialias=True).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h2 * w2, C)
    return torch.cat([cls, grid], dim=1)
    ### END SOLUTION


def softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Exercise 1.4 · softmax written out: exp(x - max) / sum exp(x - max) along ``dim``.

    Subtracting the maximum keeps exp() from overflowing on large logits; the result is the same.
    Do not call torch.softmax here. Rows that are all -inf (a fully masked row) return zeros.

    Args:
        logits: any shape.
    Returns:
        same shape, non-negative, summing to 1 along ``dim`` (or 0 for fully masked rows).
    """
    ### BEGIN SOLUTION
    m = logits.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))   # all -inf row: avoid inf - inf
    e = torch.exp(logits - m)
    s = e.sum(dim=dim, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))
    ### END SOLUTION


def multi_head_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exercise 1.5 · multi-head self-attention with the attention map made explicit.

    q, k, v = split(x W_qkvᵀ + b) into nh heads of width dh = C / nh;
    A = softmax(q kᵀ / sqrt(dh)) per head (use your ``softmax``); out = merge(A v) W_projᵀ + b.
    The qkv output is laid out [q | k | v] and, inside each, head by head (timm's layout).

    Args:
        x: (B, N, C) tokens (N = P + L).
        qkv_weight: (3C, C); qkv_bias: (3C,); proj_weight: (C, C); proj_bias: (C,).
    Returns:
        out: (B, N, C) and attn: (B, nh, N, N) attention probabilities.
    """
    ### BEGIN SOLUTION
    B, N, C = x.shape
    d = C // num_heads
    qkv = x @ qkv_weight.T + qkv_bias                          # (B, N, 3C)
    qkv = qkv.reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                           # (B, nh, N, d)
    attn = softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)   # (B, nh, N, N)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)          # merge heads
    return out @ proj_weight.T + proj_bias, attn
    ### END SOLUTION


def attention_rollout(attns: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Exercise 1.6 · attention rollout (Abnar & Zuidema 2020): where does the CLS token look?

    For each layer: average the heads, mix in the residual connection
    Â = residual * I + (1 - residual) * mean_heads(A), renormalise rows to sum to 1;
    then multiply through the layers, R = Â_last ··· Â_2 Â_1, and return R's CLS row over the
    patch tokens (drop the CLS column).

    Args:
        attns: list over layers of (B, nh, 1 + L, 1 + L) attention probabilities, first layer first.
    Returns:
        (B, L) non-negative relevance of each patch for the CLS token.
    """
    ### BEGIN SOLUTION
    eye = torch.eye(attns[0].shape[-1], dtype=attns[0].dtype, device=attns[0].device)
    rollout = None
    for a in attns:
        a = residual * eye + (1 - residual) * a.mean(dim=1)    # (B, N, N)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0, 1:]
    ### END SOLUTION


# ----------------------------------------------------------------------------------------------
# The model: a timm ViT's weights run through the exercise functions
# ----------------------------------------------------------------------------------------------

@dataclass
class ExplicitOutput:
    logits: torch.Tensor            # (B, K) classifier output
    token_logits: torch.Tensor | None   # (B, L, K') per-patch labels (token labelling) or None
    tokens: torch.Tensor            # (B, 1 + L, C) after the final norm
    attn: list[torch.Tensor]        # per layer (B, nh, 1 + L, 1 + L)
    grid: tuple[int, int]           # (h, w)


class ExplicitViT(nn.Module):
    """A timm ``VisionTransformer`` whose forward pass is written with this chapter's exercises.

    The parameters are timm's (``self.vit``), so pretrained weights load unchanged; only the
    computation is ours. Supports timm ViTs with one CLS token, class-token position embedding
    and pre-norm blocks (the ViT/DeiT family), which is what the chapter uses.
    """

    def __init__(self, vit: nn.Module, normalize: bool = False, num_token_classes: int = 0):
        super().__init__()
        if getattr(vit, "num_prefix_tokens", 1) != 1 or getattr(vit, "no_embed_class", False):
            raise ValueError(
                "ExplicitViT needs a timm ViT with exactly one CLS token and a CLS position "
                "embedding (e.g. vit_tiny_patch16_224 or vit_base_patch16_224)."
            )
        self.vit = vit
        self.patch_size = vit.patch_embed.patch_size[0]
        self.num_heads = vit.blocks[0].attn.num_heads
        # Token labelling (Jiang et al., 2021): a linear head that labels every patch token, so
        # training gets a signal per patch, not one per image.
        self.token_head = (nn.Linear(vit.embed_dim, num_token_classes) if num_token_classes
                           else None)
        # Pretrained weights expect their own input normalisation; images arrive in [0, 1].
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.0,) * 3), cfg.get("std", (1.0,) * 3)
        if not normalize:
            mean, std = (0.0,) * 3, (1.0,) * 3
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> ExplicitOutput:
        """images: (B, 3, H, W) -> ExplicitOutput."""
        vit, p = self.vit, self.patch_size
        H, W = images.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}.")
        grid = (H // p, W // p)
        images = (images - self.mean) / self.std
        conv = vit.patch_embed.proj
        pos = vit.pos_embed
        old_grid = tuple(vit.patch_embed.grid_size)
        if grid != old_grid:
            pos = expect_tensor(resize_pos_embed(pos, old_grid, grid), name="resize_pos_embed")
        # Module globals are looked up at call time, so plugged exercises run here.
        patches = expect_tensor(patchify(images, p), name="patchify")
        x = expect_tensor(embed_tokens(patches, conv.weight.flatten(1), conv.bias, vit.cls_token,
                                       pos), name="embed_tokens")
        x = vit.norm_pre(vit.pos_drop(x))
        attns = []
        for blk in vit.blocks:
            a = blk.attn
            y, attn = expect_tensor(
                multi_head_attention(blk.norm1(x), a.qkv.weight, _bias(a.qkv), a.proj.weight,
                                     _bias(a.proj), a.num_heads), name="multi_head_attention")
            x = block_residual(blk, x, y)
            attns.append(attn)
        x = vit.norm(x)
        pooled = {"token": lambda t: t[:, 0], "avg": lambda t: t[:, 1:].mean(dim=1),
                  "max": lambda t: t[:, 1:].amax(dim=1)}[vit.global_pool](x)
        logits = vit.head(vit.head_drop(vit.fc_norm(pooled)))
        token_logits = self.token_head(x[:, 1:]) if self.token_head is not None else None
        return ExplicitOutput(logits=logits, token_logits=token_logits, tokens=x, attn=attns,
                              grid=grid)


def _bias(linear: nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


def cls_attention_map(out: ExplicitOutput, layer: int = -1) -> torch.Tensor:
    """The CLS token's attention over the patch grid at one layer, heads averaged: (B, h, w)."""
    a = out.attn[layer][:, :, 0, 1:].mean(dim=1)
    return a.reshape(a.shape[0], *out.grid)


# ----------------------------------------------------------------------------------------------
# Training: multi-label image classification on ShapeScenes (quick) or PASCAL VOC (full)
# ----------------------------------------------------------------------------------------------

SLUG = "attention"
FULL_MODEL = "vit_base_patch16_224.augreg2_in21k_ft_in1k"


@dataclass(frozen=True)
class AttentionConfig(chapters.ScalePresets):
    """Knobs of chapter 01's run. ``for_scale`` picks quick / smoke / full; change a field with
    ``dataclasses.replace(cfg, depth=2)``."""

    img_size: int = 64
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    global_pool: str = "token"      # "token": the CLS token feeds the classifier; "avg": mean of patches
    dataset: str = "shapes"         # "shapes" (quick) | "voc" (full)
    num_train: int = 1024
    num_val: int = 256
    colors: tuple[str, ...] = ("red", "green", "blue")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    model_name: str = "quick"       # "quick": quick_vit from the size fields; else a timm name
    pretrained: bool = False
    # Evaluated 5 times (and once before training, the baseline) so the plot shows a curve;
    # resume=False: a rerun of the notebook retrains instead of reloading the last run.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=150, batch_size=32, lr=2e-3, weight_decay=0.05, warmup_steps=15, eval_every=30,
        log_every=10, out_dir="runs/attention-quick", resume=False))
    target_metric: str = "exact_match"
    target: float = 0.80            # exact-match accuracy the quick run must reach
    # CPU threads while training (None: torch's default). The quick model's matmuls are too small
    # to split: on a busy 2-core machine 2 threads ran several times slower than 1 (spin-waits).
    num_threads: int | None = 1

    @classmethod
    def quick(cls) -> AttentionConfig:
        """A 4-layer, 96-wide ViT from scratch on 64 x 64 ShapeScenes: CPU, well under a minute."""
        return cls()

    @classmethod
    def smoke(cls) -> AttentionConfig:
        """What nbgrader runs: seconds, not minutes; it proves the code path, not accuracy."""
        q = cls()
        return replace(q, num_train=64, num_val=32, target=0.0,
                       train=replace(q.train, steps=4, batch_size=16, eval_every=2,
                                     progress=False, out_dir=None))

    @classmethod
    def full(cls) -> AttentionConfig:
        """ViT-B/16 (ImageNet-21k, fine-tuned 1k) fine-tuned on VOC12 image-level labels."""
        return cls(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                   dataset="voc", model_name=FULL_MODEL, pretrained=True, target=0.0,
                   target_metric="mAP", num_threads=None,
                   train=TrainConfig(steps=3000, batch_size=32, lr=5e-5, weight_decay=0.05,
                                     warmup_steps=200, eval_every=500, log_every=50,
                                     head_lr_mult=10.0, out_dir="runs/attention-full"))


def build(cfg: AttentionConfig, num_classes: int) -> ExplicitViT:
    """The chapter's model: a timm ViT (quick: tiny, random; full: pretrained) in ExplicitViT.

    num_classes: as the data set counts them, background included; the classifier predicts the
    ``num_classes - 1`` image-level labels and the token head labels every patch with one of
    ``num_classes`` (token labelling needs the background too). The model keeps ``cfg``.
    """
    labels = num_classes - 1
    if cfg.model_name == "quick":
        vit = quick_vit(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                        depth=cfg.depth, num_heads=cfg.num_heads, num_classes=labels,
                        global_pool=cfg.global_pool)
    else:
        vit = create_vit(cfg.model_name, pretrained=cfg.pretrained, img_size=cfg.img_size,
                         num_classes=labels)
    model = ExplicitViT(vit, normalize=cfg.pretrained, num_token_classes=num_classes)
    model.cfg = cfg
    return model


def patch_label_distribution(semantic: torch.Tensor, patch_size: int, num_classes: int,
                             ignore_index: int = 255) -> torch.Tensor:
    """Soft token labels: the class fractions inside each patch, ignore pixels left out.

    semantic: (B, H, W) int64 -> (B, L, num_classes), rows sum to 1 (or 0 if all ignored).
    """
    valid = semantic != ignore_index
    onehot = F.one_hot(semantic.where(valid, 0), num_classes).float() * valid[..., None]
    counts = F.avg_pool2d(onehot.permute(0, 3, 1, 2), patch_size) * patch_size ** 2
    counts = counts.flatten(2).transpose(1, 2)                   # (B, L, K)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


def loss_fn(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Binary cross-entropy on image-level labels, plus token labelling when the model has a head.

    batch["labels"]: (B, K) multi-hot; batch["semantic"]: (B, H, W) for the token labels.
    """
    out = model(batch["image"])
    expect_shape(out.logits, "B K", name="classifier logits", B=batch["labels"].shape[0],
                 K=batch["labels"].shape[1])
    terms = {"cls": F.binary_cross_entropy_with_logits(out.logits, batch["labels"])}
    if out.token_logits is not None and "semantic" in batch:
        p = batch["image"].shape[-1] // out.grid[1]
        target = patch_label_distribution(batch["semantic"], p, out.token_logits.shape[-1])
        terms["token"] = -(target * out.token_logits.log_softmax(-1)).sum(-1).mean()
        terms["mil"] = F.binary_cross_entropy_with_logits(image_scores(out), batch["labels"])
    terms["loss"] = sum(terms.values())
    return terms


def image_scores(out: ExplicitOutput) -> torch.Tensor:
    """Image-level class logits (B, K): the most confident patch per class when the model labels
    tokens (a multiple-instance readout: a class is in the image if some patch shows it),
    otherwise the CLS classifier."""
    if out.token_logits is None:
        return out.logits
    return out.token_logits[..., 1:].amax(dim=1)        # class 0 of the token head = background


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision (area under the precision-recall steps).

    scores, targets: (N, K) -> (K,) AP, NaN for classes with no positive example.
    """
    order = scores.argsort(dim=0, descending=True)
    t = targets.gather(0, order).float()                         # (N, K) sorted by score
    hits = t.cumsum(0)
    precision = hits / torch.arange(1, t.shape[0] + 1, dtype=t.dtype, device=t.device)[:, None]
    npos = t.sum(0)
    return (precision * t).sum(0) / npos.where(npos > 0, torch.nan)


@torch.no_grad()
def metric_fn(model: nn.Module, loader) -> dict[str, float]:
    """mAP over classes, exact-match accuracy (every label right), per-label accuracy; and the
    CLS classifier's exact match beside the token readout's when the model labels tokens."""
    scores, cls_scores, targets = [], [], []
    dev = next(model.parameters()).device
    for batch in loader:
        out = model(batch["image"].to(dev))
        scores.append(image_scores(out).float().cpu())
        cls_scores.append(out.logits.float().cpu())
        targets.append(batch["labels"].cpu() > 0.5)
    from .metrics import gather_over_ranks  # under DDP: every rank's images, in data-set order

    s, c, y = (gather_over_ranks(torch.cat(x)) for x in (scores, cls_scores, targets))
    pred = s > 0
    return {"mAP": average_precision(s, y).nanmean().item(),
            "exact_match": (pred == y).all(dim=1).float().mean().item(),
            "label_acc": (pred == y).float().mean().item(),
            "cls_exact_match": ((c > 0) == y).all(dim=1).float().mean().item()}


def quick_data(cfg: AttentionConfig) -> tuple[ShapeScenes, ShapeScenes]:
    """ShapeScenes train/val splits for this chapter (different seeds, no overlap)."""
    kw = {"size": cfg.img_size, "colors": cfg.colors, "shapes": cfg.shapes}
    return (ShapeScenes(cfg.num_train, seed=0, **kw), ShapeScenes(cfg.num_val, seed=1, **kw))


def full_data(cfg: AttentionConfig) -> tuple[VOCAug, VOCAug]:
    """PASCAL VOC 2012 + SBD: train_aug with random crops and flips, val resized."""
    size = (cfg.img_size, cfg.img_size)
    train = VOCAug(split="train_aug", transform=v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]))
    return train, VOCAug(split="val", transform=v2.Resize(size, antialias=True))


def full_scale_check(cfg: AttentionConfig | None = None) -> str | None:
    """None, or every piece the full-scale run lacks (GPU, weights, VOC), one line each."""
    cfg = cfg or AttentionConfig.full()
    return fullscale.check(SLUG, cfg.model_name if cfg.pretrained else None, gpus=4)


def run(cfg: AttentionConfig) -> chapters.RunResult:
    """Train the chapter's classifier and evaluate it; see ``chapters.RunResult``. The baseline
    is the untrained model; at full scale with pieces missing nothing runs."""
    if cfg.dataset == "voc":
        missing = full_scale_check(cfg)
        if missing:
            return skipped_run(cfg, missing)
        data, collate_fn = full_data(cfg), collate
    elif cfg.dataset == "shapes":
        data, collate_fn = quick_data(cfg), ShapeScenes.collate
    else:
        raise ValueError(f"dataset={cfg.dataset!r}; use 'shapes' or 'voc'.")
    return run_chapter(SLUG, cfg, build, loss_fn, metric_fn, data, data[0].num_classes,
                       collate_fn)


def load(checkpoint: str) -> ExplicitViT:
    """The chapter's model rebuilt from a checkpoint written by ``run`` (eval mode, ``.cfg`` set)."""
    return chapters.load_model(checkpoint, SLUG)
