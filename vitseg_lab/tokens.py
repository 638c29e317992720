"""Chapter 02 — Visual Transformers: a few learned tokens summarise the image.

Wu et al., "Visual Transformers: Token-based Image Representation and Processing for Computer
Vision", arXiv 2006.03677 (2020; the equations follow the later, CVPR-style version); the facts
used here are in METHODS.md §3. There is no official code: this is an open implementation of the
equations as the paper writes them, with the one transpose they need made explicit.

A **VT module** turns a feature map into L visual tokens, relates the tokens, and writes them back:

- tokenizer: each token is a weighted average of pixels, ``T = Aᵀ X`` with a spatial attention
  ``A = softmax_HW(X W_A)`` (filter-based, the first module) or ``A = softmax_HW(X (T_in W_T→R)ᵀ)``
  (recurrent: the previous module's tokens choose where to look, from the second module on);
- transformer on the L tokens, without value projection: ``T' = T + softmax((T K)(T Q)ᵀ) T``,
  ``T_out = T' + ReLU(T' F1) F2``;
- projector: every pixel reads the tokens back, ``X_out = X + softmax_L((X W_Q)(T W_K)ᵀ) T``.

VT-ResNet replaces the last stage of a torchvision ResNet by VT modules (16 tokens, 2 modules for
R18) whose tokens go to avgpool -> FC; VT-FPN replaces the 3x3 output convolutions of an FPN by
8 tokens per level, one transformer across levels, and per-level projectors.

Shapes: B batch · H, W pixels of the image · h, w the feature map's grid · HW = h·w pixels of the
feature map (row-major) · C channels of the feature map *and* the tokens · **L visual tokens**
(the paper's letter; in chapter 01 L counted patch tokens, here a handful of learned tokens
replaces them) · dk the transformer's key/query width (C/2 by default) · K classes.
Weights are stored in the paper's layout, ``X W`` with ``W`` (in, out): no ``nn.Linear``
transposes hide between the equations and the code.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import chapters
from .exercises import expect_shape
from .train import TrainConfig

__all__ = [
    "PAPER",
    "VTFPN",
    "ConvHead",
    "PlainFPN",
    "SegNet",
    "TokensConfig",
    "VTHead",
    "VTOutput",
    "VTResNet",
    "VisualTransformer",
    "build",
    "count_gmacs",
    "filter_attention",
    "flops_table",
    "full_data",
    "full_scale_check",
    "gather_tokens",
    "load",
    "loss_fn",
    "metric_fn",
    "print_flops_table",
    "project",
    "projector_attention",
    "quick_data",
    "quick_flops",
    "recurrent_attention",
    "run",
    "token_explorer",
    "token_transformer",
]

#: The paper's numbers (METHODS.md §3; GFLOPs are multiply-adds, as in the paper).
PAPER = {
    "r18_top1": 69.9, "vt_r18_top1": 72.0, "r34_top1": 73.3, "vt_r34_top1": 74.8,
    "r18_gflops": 1.81, "vt_r18_gflops": 1.58, "r18_stage5_reduction": 2.4,
    "fpn_coco_gflops": 55.1, "vt_fpn_coco_gflops": 8.5, "fpn_coco_reduction": 6.48,
    "fpn_lip_gflops": 12.8, "vt_fpn_lip_gflops": 2.0, "fpn_lip_reduction": 6.4,
    "fpn_r50_coco_miou": 40.78, "vt_fpn_r50_coco_miou": 41.00,
    "fpn_r50_lip_miou": 47.04, "vt_fpn_r50_lip_miou": 47.39,
}


# ----------------------------------------------------------------------------------------------
# Exercises
# ----------------------------------------------------------------------------------------------

def filter_attention(features: Tensor, weight: Tensor) -> Tensor:
    """Exercise 2.1 · the filter-based tokenizer's spatial attention, A = softmax_HW(X W_A).

    Each of the L columns of ``X W_A`` scores every pixel for one token; the softmax runs over the
    **pixels** (dim 1), so column l is token l's spatial attention and sums to 1 over the HW pixels.

    Args:
        features: (B, HW, C) the feature map X, pixels in row-major order.
        weight: (C, L) W_A, one filter per token.
    Returns:
        (B, HW, L) A; ``A[b, :, l]`` sums to 1.
    """
    ### BEGIN SOLUTION
    return (features @ weight).softmax(dim=1)
    ### END SOLUTION


def gather_tokens(features: Tensor, attention: Tensor) -> Tensor:
    """Exercise 2.2 · the tokens, T = Aᵀ X: token l is the A[:, l]-weighted average of the pixels.

    Args:
        features: (B, HW, C) the feature map X.
        attention: (B, HW, L) a spatial attention A (each column sums to 1 over the pixels).
    Returns:
        (B, L, C) the visual tokens T.
    """
    ### BEGIN SOLUTION
    return attention.transpose(1, 2) @ features
    ### END SOLUTION


def recurrent_attention(features: Tensor, tokens: Tensor, weight: Tensor) -> Tensor:
    """Exercise 2.3 · the recurrent tokenizer's spatial attention, A = softmax_HW(X W_Rᵀ).

    The previous module's tokens make this module's filters: W_R = T_in W_T→R, one row per
    token. The paper writes ``X W_R``; with X (HW, C) and W_R (L, C) the product needs W_Rᵀ.

    Args:
        features: (B, HW, C) the feature map X.
        tokens: (B, L, C) T_in, the previous module's output tokens.
        weight: (C, C) W_T→R.
    Returns:
        (B, HW, L) A; ``A[b, :, l]`` sums to 1 over the pixels.
    """
    ### BEGIN SOLUTION
    w_r = tokens @ weight                                    # (B, L, C): one filter per token
    return (features @ w_r.transpose(1, 2)).softmax(dim=1)
    ### END SOLUTION


def token_transformer(tokens: Tensor, key_weight: Tensor, query_weight: Tensor,
                      f1_weight: Tensor, f2_weight: Tensor) -> Tensor:
    """Exercise 2.4 · the token transformer as the paper writes it (no value projection, no norm).

    T' = T + softmax((T K)(T Q)ᵀ) T, the softmax over the last axis (each row of the L x L
    matrix sums to 1, so token i adds a weighted average of all tokens); then
    T_out = T' + ReLU(T' F1) F2.

    Args:
        tokens: (B, L, C) T.
        key_weight: (C, dk) K. query_weight: (C, dk) Q.
        f1_weight: (C, C) F1. f2_weight: (C, C) F2.
    Returns:
        (B, L, C) T_out.
    """
    ### BEGIN SOLUTION
    logits = (tokens @ key_weight) @ (tokens @ query_weight).transpose(1, 2)    # (B, L, L)
    mixed = tokens + logits.softmax(dim=-1) @ tokens
    return mixed + torch.relu(mixed @ f1_weight) @ f2_weight
    ### END SOLUTION


def projector_attention(features: Tensor, tokens: Tensor, query_weight: Tensor,
                        key_weight: Tensor) -> Tensor:
    """Exercise 2.5 · the projector's attention, P = softmax_L((X W_Q)(T W_K)ᵀ).

    Every pixel queries the L tokens; the softmax runs over the **tokens** (dim -1), so each
    pixel's row sums to 1: how much of each token it reads back.

    Args:
        features: (B, HW, C) X_in. tokens: (B, L, C) T.
        query_weight: (C, C) W_Q. key_weight: (C, C) W_K.
    Returns:
        (B, HW, L) P; ``P[b, i, :]`` sums to 1.
    """
    ### BEGIN SOLUTION
    logits = (features @ query_weight) @ (tokens @ key_weight).transpose(1, 2)  # (B, HW, L)
    return logits.softmax(dim=-1)
    ### END SOLUTION


def project(features: Tensor, tokens: Tensor, attention: Tensor) -> Tensor:
    """Exercise 2.6 · write the tokens back to the pixels, X_out = X_in + P T.

    Args:
        features: (B, HW, C) X_in. tokens: (B, L, C) T.
        attention: (B, HW, L) P, each row summing to 1 over the tokens.
    Returns:
        (B, HW, C) X_out.
    """
    ### BEGIN SOLUTION
    return features + attention @ tokens
    ### END SOLUTION


# ----------------------------------------------------------------------------------------------
# The VT module (calls the exercises through this module's globals, so plug() reaches them)
# ----------------------------------------------------------------------------------------------

def _param(*shape: int, fan_in: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) / math.sqrt(fan_in))


@dataclass
class VTOutput:
    """What one VT module returns.

    features: (B, HW, C) after the projector (the input itself when the module does not project).
    tokens: (B, L, C) after the transformer. attention: (B, HW, L) the tokenizer's A.
    readback: (B, HW, L) the projector's P, or None.
    """

    features: Tensor
    tokens: Tensor
    attention: Tensor
    readback: Tensor | None


class VisualTransformer(nn.Module):
    """One VT module: tokenizer -> transformer -> projector, all parameters in the paper's layout.

    Args:
        channels: C (feature map and tokens). num_tokens: L (a filter-based module; a recurrent
            one makes as many tokens as it receives). recurrent: use the recurrent tokenizer
            (needs the previous module's tokens). key_dim: dk of the transformer's K and Q
            (default C/2, the paper's earlier versions). project: run the projector (a
            classifier's last module does not need the feature map back).
    """

    def __init__(self, channels: int, num_tokens: int = 16, *, recurrent: bool = False,
                 key_dim: int | None = None, project: bool = True):
        super().__init__()
        C, dk = channels, key_dim or max(1, channels // 2)
        self.channels, self.num_tokens, self.recurrent = C, num_tokens, recurrent
        # W_A (C, L) for a filter-based tokenizer, W_T→R (C, C) for a recurrent one
        self.tokenizer = _param(C, C if recurrent else num_tokens, fan_in=C)
        self.key, self.query = _param(C, dk, fan_in=C), _param(C, dk, fan_in=C)
        self.f1, self.f2 = _param(C, C, fan_in=C), _param(C, C, fan_in=C)
        self.proj_query = _param(C, C, fan_in=C) if project else None
        self.proj_key = _param(C, C, fan_in=C) if project else None

    def forward(self, features: Tensor, tokens_in: Tensor | None = None) -> VTOutput:
        """features: (B, HW, C); tokens_in: (B, L, C), needed by a recurrent module."""
        B, HW, C = features.shape
        if self.recurrent:
            if tokens_in is None:
                raise ValueError("a recurrent VT module needs the previous module's tokens: call "
                                 "it as module(features, tokens_in); the first module is "
                                 "filter-based (recurrent=False).")
            L = tokens_in.shape[1]
            attn = recurrent_attention(features, tokens_in, self.tokenizer)
            what = "recurrent_attention(...)"
        else:
            L = self.num_tokens
            attn = filter_attention(features, self.tokenizer)
            what = "filter_attention(...)"
        expect_shape(attn, "B HW L", name=what, B=B, HW=HW, L=L)
        tokens = gather_tokens(features, attn)
        expect_shape(tokens, "B L C", name="gather_tokens(...)", B=B, L=L, C=C)
        tokens = token_transformer(tokens, self.key, self.query, self.f1, self.f2)
        expect_shape(tokens, "B L C", name="token_transformer(...)", B=B, L=L, C=C)
        if self.proj_query is None:
            return VTOutput(features, tokens, attn, None)
        readback = projector_attention(features, tokens, self.proj_query, self.proj_key)
        expect_shape(readback, "B HW L", name="projector_attention(...)", B=B, HW=HW, L=L)
        out = project(features, tokens, readback)
        expect_shape(out, "B HW C", name="project(...)", B=B, HW=HW, C=C)
        return VTOutput(out, tokens, attn, readback)


def _flat(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, HW, C), row-major."""
    return x.flatten(2).transpose(1, 2)


def _unflat(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, HW, C) -> (B, C, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


class VTHead(nn.Module):
    """VT modules on a feature map: the first filter-based, the next recurrent.

    (B, C, h, w) -> ((B, C, h, w), list of VTOutput).
    """

    def __init__(self, channels: int, num_tokens: int, num_modules: int = 2,
                 key_dim: int | None = None):
        super().__init__()
        self.vt = nn.ModuleList(VisualTransformer(channels, num_tokens, recurrent=i > 0,
                                                  key_dim=key_dim) for i in range(num_modules))

    def forward(self, x: Tensor) -> tuple[Tensor, list[VTOutput]]:
        grid = tuple(x.shape[-2:])
        feats, tokens, outs = _flat(x), None, []
        for module in self.vt:
            o = module(feats, tokens)
            feats, tokens = o.features, o.tokens
            outs.append(o)
        return _unflat(feats, grid), outs


class ConvHead(nn.Module):
    """The baseline: a residual pair of 3x3 convolutions C -> width -> C, BN + ReLU between.

    (B, C, h, w) -> ((B, C, h, w), []).
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: Tensor) -> tuple[Tensor, list]:
        return x + self.body(x), []


def conv_stem(channels: int, patch_size: int = 4) -> nn.Sequential:
    """A patchify convolution (``patch_size`` x ``patch_size``, stride ``patch_size``) 3 -> C and
    a 3x3 convolution C -> C, each with BN + ReLU: (B, 3, H, W) -> (B, C, H/p, W/p).

    A 4 x 4 patch sees one period of every ShapeScenes texture, so each pixel of the feature map
    can tell the shapes apart; the 3 x 3 convolution gives it its neighbours."""
    return nn.Sequential(
        nn.Conv2d(3, channels, patch_size, stride=patch_size, bias=False),
        nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True))


@dataclass
class SegOutput:
    """logits: (B, K, H, W) at the image size · vt: one VTOutput per VT module (empty for the
    conv baseline) · grid: (h, w) of the feature map."""

    logits: Tensor
    vt: list[VTOutput]
    grid: tuple[int, int]


class SegNet(nn.Module):
    """Quick-scale segmenter: conv stem -> head (VT modules or the conv baseline) -> 1x1 classifier,
    logits upsampled bilinearly to the image. Images arrive in [0, 1] and are centred here."""

    def __init__(self, stem: nn.Module, head: nn.Module, channels: int, num_classes: int):
        super().__init__()
        self.stem, self.head = stem, head
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, images: Tensor, size: Sequence[int] | None = None) -> SegOutput:
        """images: (B, 3, H, W) in [0, 1]; size: logits size (default (H, W))."""
        x = self.stem(images - 0.5)
        grid = tuple(x.shape[-2:])
        x, vt = self.head(x)
        logits = F.interpolate(self.classifier(x), size=tuple(size or images.shape[-2:]),
                               mode="bilinear", align_corners=False)
        return SegOutput(logits, vt, grid)


# ----------------------------------------------------------------------------------------------
# VT-ResNet (classification) and VT-FPN (segmentation)
# ----------------------------------------------------------------------------------------------

class VTResNet(nn.Module):
    """A torchvision ResNet whose last stage (``layer4``) is replaced by VT modules.

    The stage-4 map (``layer3``'s output: 14 x 14 x 256 for R18/34 at 224) goes through
    ``num_modules`` VT modules of ``num_tokens`` tokens (the first filter-based, the others
    recurrent; every module but the last projects back so the next one tokenizes the updated
    map); the last module's tokens are averaged and classified (the paper: avgpool -> FC).

    Args:
        resnet: a torchvision ``ResNet`` (its ``layer4``, ``avgpool`` and ``fc`` are dropped).
        num_classes: K. num_tokens: L (paper: 16). num_modules: 2 for R18, 3 for R34/50/101.
    """

    def __init__(self, resnet: nn.Module, num_classes: int, num_tokens: int = 16,
                 num_modules: int = 2):
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                  resnet.layer1, resnet.layer2, resnet.layer3)
        C = _out_channels(resnet.layer3)
        self.vt = nn.ModuleList(
            VisualTransformer(C, num_tokens, recurrent=i > 0, project=i < num_modules - 1)
            for i in range(num_modules))
        self.fc = nn.Linear(C, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) normalised -> (B, K) logits."""
        feats, tokens = _flat(self.stem(images)), None
        for module in self.vt:
            o = module(feats, tokens)
            feats, tokens = o.features, o.tokens
        return self.fc(tokens.mean(dim=1))


def _out_channels(stage: nn.Module) -> int:
    return [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class PlainFPN(nn.Module):
    """The FPN of Panoptic FPN: 1x1 laterals, top-down sum, a 3x3 output conv per level.

    features: 4 x (B, C_i, H_i, W_i), fine to coarse -> 4 x (B, C, H_i, W_i).
    """

    def __init__(self, in_channels: Sequence[int] = (256, 512, 1024, 2048), channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1)
                                    for _ in in_channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, lat)]


class VTFPN(nn.Module):
    """VT-FPN: the 3x3 output convolutions of the FPN replaced by visual tokens.

    Per level, a 1x1 lateral to C and a filter tokenizer of ``tokens_per_level`` tokens; one token
    transformer over all levels' tokens; per level, a projector writes that level's (now
    cross-level) tokens back to its map. The top-down sum is left out: the transformer is what
    exchanges information between levels.

    features: 4 x (B, C_i, H_i, W_i) -> 4 x (B, C, H_i, W_i).
    """

    def __init__(self, in_channels: Sequence[int] = (256, 512, 1024, 2048), channels: int = 256,
                 tokens_per_level: int = 8):
        super().__init__()
        C, n = channels, len(in_channels)
        self.tokens_per_level = tokens_per_level
        self.lateral = nn.ModuleList(nn.Conv2d(c, C, 1) for c in in_channels)
        self.tokenizer = nn.ParameterList(_param(C, tokens_per_level, fan_in=C) for _ in range(n))
        self.key, self.query = _param(C, C // 2, fan_in=C), _param(C, C // 2, fan_in=C)
        self.f1, self.f2 = _param(C, C, fan_in=C), _param(C, C, fan_in=C)
        self.proj_query = nn.ParameterList(_param(C, C, fan_in=C) for _ in range(n))
        self.proj_key = nn.ParameterList(_param(C, C, fan_in=C) for _ in range(n))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        maps = [_flat(conv(f)) for conv, f in zip(self.lateral, features)]
        grids = [tuple(f.shape[-2:]) for f in features]
        tokens = [gather_tokens(x, filter_attention(x, w)) for x, w in zip(maps, self.tokenizer)]
        mixed = token_transformer(torch.cat(tokens, dim=1), self.key, self.query, self.f1,
                                  self.f2).split(self.tokens_per_level, dim=1)
        outs = []
        for x, t, wq, wk, g in zip(maps, mixed, self.proj_query, self.proj_key, grids):
            outs.append(_unflat(project(x, t, projector_attention(x, t, wq, wk)), g))
        return outs


# ----------------------------------------------------------------------------------------------
# Configuration, data, model, loss, metric, run
# ----------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TokensConfig(chapters.ScalePresets):
    """Knobs of chapter 02's runs. ``for_scale`` picks quick / smoke / full.

    Quick: ShapeScenes segmentation with a small conv stem (stride ``patch_size``, ``channels``
    wide) and ``num_modules`` VT modules of ``num_tokens`` tokens (``head="vt"``), or the conv
    baseline (``head="conv"``) of about the same parameter count. The training loss reads every
    ``loss_stride``-th label pixel (bilinear logits at that size: 4x cheaper on a CPU at 2, and
    the objects are 12-28 pixels across); evaluation uses every pixel. Full: VT-ResNet (``arch``) on ImageNet (``head="conv"`` is the
    plain ResNet).
    """

    dataset: str = "shapes"            # "shapes" | "imagenet"
    head: str = "vt"                   # "vt" | "conv" (the baseline)
    baseline: bool = True              # run() also trains the baseline (head="conv") in the run
    # quick model
    img_size: int = 64
    patch_size: int = 4
    channels: int = 32
    num_tokens: int = 8
    num_modules: int = 2
    key_dim: int = 0                   # 0: C / 2
    loss_stride: int = 2
    # full model and data
    arch: str = "resnet18"
    data_root: str = ""                # ImageNet root ("" = $VITSEG_DATA/imagenet or data/imagenet)
    # quick data
    num_train: int = 2048
    num_val: int = 256
    colors: tuple[str, ...] = ("red", "green", "blue")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    min_objects: int = 1
    max_objects: int = 3
    target: float = 0.80
    target_metric: str = "mIoU"
    # One thread: the quick model's ops are too small to split, and on a busy 2-core machine a
    # second thread spin-waits (chapters 01 and 03 measured several times slower with 2).
    num_threads: int | None = 1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=200, batch_size=16, lr=4e-3, weight_decay=0.01, warmup_steps=15,
        schedule="cosine", eval_every=0, log_every=25, grad_clip=1.0))

    @classmethod
    def quick(cls) -> TokensConfig:
        """Small conv stem + 2 VT modules of 8 tokens on 64 x 64 ShapeScenes, one CPU thread."""
        return cls()

    @classmethod
    def smoke(cls) -> TokensConfig:
        """What nbgrader runs: a few steps that prove the code path, not accuracy."""
        q = cls.quick()
        return replace(q, num_train=32, num_val=16, target=0.0,
                       train=replace(q.train, steps=3, batch_size=8, warmup_steps=1,
                                     progress=False))

    @classmethod
    def full(cls) -> TokensConfig:
        """VT-ResNet-18 on ImageNet: 2 VT modules of 16 tokens on the 14 x 14 x 256 stage-4 map,
        90 epochs of batch 256 (the paper's default recipe; 72.0 top-1, R18 69.9). fit() trains
        with AdamW (the paper: SGD, lr 0.1); lr 1e-3 x batch/256, cosine, wd 0.05."""
        steps = 90 * 1_281_167 // 256
        return cls(dataset="imagenet", arch="resnet18", num_tokens=16, num_modules=2,
                   img_size=224, num_train=0, num_val=0, target=PAPER["vt_r18_top1"] / 100,
                   target_metric="top1", num_threads=None,
                   train=TrainConfig(steps=steps, batch_size=256, lr=1e-3, weight_decay=0.05,
                                     warmup_steps=5 * 5005, schedule="cosine", grad_clip=None,
                                     eval_every=5005 * 5, log_every=100, ckpt_every=5005,
                                     num_workers=16, out_dir="runs/ch02_vt_r18_full"))


def vt_parameter_count(cfg: TokensConfig) -> int:
    """Parameters of the quick model's VT modules (the budget the conv baseline matches)."""
    C, L, dk = cfg.channels, cfg.num_tokens, cfg.key_dim or cfg.channels // 2
    per = 2 * C * dk + 2 * C * C + 2 * C * C
    return C * L + (cfg.num_modules - 1) * C * C + cfg.num_modules * per


def build(cfg: TokensConfig, num_classes: int) -> nn.Module:
    """The chapter's model for ``cfg`` (``model.cfg`` keeps it).

    shapes + vt: ``SegNet`` with a ``VTHead`` · shapes + conv: ``SegNet`` with a ``ConvHead``
    whose width matches the VT modules' parameter count · imagenet + vt: ``VTResNet`` on a
    torchvision ResNet · imagenet + conv: the torchvision ResNet itself.
    """
    if cfg.head not in ("vt", "conv"):
        raise ValueError(f"head={cfg.head!r}; use 'vt' or 'conv'.")
    if cfg.dataset == "shapes":
        C = cfg.channels
        if cfg.head == "vt":
            head: nn.Module = VTHead(C, cfg.num_tokens, cfg.num_modules, cfg.key_dim or None)
        else:  # 2 * 9 * C * width + C (bias) + 2 * width (BN) parameters
            width = max(1, round(vt_parameter_count(cfg) / (18 * C + 2)))
            head = ConvHead(C, width)
        model: nn.Module = SegNet(conv_stem(C, cfg.patch_size), head, C, num_classes)
    elif cfg.dataset == "imagenet":
        import torchvision

        if not hasattr(torchvision.models, cfg.arch):
            raise ValueError(f"arch={cfg.arch!r} is not a torchvision model; use resnet18, "
                             "resnet34, resnet50 or resnet101.")
        resnet = getattr(torchvision.models, cfg.arch)(num_classes=num_classes)
        model = (VTResNet(resnet, num_classes, cfg.num_tokens, cfg.num_modules)
                 if cfg.head == "vt" else resnet)
    else:
        raise ValueError(f"dataset={cfg.dataset!r}; use 'shapes' or 'imagenet'.")
    model.cfg = cfg
    return model


def loss_fn(model: nn.Module, batch: dict) -> dict[str, Tensor]:
    """Pixel cross-entropy (ignore 255) on ShapeScenes; image cross-entropy on ImageNet."""
    from .train import unwrap

    cfg = unwrap(model).cfg
    if cfg.dataset == "shapes":
        s = cfg.loss_stride
        labels = batch["semantic"][:, s // 2::s, s // 2::s]
        out = model(batch["image"], size=labels.shape[-2:])
        return {"loss": F.cross_entropy(out.logits, labels, ignore_index=255)}
    return {"loss": F.cross_entropy(model(batch["image"]), batch["label"])}


@torch.no_grad()
def metric_fn(model: nn.Module, loader) -> dict[str, Any]:
    """mIoU and pixel accuracy (ShapeScenes, one confusion matrix over the loader), or top-1 and
    top-5 accuracy (ImageNet)."""
    from .metrics import SegMeter, sum_over_ranks

    if model.cfg.dataset == "shapes":
        meter = SegMeter(model.num_classes)
        for batch in loader:
            meter.update(model(batch["image"]).logits.argmax(1), batch["semantic"])
        m = meter.compute()
        return {"mIoU": m["mIoU"], "pixel_acc": m["pixel_acc"], "iou": m["iou"]}
    top1 = top5 = n = 0
    for batch in loader:
        logits = model(batch["image"])
        pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = pred == batch["label"][:, None]
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(dim=1).sum())
        n += len(pred)
    top1, top5, n = sum_over_ranks((top1, top5, n))  # under DDP: every rank's images
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1)}


def quick_data(cfg: TokensConfig):
    """ShapeScenes train / val splits (different seeds, no overlap)."""
    from .data.shapes import ShapeScenes

    kw = {"size": cfg.img_size, "colors": cfg.colors, "shapes": cfg.shapes,
          "min_objects": cfg.min_objects, "max_objects": cfg.max_objects}
    return ShapeScenes(cfg.num_train, seed=0, **kw), ShapeScenes(cfg.num_val, seed=1, **kw)


def imagenet_root(cfg: TokensConfig) -> str:
    from .data.common import data_root

    return cfg.data_root or str(data_root() / "imagenet")


class _DictSamples(torch.utils.data.Dataset):
    """torchvision's (image, label) pairs as the course's {"image", "label"} dicts."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        image, label = self.ds[i]
        return {"image": image, "label": label}


def imagenet_data(cfg: TokensConfig):
    """torchvision's ``ImageNet`` over the official archives: train (random-resized crop 224,
    flip) and val (resize 256, centre crop 224), ImageNet-normalised."""
    from torchvision.datasets import ImageNet
    from torchvision.transforms import v2

    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = v2.Compose([v2.RandomResizedCrop(cfg.img_size, antialias=True),
                           v2.RandomHorizontalFlip(), *norm])
    val_tf = v2.Compose([v2.Resize(round(cfg.img_size * 256 / 224), antialias=True),
                         v2.CenterCrop(cfg.img_size), *norm])
    root = imagenet_root(cfg)
    return (_DictSamples(ImageNet(root, split="train", transform=train_tf)),
            _DictSamples(ImageNet(root, split="val", transform=val_tf)))


full_data = imagenet_data  # the CLI's `eval` reads a full-scale checkpoint's data through this


_IMAGENET_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                   "ILSVRC2012_devkit_t12.tar.gz")


def full_scale_check(cfg: TokensConfig | None = None) -> str | None:
    """Every piece the full-scale run lacks, one ``- `` line each with the command (after the
    course's header line, ``vitseg_lab.fullscale``); None when it can start."""
    from .chapters import get
    from .fullscale import gpu_line

    cfg = cfg or TokensConfig.full()
    missing = [gpu_line("tokens", gpus=8)]
    if cfg.dataset == "imagenet":
        root = imagenet_root(cfg)
        parsed = os.path.exists(os.path.join(root, "meta.bin")) and all(
            os.path.isdir(os.path.join(root, s)) for s in ("train", "val"))
        absent = [f for f in _IMAGENET_FILES if not os.path.exists(os.path.join(root, f))]
        if not parsed and absent:
            missing.append(f"ImageNet-1k (ILSVRC2012) in {root}: download {', '.join(absent)} "
                           "from https://image-net.org/download-images (a free account; no "
                           f"public mirror) into {root}/, then `python -c \"from "
                           "torchvision.datasets import ImageNet; ImageNet('"
                           f"{root}', split='train'); ImageNet('{root}', split='val')\"` "
                           "unpacks them once.")
    missing = [m for m in missing if m]
    if not missing:
        return None
    head = (f"Full scale of chapter {get('tokens').nn} (tokens) cannot start on this machine; "
            f"{len(missing)} missing piece{'s' if len(missing) > 1 else ''}:")
    return "\n".join([head, *(f"- {m}" for m in missing)])


def run(cfg: TokensConfig):
    """Train the chapter's model (and, with ``cfg.baseline``, the conv baseline in the same run).

    -> ``chapters.RunResult``; full scale with pieces missing: ``skipped`` = the check's lines.
    """
    from .chapters import RunResult, checkpoint_meta
    from .train import fit

    t0 = time.perf_counter()
    if cfg.dataset == "imagenet":
        msg = full_scale_check(cfg)
        if msg:
            return RunResult(None, None, {}, cfg.target_metric, cfg.target,
                             time.perf_counter() - t0, asdict(cfg), skipped=msg)
        from .data.common import collate

        train_ds, val_ds = imagenet_data(cfg)
        num_classes = 1000
    elif cfg.dataset == "shapes":
        train_ds, val_ds = quick_data(cfg)
        num_classes, collate = train_ds.num_classes, train_ds.collate
    else:
        raise ValueError(f"dataset={cfg.dataset!r}; use 'shapes' or 'imagenet'.")

    def train_one(c: TokensConfig):
        torch.manual_seed(c.train.seed)
        model = build(c, num_classes)
        history = fit(model, train_ds, c.train, loss_fn, metric_fn, val_data=val_ds,
                      collate_fn=collate, meta=checkpoint_meta("tokens", c, num_classes))
        return model, history

    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        model, history = train_one(cfg)
        baseline = {}
        if cfg.baseline:
            out_dir = cfg.train.out_dir and cfg.train.out_dir + "_baseline"
            base_cfg = replace(cfg, head="conv" if cfg.head == "vt" else "vt", baseline=False,
                               train=replace(cfg.train, out_dir=out_dir))
            baseline = train_one(base_cfg)[1].final
    finally:
        torch.set_num_threads(threads)
    return RunResult(model, history, history.final, cfg.target_metric, cfg.target,
                     time.perf_counter() - t0, asdict(cfg), baseline=baseline,
                     checkpoint=(os.path.join(cfg.train.out_dir, "last.pt")
                                 if cfg.train.out_dir else None), val=val_ds)


def load(checkpoint: str) -> nn.Module:
    """The model rebuilt from a checkpoint written by ``run`` (``fit(..., meta=...)``)."""
    from .chapters import load_model

    return load_model(checkpoint, "tokens")


# ----------------------------------------------------------------------------------------------
# Cost: measured multiply-adds beside the paper's (meta device: shapes only, no memory)
# ----------------------------------------------------------------------------------------------

def count_gmacs(module: nn.Module, *inputs: Any) -> float:
    """G multiply-adds of ``module(*inputs)`` by ``torch.utils.flop_counter.FlopCounterMode``
    (it counts 2 FLOPs per multiply-add; the paper's GFLOPs are multiply-adds, so we halve)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() / 2e9


def _resnet_features(size: tuple[int, int], channels: Sequence[int] = (256, 512, 1024, 2048),
                     device: str = "meta") -> list[Tensor]:
    """Zero tensors shaped like a torchvision ResNet-50's C2..C5 at image ``size`` (7x7 stride-2
    conv, 3x3 stride-2 max-pool, then a stride-2 3x3 per stage: sizes by the conv formula)."""
    def down(n: int, k: int, p: int) -> int:
        return (n + 2 * p - k) // 2 + 1

    hw = [down(down(n, 7, 3), 3, 1) for n in size]
    feats = []
    for i, c in enumerate(channels):
        if i:
            hw = [down(n, 3, 1) for n in hw]
        feats.append(torch.zeros(1, c, *hw, device=device))
    return feats


def flops_table(quick_cfg: TokensConfig | None = None) -> list[dict[str, Any]]:
    """Measured G multiply-adds beside the paper's: R18 stage 5 vs 2 VT modules, R18 vs VT-R18,
    FPN vs VT-FPN (R50, COCO-Stuff 800 x 1216 and LIP 473 x 473), and the quick model's heads."""
    import torchvision

    rows = []
    with torch.device("meta"):
        r18 = torchvision.models.resnet18().eval()
        vt18 = VTResNet(torchvision.models.resnet18(), 1000, 16, 2).eval()
        x = torch.zeros(1, 3, 224, 224)
        stage4 = torch.zeros(1, 256, 14, 14)
        s_conv = count_gmacs(r18.layer4, stage4)
        s_vt = count_gmacs(lambda f: [vt18.vt[0](f), vt18.vt[1](f, torch.zeros(1, 16, 256))],
                           _flat(stage4))
        rows.append({"what": "R18 stage 5 -> 2 VT modules (16 tokens, C 256)", "ours": s_conv,
                     "ours_vt": s_vt, "paper": None, "paper_vt": None,
                     "paper_ratio": PAPER["r18_stage5_reduction"]})
        rows.append({"what": "ResNet-18 -> VT-R18, 224 x 224", "ours": count_gmacs(r18, x),
                     "ours_vt": count_gmacs(vt18, x), "paper": PAPER["r18_gflops"],
                     "paper_vt": PAPER["vt_r18_gflops"], "paper_ratio": None})
    for name, size, key in (("COCO-Stuff 800 x 1216", (800, 1216), "coco"),
                            ("LIP 473 x 473", (473, 473), "lip")):
        feats = _resnet_features(size)
        with torch.device("meta"):
            fpn, vtfpn = PlainFPN().eval(), VTFPN().eval()
            rows.append({"what": f"R50 FPN module -> VT-FPN, {name}", "ours": count_gmacs(fpn, feats),
                         "ours_vt": count_gmacs(vtfpn, feats), "paper": PAPER[f"fpn_{key}_gflops"],
                         "paper_vt": PAPER[f"vt_fpn_{key}_gflops"],
                         "paper_ratio": PAPER[f"fpn_{key}_reduction"]})
    for r in rows:
        r["ratio"] = r["ours"] / r["ours_vt"]
    return rows + quick_flops(quick_cfg)


def quick_flops(cfg: TokensConfig | None = None) -> list[dict[str, Any]]:
    """The quick model's rows of ``flops_table``: its VT head vs the conv head of equal
    parameters on the stem's feature map, and the whole models, in G multiply-adds."""
    q = cfg or TokensConfig.quick()
    rows = []
    with torch.device("meta"):
        vt, conv = build(q, 10), build(replace(q, head="conv"), 10)
        x = torch.zeros(1, 3, q.img_size, q.img_size)
        C, s = q.channels, q.img_size // q.patch_size
        feat = torch.zeros(1, C, s, s)
        rows.append({"what": f"quick head: {q.num_modules} VT modules vs conv pair, {s} x {s} x {C}",
                     "ours": count_gmacs(conv.head, feat), "ours_vt": count_gmacs(vt.head, feat),
                     "paper": None, "paper_vt": None, "paper_ratio": None,
                     "params": sum(p.numel() for p in conv.head.parameters()),
                     "params_vt": sum(p.numel() for p in vt.head.parameters())})
        rows.append({"what": f"quick model, {q.img_size} x {q.img_size}",
                     "ours": count_gmacs(conv, x), "ours_vt": count_gmacs(vt, x),
                     "paper": None, "paper_vt": None, "paper_ratio": None})
    for r in rows:
        r["ratio"] = r["ours"] / r["ours_vt"]
    return rows


def print_flops_table(rows: list[dict[str, Any]]) -> None:
    """``flops_table``'s rows as text (G multiply-adds = the paper's GFLOPs)."""
    def g(v):
        return "" if v is None else (f"{v:.4f}" if v < 0.1 else f"{v:.2f}")

    print(f"{'G multiply-adds':<48}{'conv':>9}{'VT':>9}{'ratio':>7}   paper")
    for r in rows:
        paper = ""
        if r["paper"] is not None:
            paper = f"{r['paper']} -> {r['paper_vt']}"
        if r["paper_ratio"] is not None:
            paper += f" ({r['paper_ratio']}x)"
        extra = (f"   params {r['params']:,} vs {r['params_vt']:,}" if "params" in r else "")
        print(f"{r['what']:<48}{g(r['ours']):>9}{g(r['ours_vt']):>9}{r['ratio']:>6.1f}x   "
              f"{paper}{extra}")


# ----------------------------------------------------------------------------------------------
# The token explorer (ipywidgets + matplotlib), driven by the learner's plugged functions
# ----------------------------------------------------------------------------------------------

def token_explorer(model: nn.Module, dataset, index: int = 0):
    """Pick a token: the pixels it gathers (its column of A); pick a pixel: the tokens the
    projector reads back there (its row of P). Every map comes from a forward pass of ``model``,
    i.e. from the learner's plugged tokenizer, transformer and projector.

    Args:
        model: a ``SegNet`` with a ``VTHead`` (``build(cfg, K)`` with ``head="vt"``).
        dataset: items with "image" (3, H, W) and "semantic" (H, W).
    Returns:
        a VBox; ``.state`` holds the choice, ``gather`` (h, w) token's attention column,
        ``regions`` (h, w) the token of largest attention per pixel, ``readback`` (L,) the
        pixel's row of P, and ``prediction`` (H, W).
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from . import viz

    if not getattr(model.head, "vt", None):
        raise ValueError("the token explorer needs a model with VT modules: build(cfg, K) with "
                         "cfg.head='vt'.")
    model.eval()
    n_mod = len(model.head.vt)
    with torch.no_grad():
        probe = model(dataset[index]["image"][None].to(next(model.parameters()).device))
    h, w = probe.grid
    L = probe.vt[0].attention.shape[-1]
    scene = widgets.IntSlider(value=index, min=0, max=len(dataset) - 1, description="scene")
    module = widgets.Dropdown(options=[(f"{i + 1} ({'recurrent' if i else 'filter'})", i)
                                       for i in range(n_mod)], value=0, description="VT module")
    token = widgets.IntSlider(value=0, min=0, max=L - 1, description="token")
    row = widgets.IntSlider(value=h // 2, min=0, max=h - 1, description="pixel row")
    col = widgets.IntSlider(value=w // 2, min=0, max=w - 1, description="pixel col")
    out = widgets.Output()
    box = widgets.VBox([widgets.HBox([scene, module, token]), widgets.HBox([row, col]), out])
    box.state = {}
    cache: dict[int, SegOutput] = {}

    def forward(i: int) -> SegOutput:
        if i not in cache:  # one forward per scene, through the learner's functions
            cache.clear()
            with torch.no_grad():
                dev = next(model.parameters()).device
                cache[i] = model(dataset[i]["image"][None].to(dev))
        return cache[i]

    def draw():
        item = dataset[scene.value]
        image = item["image"]
        res, m, t = forward(scene.value), module.value, token.value
        vt = res.vt[m]
        A = vt.attention[0].cpu()                                  # (HW, L)
        gather = A[:, t].reshape(h, w)
        regions = A.argmax(dim=1).reshape(h, w)
        pixel = row.value * w + col.value
        readback = (vt.readback[0, pixel].cpu() if vt.readback is not None
                    else torch.full((L,), float("nan")))
        pred = res.logits[0].argmax(0).cpu()
        box.state.update(scene=scene.value, module=m, token=t, pixel=(row.value, col.value),
                         gather=gather.clone(), regions=regions.clone(),
                         readback=readback.clone(), prediction=pred.clone())
        fig, axes = plt.subplots(1, 4, figsize=(12, 3.1))
        viz.show_heatmap(image, gather, axes[0], vmin=0,
                         title=f"pixels token {t} gathers (A[:, {t}])")
        viz.show_mask(image, F.interpolate(regions[None, None].float(), size=image.shape[-2:],
                                           mode="nearest")[0, 0].long(), max(L, 2), axes[1],
                      title="token of largest A per pixel")
        sy, sx = image.shape[-2] / h, image.shape[-1] / w
        axes[1].add_patch(plt.Rectangle((col.value * sx - 0.5, row.value * sy - 0.5), sx, sy,
                                        fill=False, ec="white", lw=2))
        colours = ["tab:orange" if k == t else "tab:blue" for k in range(L)]
        axes[2].bar(range(L), readback.numpy(), color=colours)
        axes[2].set_ylim(0, 1)
        axes[2].set_xlabel("token")
        axes[2].set_title(f"P at pixel ({row.value}, {col.value}): tokens read back",
                          fontsize=9)
        viz.show_mask(image, pred, model.num_classes, axes[3], title="prediction")
        fig.tight_layout()
        return fig

    def render(_=None):
        with out:
            out.clear_output(wait=True)
            fig = draw()
            plt.show()
            plt.close(fig)

    for c in (scene, module, token, row, col):
        c.observe(render, names="value")
    render()
    return box
