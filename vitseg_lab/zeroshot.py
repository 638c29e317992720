"""Chapter 06 — ZSI: zero-shot instance segmentation by classifying in a semantic space.

Zheng et al., "Zero-Shot Instance Segmentation", CVPR 2021 (official code
zhengye1995/Zero-shot-Instance-Segmentation); the facts used here are in METHODS.md §5, and §5.0
lists where the released code departs from the paper. This module implements the paper's intent
and offers the code's behaviour as a switch where it changes the numbers:

- the semantic mask head (SMH) runs its ``mask_convs`` convolutions in sequence (the paper's 4);
  the code feeds every conv the same input, so only one is applied: ``smh_code_convs=True``;
- synchronised background reaches *both* heads (the paper); the 48/17 code never writes it into
  the mask head: ``sync_bg_mask=False``;
- box regression is class-agnostic, so an unseen class gets a box of its own; the code regresses
  per seen class and reuses seen regressors for unseen columns (not reproduced);
- seen scores are a plain softmax; the code maps them through ``·vecᵀ·vec`` even in seen mode:
  ``seen_through_vectors=True``;
- class vectors are used as given, like the code; ``normalize_vectors=True`` makes them unit
  length (on ShapeScenes it slowed learning: the logits shrink by 1/sqrt(2)).

The detector is torchvision's Mask R-CNN machinery — ``GeneralizedRCNNTransform``, anchor
generator, ``RegionProposalNetwork``, ``MultiScaleRoIAlign``, the box coder, NMS, ``RoIHeads``
and its Fast R-CNN / mask losses — on a plain timm ViT read through a ViTDet-style simple feature
pyramid. What the paper adds is written here: the background-aware RPN head, the zero-shot box
predictor (RoI feature -> semantic space -> scores against fixed class vectors, with a decoder
back to the RoI feature) and the semantic mask head (a frozen 1x1 conv holding the class vectors).

Shapes: B batch · H, W pixels · N RoIs · R mask RoIs · M mask side · C RoI feature width ·
D semantic (word / attribute vector) size · S seen classes · U unseen classes · A anchors per
location; score columns always start with background (``1 + S``, ``1 + U``).
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections import OrderedDict
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
    "BackgroundAwareRPNHead",
    "FrozenVectorConv",
    "SemanticMaskPredictor",
    "SimpleFeaturePyramid",
    "ZSIConfig",
    "ZSIModel",
    "ZeroShotBoxPredictor",
    "ZeroShotRoIHeads",
    "background_vector",
    "build",
    "evaluate_zsi",
    "full_data",
    "full_scale_check",
    "harmonic_mean",
    "instance_explorer",
    "load",
    "loss_fn",
    "metric_fn",
    "quick_data",
    "reconstruction_loss",
    "report",
    "run",
    "seen_to_unseen",
    "semantic_scores",
    "unseen_mask_logits",
    "vector_conv",
]

#: The paper's numbers to print beside ours (METHODS.md §5.6: Tables 3-4 of the paper, from
#: memory — marked (mem) there; the GZSI 65/15 unseen segm AP 13.60 is from issue #6).
PAPER = {
    "48_17": {"zsi_segm_recall100": (50.3, 44.9, 38.7), "zsi_segm_map50": 9.0},
    "65_15": {"zsi_segm_recall100": (55.8, 50.0, 42.9), "zsi_segm_map50": 10.5,
              "gzsi_segm_unseen_ap": 13.60},
}
IOU_THRESHOLDS = (0.4, 0.5, 0.6)


# ----------------------------------------------------------------------------------------------
# Exercises
# ----------------------------------------------------------------------------------------------

def semantic_scores(x: Tensor, weight: Tensor, bias: Tensor, vectors: Tensor) -> Tensor:
    """Exercise 6.1 · RoI features into the semantic space, scored against fixed class vectors.

    A linear encoder maps each RoI feature to a D-dimensional semantic embedding,
    ``sem = x · weightᵀ + bias``; the class scores are its dot products with the class vectors,
    ``logits = sem · vectorsᵀ``. The vectors are fixed (word vectors at full scale, attribute
    vectors here) and row 0 is the background vector, so the scores keep a background column.

    Args:
        x: (N, C) RoI features of N RoIs.
        weight: (D, C) and bias: (D,), the encoder (``nn.Linear(C, D)``'s parameters).
        vectors: (1 + S, D) class vectors, row 0 background, then the seen classes.
    Returns:
        (N, 1 + S) logits (no softmax: the cross-entropy applies it).
    """
    ### BEGIN SOLUTION
    sem = x @ weight.T + bias        # (N, D)
    return sem @ vectors.T           # (N, 1 + S)
    ### END SOLUTION


def reconstruction_loss(x: Tensor, x_hat: Tensor, weight: float) -> Tensor:
    """Exercise 6.2 · the encoder-decoder's reconstruction loss: weighted mean squared error.

    The decoder maps the semantic embedding back to the visual feature it came from; the loss
    keeps visual information in the semantic space (the paper: weight 0.5, in both heads).

    Args:
        x: (N, ...) visual features (RoI features (N, C), or mask features (R, C, M, M)).
        x_hat: the decoder's reconstruction, same shape as ``x``.
        weight: the loss weight.
    Returns:
        () scalar, ``weight · mean over every entry of (x - x_hat)²``.
    """
    ### BEGIN SOLUTION
    return weight * (x - x_hat).pow(2).mean()
    ### END SOLUTION


def seen_to_unseen(seen_logits: Tensor, seen_vectors: Tensor, unseen_vectors: Tensor) -> Tensor:
    """Exercise 6.3 · name classes never trained on: seen scores mapped through the vectors.

    The seen logits are soft-maxed (over background + seen), the probabilities mix the seen
    vectors into one point of the semantic space, and that point is scored against the unseen
    vectors: ``softmax(logits) · V_seen · V_unseenᵀ`` (METHODS.md §5.3, §5.0).

    Args:
        seen_logits: (N, 1 + S) logits, column 0 background.
        seen_vectors: (1 + S, D) background + seen class vectors.
        unseen_vectors: (1 + U, D) background + unseen class vectors.
    Returns:
        (N, 1 + U) unseen scores, column 0 background.
    """
    ### BEGIN SOLUTION
    probs = seen_logits.softmax(dim=-1)            # (N, 1 + S)
    return probs @ seen_vectors @ unseen_vectors.T  # (N, D) -> (N, 1 + U)
    ### END SOLUTION


def vector_conv(pixels: Tensor, vectors: Tensor) -> Tensor:
    """Exercise 6.4 · the semantic mask head's classifier: a 1x1 conv whose weights are vectors.

    Every pixel of every mask RoI carries a semantic vector; its score for class k is the dot
    product with class vector k — a 1x1 convolution with ``vectors`` as its (frozen) weights.

    Args:
        pixels: (R, D, h, w) per-pixel semantic vectors of R mask RoIs (h = w = M in the head).
        vectors: (K, D) class vectors (row 0 background).
    Returns:
        (R, K, h, w) mask logits, ``out[r, k, y, x] = Σ_d pixels[r, d, y, x] · vectors[k, d]``.
    """
    ### BEGIN SOLUTION
    h, w = pixels.shape[-2:]
    # (K, D) @ (R, D, h·w) -> (R, K, h·w): one batched matmul over all pixels, with no
    # permuted copy of the (large) pixel block (torch.einsum made one for this layout).
    logits = vectors @ pixels.flatten(2)
    return logits.unflatten(2, (h, w))
    ### END SOLUTION


def unseen_mask_logits(seen_logits: Tensor, seen_vectors: Tensor,
                       unseen_vectors: Tensor) -> Tensor:
    """Exercise 6.5 · unseen masks: seen mask logits back to the semantic space, then unseen.

    Two 1x1 convs with no nonlinearity between them (METHODS.md §5.0): the transposed seen
    vectors map each pixel's ``1 + S`` logits back to a D-vector, and the unseen vectors score it.

    Args:
        seen_logits: (R, 1 + S, h, w) mask logits over background + seen classes.
        seen_vectors: (1 + S, D). unseen_vectors: (1 + U, D); row 0 of both is background.
    Returns:
        (R, 1 + U, h, w) unseen mask logits.
    """
    ### BEGIN SOLUTION
    h, w = seen_logits.shape[-2:]
    sem = seen_vectors.T @ seen_logits.flatten(2)            # (R, D, h·w): back to word space
    logits = unseen_vectors @ sem                             # (R, 1 + U, h·w)
    return logits.unflatten(2, (h, w))
    ### END SOLUTION


def background_vector(fb_weight: Tensor) -> Tensor:
    """Exercise 6.6 · the learned background vector of the background-aware RPN.

    BA-RPN's last 1x1 conv maps a D-vector per location to 2 logits per anchor, laid out anchor
    by anchor: rows ``2a`` (background of anchor a) and ``2a + 1`` (foreground). The background
    rows start as the background word vector and are learned; their mean is the background
    vector written into both heads at every forward pass (synchronised background).

    Args:
        fb_weight: (2A, D) weights of that conv (its 1x1 kernel squeezed).
    Returns:
        (D,) the mean of the A background rows.
    """
    ### BEGIN SOLUTION
    return fb_weight[0::2].mean(dim=0)
    ### END SOLUTION


def harmonic_mean(seen: Tensor, unseen: Tensor) -> Tensor:
    """Exercise 6.7 · GZSI's summary: the harmonic mean of seen and unseen scores.

    HM = 2·s·u / (s + u) punishes a detector that is good at seen classes and blind to unseen
    ones, where an arithmetic mean would hide it. Where both are 0 the harmonic mean is 0.

    Args:
        seen: (M, T) seen-class figures (M metrics, e.g. recall and mAP, at T IoU thresholds),
            in [0, 1] or in percent.
        unseen: (M, T) the unseen figures of the same metrics.
    Returns:
        (M, T) harmonic means, entry by entry.
    """
    ### BEGIN SOLUTION
    total = seen + unseen
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, 2 * seen * unseen / safe, torch.zeros_like(total))
    ### END SOLUTION


# ----------------------------------------------------------------------------------------------
# The model: torchvision's Mask R-CNN scaffolding with the zero-shot parts
# ----------------------------------------------------------------------------------------------

def _unit(v: Tensor) -> Tensor:
    return F.normalize(v, dim=-1)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one ViT layer's tokens -> maps at 3 strides.

    The last ViT layer (stride p) is deconvolved to p/2, kept at p and max-pooled to 2p; each
    level goes through 1x1 conv + LayerNorm + 3x3 conv + LayerNorm to ``out_channels``.

    Args:
        backbone: ``vitseg_lab.backbone.ViTBackbone`` reading one layer.
        out_channels: d, the pyramid width (torchvision reads ``self.out_channels``).
    """

    def __init__(self, backbone: nn.Module, out_channels: int):
        super().__init__()
        from timm.layers import LayerNorm2d

        self.backbone = backbone
        self.out_channels = out_channels
        C = backbone.embed_dim
        self.up = nn.Sequential(nn.ConvTranspose2d(C, C // 2, 2, stride=2), LayerNorm2d(C // 2),
                                nn.GELU())
        self.down = nn.MaxPool2d(2)

        def neck(c: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False),
                                 LayerNorm2d(out_channels),
                                 nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                                 LayerNorm2d(out_channels))

        self.necks = nn.ModuleList([neck(C // 2), neck(C), neck(C)])

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """images: (B, 3, H, W) normalised -> {"0": (B, d, 2h, 2w), "1": (B, d, h, w),
        "2": (B, d, h/2, w/2)} with (h, w) the patch grid."""
        out = self.backbone(images)
        B, _, C = out.tokens[-1].shape
        x = out.tokens[-1].transpose(1, 2).reshape(B, C, *out.grid)
        levels = (self.up(x), x, self.down(x))
        return OrderedDict((str(i), n(t)) for i, (n, t) in enumerate(zip(self.necks, levels)))


class BackgroundAwareRPNHead(nn.Module):
    """BA-RPN (METHODS.md §5.5): objectness from a semantic map against learned vectors.

    conv3x3 + ReLU -> 1x1 conv to D -> ``vec_fb``, a 1x1 conv D -> 2A whose rows ``2a`` are
    background vectors (initialised with the background word vector, learned) and rows
    ``2a + 1`` foreground vectors (random). The two logits of an anchor under a softmax
    cross-entropy equal one logit ``fg - bg`` under torchvision's binary cross-entropy, so the
    head plugs into ``RegionProposalNetwork`` unchanged.

    Args:
        in_channels: d, the pyramid width. num_anchors: A per location. semantic_dim: D.
        background: (D,) the initial background vector.
    """

    def __init__(self, in_channels: int, num_anchors: int, semantic_dim: int, background: Tensor):
        super().__init__()
        self.num_anchors = num_anchors
        self.conv = nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU())
        self.semantic = nn.Conv2d(in_channels, semantic_dim, 1)
        self.vec_fb = nn.Conv2d(semantic_dim, 2 * num_anchors, 1, bias=False)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        with torch.no_grad():
            nn.init.normal_(self.vec_fb.weight, std=0.1)
            self.vec_fb.weight[0::2, :, 0, 0] = background
            for m in (self.semantic, self.bbox_pred):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """features: levels (B, d, h, w) -> (objectness (B, A, h, w), deltas (B, 4A, h, w))."""
        logits, deltas = [], []
        for f in features:
            t = self.conv(f)
            fb = self.vec_fb(self.semantic(t))                      # (B, 2A, h, w)
            B, _, h, w = fb.shape
            fb = fb.view(B, self.num_anchors, 2, h, w)
            logits.append(fb[:, :, 1] - fb[:, :, 0])                # fg - bg: (B, A, h, w)
            deltas.append(self.bbox_pred(t))
        return logits, deltas

    def background(self) -> Tensor:
        """(D,) the synchronised background vector, through the learner's ``background_vector``."""
        bg = background_vector(self.vec_fb.weight[:, :, 0, 0])
        expect_shape(bg, "D", name="background_vector(...)", D=self.vec_fb.in_channels)
        return bg


class ZeroShotBoxPredictor(nn.Module):
    """The zero-shot detector (METHODS.md §5.3) in torchvision's box-predictor slot.

    RoI feature x (N, C) -> encoder Linear(C -> D) -> ``semantic_scores`` against the frozen
    [background; seen] vectors; a decoder Linear(D -> C) reconstructs x. Box regression is
    class-agnostic (repeated per column so torchvision's Fast R-CNN loss reads it).

    Args:
        in_channels: C. vectors: (1 + S, D) background + seen class vectors (kept frozen).
    """

    def __init__(self, in_channels: int, vectors: Tensor):
        super().__init__()
        D = vectors.shape[1]
        self.encoder = nn.Linear(in_channels, D)
        self.decoder = nn.Linear(D, in_channels)
        self.bbox_pred = nn.Linear(in_channels, 4)
        # A frozen parameter (not a buffer) so it is visibly "a classifier that never learns"
        # and travels with state_dict; synchronised background writes row 0 without grad.
        self.vectors = nn.Parameter(vectors.clone(), requires_grad=False)
        self.recon: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (N, C) -> (logits (N, 1 + S), deltas (N, 4 (1 + S)))."""
        logits = semantic_scores(x, self.encoder.weight, self.encoder.bias, self.vectors)
        sem = self.encoder(x)
        expect_shape(logits, "N K", name="semantic_scores(...)", N=x.shape[0],
                     K=self.vectors.shape[0])
        # torchvision's RoIHeads computes its losses inside: the reconstruction pair is left
        # here for ZSIModel to score (training only).
        self.recon = (x, self.decoder(sem)) if self.training else None
        deltas = self.bbox_pred(x).repeat(1, self.vectors.shape[0])
        return logits, deltas


class FrozenVectorConv(nn.Conv2d):
    """A 1x1 conv D -> K with no bias whose weights are the class vectors, never trained.

    ``weight``: (K, D, 1, 1) with ``requires_grad=False``; the forward runs the learner's
    ``vector_conv``. Synchronised background writes row 0 (under ``no_grad``) and nothing else
    changes it.
    """

    def __init__(self, vectors: Tensor):
        K, D = vectors.shape
        super().__init__(D, K, 1, bias=False)
        self.weight.requires_grad_(False)
        with torch.no_grad():
            self.weight.copy_(vectors[:, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        """x: (R, D, M, M) -> (R, K, M, M)."""
        out = vector_conv(x, self.weight[:, :, 0, 0])
        expect_shape(out, "R K M M", name="vector_conv(...)", R=x.shape[0],
                     K=self.out_channels, M=x.shape[-1])
        return out


class SemanticMaskPredictor(nn.Module):
    """The semantic mask head's second half (METHODS.md §5.4), in torchvision's predictor slot.

    mask features -> deconv x2 + ReLU = x (R, C, M, M) -> encoder conv3x3 C -> D ->
    ``kernel_semantic`` conv3x3 D -> D -> ``FrozenVectorConv`` [background; seen] -> logits; a
    decoder conv3x3 D -> D -> conv3x3 D -> C reconstructs x. At test the logits go to unseen
    classes through ``unseen_mask_logits``.

    Args:
        in_channels: C. vectors: (1 + S, D) background + seen vectors.
    """

    def __init__(self, in_channels: int, vectors: Tensor):
        super().__init__()
        D = vectors.shape[1]
        self.upsample = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        self.encoder = nn.Conv2d(in_channels, D, 3, padding=1)
        self.kernel_semantic = nn.Conv2d(D, D, 3, padding=1)
        self.conv_vec = FrozenVectorConv(vectors)
        self.decoder = nn.Sequential(nn.Conv2d(D, D, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(D, in_channels, 3, padding=1))
        self.recon: tuple[Tensor, Tensor] | None = None
        self.output: tuple[str, Tensor | None] = ("seen", None)   # set by ZSIModel before eval

    def forward(self, feats: Tensor) -> Tensor:
        """feats: (R, C, M/2, M/2) -> logits (R, K_out, M, M); K_out = 1 + S in training."""
        x = F.relu(self.upsample(feats))
        sem = self.kernel_semantic(self.encoder(x))
        logits = self.conv_vec(sem)
        self.recon = (x, self.decoder(sem)) if self.training else None
        mode, unseen = self.output
        if self.training or mode == "seen":
            return logits
        vec = self.conv_vec.weight[:, :, 0, 0]
        out = unseen_mask_logits(logits, vec, unseen)
        expect_shape(out, "R U M M", name="unseen_mask_logits(...)", R=feats.shape[0],
                     U=unseen.shape[0], M=logits.shape[-1])
        return out if mode == "unseen" else torch.cat([logits, out[:, 1:]], dim=1)


def _masked_heads(convs: int, channels: int, code_behaviour: bool) -> nn.Module:
    """The SMH's convolutions: torchvision's ``MaskRCNNHeads`` (``convs`` 3x3 conv + ReLU in
    sequence, the paper), or the released code's loop that applies one of them."""
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

    heads = MaskRCNNHeads(channels, [channels] * convs, dilation=1)
    if not code_behaviour:
        return heads

    class _LastConvOnly(nn.Module):    # `for conv in convs: out = conv(x)` — only the last counts
        def __init__(self):
            super().__init__()
            self.convs = heads

        def forward(self, x):
            return self.convs[-1](x)

    return _LastConvOnly()


class ZeroShotRoIHeads:
    """Namespace for the RoIHeads subclass (built lazily: torchvision imports on first use)."""

    _cls = None

    @classmethod
    def get(cls):
        if cls._cls is None:
            from torchvision.models.detection.roi_heads import RoIHeads
            from torchvision.ops import boxes as box_ops

            class _ZeroShotRoIHeads(RoIHeads):
                """torchvision's RoIHeads with zero-shot scores at test time.

                Training is unchanged (Fast R-CNN and mask losses on the seen logits). At test,
                ``postprocess_detections`` scores each RoI in the chosen output space instead
                of a softmax: ``seen`` (background + seen), ``unseen`` (through
                ``seen_to_unseen``) or ``gzsi`` (both, seen columns first); boxes are the
                class-agnostic regression, then score threshold, per-class NMS, top-k.
                """

                output: tuple[str, Tensor | None] = ("seen", None)
                seen_through_vectors: bool = False

                def postprocess_detections(self, class_logits, box_regression, proposals,
                                           image_shapes):
                    mode, unseen = self.output
                    vec = self.box_predictor.vectors
                    if self.seen_through_vectors:     # the code's seen mode: ·vecᵀ·vec
                        seen = seen_to_unseen(class_logits, vec, vec)
                    else:
                        seen = class_logits.softmax(-1)
                    if mode == "seen":
                        scores = seen
                    else:
                        un = seen_to_unseen(class_logits, vec, unseen)
                        expect_shape(un, "N U", name="seen_to_unseen(...)",
                                     N=class_logits.shape[0], U=unseen.shape[0])
                        scores = un if mode == "unseen" else torch.cat([seen, un[:, 1:]], 1)
                    K = scores.shape[1]
                    per_image = [len(p) for p in proposals]
                    boxes_all = self.box_coder.decode(box_regression[:, :4], proposals)[:, 0]
                    out_boxes, out_scores, out_labels = [], [], []
                    for boxes, sc, shape in zip(boxes_all.split(per_image),
                                                scores.split(per_image), image_shapes):
                        boxes = box_ops.clip_boxes_to_image(boxes, shape)
                        n = boxes.shape[0]
                        boxes = boxes[:, None].expand(n, K - 1, 4).reshape(-1, 4)
                        labels = torch.arange(1, K, device=sc.device).repeat(n)
                        sc = sc[:, 1:].reshape(-1)
                        keep = torch.where(sc > self.score_thresh)[0]
                        boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
                        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
                        boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
                        keep = box_ops.batched_nms(boxes, sc, labels, self.nms_thresh)
                        keep = keep[: self.detections_per_img]
                        out_boxes.append(boxes[keep])
                        out_scores.append(sc[keep])
                        out_labels.append(labels[keep])
                    return out_boxes, out_scores, out_labels

            cls._cls = _ZeroShotRoIHeads
        return cls._cls


class ZSIModel(nn.Module):
    """Zero-shot Mask R-CNN: torchvision's ``GeneralizedRCNN`` parts + the ZSI heads.

    Args:
        detector: a torchvision ``GeneralizedRCNN`` whose RPN head is ``BackgroundAwareRPNHead``,
            box predictor ``ZeroShotBoxPredictor`` and mask predictor ``SemanticMaskPredictor``.
        class_vectors: (K, D) vectors of every class of the data set, row 0 background.
        seen_ids: the S class ids trained on (column s + 1 of the heads is class seen_ids[s]).
        cfg: the chapter config (kept as ``model.cfg``).

    ``forward(images, targets)`` -> torchvision's loss dict + the reconstruction losses in
    training; in eval, one dict per image with ``boxes`` (n, 4) xyxy, ``scores`` (n,),
    ``labels`` (n,) **data-set class ids**, ``masks`` (n, 1, H, W) in [0, 1]. Which classes are
    named at test is ``model.set_output(mode, unseen_ids)``: ``"seen"``, ``"unseen"`` or
    ``"gzsi"``; the unseen set can be changed without retraining.
    """

    def __init__(self, detector: nn.Module, class_vectors: Tensor, seen_ids: Sequence[int],
                 cfg: ZSIConfig):
        super().__init__()
        self.detector = detector
        self.cfg = cfg
        self.register_buffer("class_vectors", class_vectors.clone().float())
        self.register_buffer("seen_ids", torch.as_tensor(list(seen_ids), dtype=torch.long))
        K = class_vectors.shape[0]
        lookup = torch.full((K,), -1, dtype=torch.long)
        lookup[self.seen_ids] = torch.arange(1, len(seen_ids) + 1)
        self.register_buffer("to_column", lookup, persistent=False)
        self.mode = "seen"
        self.unseen_ids: list[int] = []

    @property
    def num_classes(self) -> int:
        return self.class_vectors.shape[0]

    def vectors_of(self, ids: Sequence[int]) -> Tensor:
        """(1 + n, D) [background; classes ids] as the heads use them (normalised if asked)."""
        v = torch.cat([self.background()[None], self.class_vectors[list(ids)]])
        return _unit(v) if self.cfg.normalize_vectors else v

    def background(self) -> Tensor:
        return self.detector.rpn.head.background().detach()

    def set_output(self, mode: str, unseen_ids: Sequence[int] = ()) -> ZSIModel:
        """Name ``"seen"`` classes, ``"unseen"`` ones (the ids given) or both (``"gzsi"``)."""
        if mode not in ("seen", "unseen", "gzsi"):
            raise ValueError(f"mode={mode!r}; use 'seen', 'unseen' or 'gzsi'.")
        ids = [int(i) for i in unseen_ids]
        if mode != "seen" and not ids:
            raise ValueError(f"mode={mode!r} needs unseen_ids (class ids to name).")
        bad = [i for i in ids if not 0 < i < self.num_classes]
        if bad:
            raise ValueError(f"unseen ids {bad} are not object classes 1..{self.num_classes - 1}.")
        self.mode, self.unseen_ids = mode, ids
        return self

    def output_ids(self) -> list[int]:
        """Data-set class id of each output column (column 0 = background = 0)."""
        seen = self.seen_ids.tolist()
        return [0] + {"seen": seen, "unseen": self.unseen_ids,
                      "gzsi": seen + self.unseen_ids}[self.mode]

    @torch.no_grad()
    def sync_background(self) -> None:
        """Write BA-RPN's background vector into the detector's and the mask head's vectors."""
        bg = self.detector.rpn.head.background()
        bg = _unit(bg) if self.cfg.normalize_vectors else bg
        heads = self.detector.roi_heads
        heads.box_predictor.vectors[0] = bg
        if self.cfg.sync_bg_mask:
            heads.mask_predictor.conv_vec.weight[0, :, 0, 0] = bg

    def forward(self, images: Tensor | list[Tensor], targets: list[dict] | None = None):
        images = list(images)
        heads = self.detector.roi_heads
        if self.cfg.sync_bg:
            self.sync_background()
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (boxes, labels, masks per image).")
            mapped = []
            for t in targets:
                cols = self.to_column[t["labels"]]
                if (cols < 0).any():
                    raise ValueError(
                        f"a training target holds class ids {t['labels'][cols < 0].tolist()} "
                        "that are not seen classes; train on seen classes only "
                        "(ShapeScenes(..., exclude_unseen=True)).")
                mapped.append({**t, "labels": cols})
            losses = self.detector(images, mapped)
            box_x, box_hat = heads.box_predictor.recon
            losses["loss_recon_box"] = reconstruction_loss(box_x, box_hat, self.cfg.recon_weight)
            if heads.mask_predictor.recon is not None:
                m_x, m_hat = heads.mask_predictor.recon
                losses["loss_recon_mask"] = reconstruction_loss(m_x, m_hat, self.cfg.recon_weight)
            return losses
        unseen = self.vectors_of(self.unseen_ids) if self.mode != "seen" else None
        heads.output = heads.mask_predictor.output = (self.mode, unseen)
        heads.seen_through_vectors = self.cfg.seen_through_vectors
        dets = self.detector(images)
        ids = torch.as_tensor(self.output_ids(), device=self.class_vectors.device)
        for d in dets:
            d["labels"] = ids[d["labels"]]
        return dets

    @torch.no_grad()
    def scores_on_boxes(self, image: Tensor, boxes: Tensor, unseen_ids: Sequence[int]) -> dict:
        """The zero-shot head on given boxes of one image (no RPN): what the explorer shows.

        image: (3, H, W); boxes: (n, 4) xyxy -> {"seen_logits" (n, 1 + S), "seen_probs",
        "unseen_scores" (n, 1 + U), "semantic" (n, D), "masks" (n, 1 + U, M, M) unseen mask
        probabilities}.
        """
        det = self.detector
        images, _ = det.transform([image])
        feats = det.backbone(images.tensors)
        scale = images.image_sizes[0][0] / image.shape[-2]
        b = [boxes.to(image.device).float() * scale]
        heads = det.roi_heads
        x = heads.box_head(heads.box_roi_pool(feats, b, images.image_sizes))
        pred = heads.box_predictor
        sem = pred.encoder(x)
        logits = semantic_scores(x, pred.encoder.weight, pred.encoder.bias, pred.vectors)
        unseen = self.vectors_of(unseen_ids)
        m = heads.mask_head(heads.mask_roi_pool(feats, b, images.image_sizes))
        mp = heads.mask_predictor
        sem_px = mp.kernel_semantic(mp.encoder(F.relu(mp.upsample(m))))
        seen_masks = mp.conv_vec(sem_px)
        return {"seen_logits": logits, "seen_probs": logits.softmax(-1),
                "unseen_scores": seen_to_unseen(logits, pred.vectors, unseen),
                "semantic": sem,
                "masks": unseen_mask_logits(seen_masks, mp.conv_vec.weight[:, :, 0, 0],
                                            unseen).sigmoid()}


# ----------------------------------------------------------------------------------------------
# Config and the chapter protocol
# ----------------------------------------------------------------------------------------------

FULL_MODEL = "vit_base_patch16_224.augreg_in21k"


@dataclass
class ZSIConfig(chapters.ScalePresets):
    """Chapter 06 settings. ``quick()`` / ``smoke()`` / ``full()`` / ``for_scale(scale)``.

    Backbone: ``model_name="quick"`` is the calibrated tiny ViT, otherwise a timm ViT; the
    simple feature pyramid reads its last block. Detector sizes follow torchvision's Mask R-CNN
    arguments. Zero-shot parts: ``recon_weight`` (the paper: 0.5), ``normalize_vectors``,
    ``sync_bg`` / ``sync_bg_mask``, ``smh_code_convs`` and ``seen_through_vectors`` (the
    released code's behaviour, METHODS.md §5.0). Data: ShapeScenes with the ``unseen`` classes
    held out (quick), or COCO 2014 with ``split`` 48/17 or 65/15 (full).
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
    # detector (torchvision Mask R-CNN arguments)
    pyramid_dim: int = 64
    anchor_sizes: tuple[tuple[int, ...], ...] = ((12,), (24,), (40,))   # per pyramid level
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_train: int = 200
    rpn_post_nms_train: int = 16
    rpn_pre_nms_test: int = 100
    rpn_post_nms_test: int = 20
    rpn_batch_per_image: int = 32
    box_batch_per_image: int = 8      # RoIs per image (RoIAlign's backward dominates a CPU step)
    box_positive_fraction: float = 0.5
    box_head_dim: int = 128
    box_roi_size: int = 7
    mask_roi_size: int = 7
    mask_convs: int = 2
    roi_sampling_ratio: int = 1       # RoIAlign samples per bin side (torchvision default 2)
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 10      # quick: 1-3 objects, 3 unseen classes (full: 100)
    # zero-shot parts
    recon_weight: float = 0.5
    normalize_vectors: bool = False   # True: unit-length class vectors (the code: as given)
    sync_bg: bool = True
    sync_bg_mask: bool = True
    smh_code_convs: bool = False
    seen_through_vectors: bool = False
    # data
    dataset: str = "shapes"          # "shapes" | "coco"
    split: str = "48_17"             # full scale: "48_17" | "65_15"
    num_train: int = 1536
    num_val: int = 48
    colors: tuple[str, ...] = ("red", "green", "blue")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    # One (colour, shape) per colour and per shape held out: every unseen class shares its
    # colour with two seen classes and its shape with two others.
    unseen: tuple[str, ...] = ("red circle", "green square", "blue triangle")
    min_objects: int = 1
    max_objects: int = 3
    # Recall@100 barely separates the model from its baselines here (3 unseen classes, 10
    # detections per image: every object gets every label somewhere); mAP@0.5 does.
    target: float = 0.35
    target_metric: str = "unseen_mask_ap50"
    num_threads: int | None = 1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=125, batch_size=8, lr=4e-3, weight_decay=0.05, warmup_steps=15, schedule="poly",
        # One evaluation only: with its two baselines it costs ~8 s of CPU, and the notebook's
        # minute has no room for an eval curve.
        eval_every=0, log_every=10, grad_clip=5.0, progress=False,
        out_dir="runs/zeroshot-quick", resume=False))

    @classmethod
    def quick(cls) -> ZSIConfig:
        """Tiny ViT + tiny Mask R-CNN on 64 x 64 ShapeScenes, one CPU thread."""
        return cls()

    @classmethod
    def smoke(cls) -> ZSIConfig:
        """What nbgrader runs: builds, takes a few steps, evaluates; proves the path only."""
        q = cls.quick()
        return replace(q, num_train=16, num_val=8, target=0.0,
                       train=replace(q.train, steps=2, batch_size=4, warmup_steps=1,
                                     out_dir=None))

    @classmethod
    def full(cls, split: str = "48_17") -> ZSIConfig:
        """The paper's recipe on COCO 2014 (METHODS.md §5.1, §5.0) on a ViT-B/16 backbone.

        1x schedule: 12 epochs of the ~82k training images at 8 images per step (2 per GPU on 4
        GPUs; ``batch_size`` is per process) ~ 124k steps, 1333 x 800 in the paper (here the
        long side resized to 1024, ViTDet's input size), horizontal flips, warm-up 500 steps
        for 48/17 and 7,000 for 65/15. The paper's
        ResNet-101 trains with SGD lr 0.01 (48/17) / 0.0075 (65/15); ``fit`` trains with AdamW,
        ViTDet's optimiser for plain ViTs, at its lr 1e-4 (our change, stated).
        """
        warmup = {"48_17": 500, "65_15": 7000}
        if split not in warmup:
            raise ValueError(f"split={split!r}; use '48_17' or '65_15'.")
        return cls(model_name=FULL_MODEL, pretrained=True, img_size=1024, patch_size=16,
                   embed_dim=768, depth=12, num_heads=12, drop_path=0.1, pyramid_dim=256,
                   anchor_sizes=((32, 64), (128, 192), (256, 512)), rpn_pre_nms_train=2000,
                   rpn_post_nms_train=2000, rpn_pre_nms_test=1000, rpn_post_nms_test=1000,
                   rpn_batch_per_image=256, box_batch_per_image=512, box_positive_fraction=0.25,
                   box_head_dim=1024, box_roi_size=7, mask_roi_size=14, mask_convs=4,
                   roi_sampling_ratio=2,
                   box_score_thresh=0.05, detections_per_img=100, sync_bg_mask=True,
                   dataset="coco", split=split,
                   num_train=0, num_val=0, unseen=(), target=PAPER[split]["zsi_segm_map50"] / 100,
                   target_metric="unseen_mask_ap50", num_threads=None,
                   train=TrainConfig(steps=124_000, batch_size=2, lr=1e-4, weight_decay=0.1,
                                     warmup_steps=warmup[split], schedule="poly",
                                     poly_power=1.0, grad_clip=None, eval_every=0,
                                     log_every=50, ckpt_every=2000, num_workers=8,
                                     out_dir=f"runs/ch06_zsi_{split}"))


def build(cfg: ZSIConfig, num_classes: int, class_vectors: Tensor | None = None,
          seen_ids: Sequence[int] | None = None) -> ZSIModel:
    """The whole zero-shot Mask R-CNN in one function (torchvision parts + the ZSI heads).

    ``class_vectors`` (num_classes, D) and ``seen_ids`` default to ShapeScenes' attribute
    vectors and seen classes under ``cfg.unseen`` (full scale: the split's word vectors).
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    from torchvision.ops import MultiScaleRoIAlign

    from .backbone import ViTBackbone, create_vit, quick_vit

    if class_vectors is None or seen_ids is None:
        class_vectors, seen_ids = _vectors_for(cfg, num_classes)
    if class_vectors.shape[0] != num_classes:
        raise ValueError(f"class_vectors has {class_vectors.shape[0]} rows for {num_classes} "
                         "classes; give one vector per class, background first.")
    if cfg.model_name == "quick":
        vit = quick_vit(img_size=cfg.img_size, patch_size=cfg.patch_size,
                        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                        drop_path_rate=cfg.drop_path)
    else:
        vit = create_vit(cfg.model_name, pretrained=cfg.pretrained, img_size=cfg.img_size,
                         drop_path_rate=cfg.drop_path)
    vit.norm = nn.Identity()          # the pyramid reads raw block outputs
    backbone = SimpleFeaturePyramid(ViTBackbone(vit, out_layers=(len(vit.blocks) - 1,)),
                                    cfg.pyramid_dim)
    d = cfg.pyramid_dim
    vec = _unit(class_vectors.float()) if cfg.normalize_vectors else class_vectors.float()
    seen_vec = torch.cat([vec[:1], vec[list(seen_ids)]])           # (1 + S, D)
    sizes = tuple(tuple(int(s) for s in level) for level in cfg.anchor_sizes)
    if len(sizes) != 3 or len({len(s) for s in sizes}) != 1:
        raise ValueError(f"anchor_sizes={cfg.anchor_sizes}: give 3 pyramid levels with the same "
                         "number of sizes each, e.g. ((12,), (24,), (40,)).")
    A = len(sizes[0]) * len(cfg.aspect_ratios)
    anchors = AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * 3)
    rpn = RegionProposalNetwork(
        anchors, BackgroundAwareRPNHead(d, A, vec.shape[1], class_vectors[0].float()),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=cfg.rpn_batch_per_image,
        positive_fraction=0.5,
        pre_nms_top_n={"training": cfg.rpn_pre_nms_train, "testing": cfg.rpn_pre_nms_test},
        post_nms_top_n={"training": cfg.rpn_post_nms_train, "testing": cfg.rpn_post_nms_test},
        nms_thresh=0.7)
    names = ["0", "1", "2"]
    R = cfg.box_roi_size
    heads = ZeroShotRoIHeads.get()(
        box_roi_pool=MultiScaleRoIAlign(names, R, sampling_ratio=cfg.roi_sampling_ratio),
        box_head=TwoMLPHead(d * R * R, cfg.box_head_dim),
        box_predictor=ZeroShotBoxPredictor(cfg.box_head_dim, seen_vec),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=cfg.box_batch_per_image,
        positive_fraction=cfg.box_positive_fraction, bbox_reg_weights=None,
        score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(names, cfg.mask_roi_size,
                                         sampling_ratio=cfg.roi_sampling_ratio),
        mask_head=_masked_heads(cfg.mask_convs, d, cfg.smh_code_convs),
        mask_predictor=SemanticMaskPredictor(d, seen_vec))
    transform = GeneralizedRCNNTransform(cfg.img_size, cfg.img_size, (0.5, 0.5, 0.5),
                                         (0.5, 0.5, 0.5), size_divisible=cfg.patch_size * 2)
    detector = GeneralizedRCNN(backbone, rpn, heads, transform)
    return ZSIModel(detector, class_vectors, seen_ids, cfg)


def _vectors_for(cfg: ZSIConfig, num_classes: int) -> tuple[Tensor, list[int]]:
    if cfg.dataset == "shapes":
        ds = _scenes(cfg, 1, seed=0, train=True)
        if ds.num_classes != num_classes:
            raise ValueError(f"the config's ShapeScenes have {ds.num_classes} classes, not "
                             f"{num_classes}; build with the data set's num_classes.")
        return ds.class_vectors(), ds.seen_class_ids
    train, _ = _coco_data(cfg)
    return train.class_vectors(), train.seen_class_ids


def _scenes(cfg: ZSIConfig, n: int, seed: int, train: bool):
    from .data.shapes import ShapeScenes

    return ShapeScenes(n, size=cfg.img_size, colors=cfg.colors, shapes=cfg.shapes,
                       min_objects=cfg.min_objects, max_objects=cfg.max_objects, seed=seed,
                       unseen=cfg.unseen, exclude_unseen=train)


def quick_data(cfg: ZSIConfig):
    """ShapeScenes (train: seen classes only; val: every class, unseen ones included)."""
    return _scenes(cfg, cfg.num_train, 0, True), _scenes(cfg, cfg.num_val, 1, False)


def targets_of(batch: dict) -> list[dict[str, Tensor]]:
    """ShapeScenes batch -> torchvision targets (boxes as exclusive xyxy, uint8 masks)."""
    out = []
    for boxes, labels, masks in zip(batch["boxes"], batch["instance_labels"],
                                    batch["instance_masks"]):
        b = boxes.float().clone()
        b[:, 2:] += 1          # ShapeScenes boxes are inclusive pixel indices
        out.append({"boxes": b, "labels": labels.long(), "masks": masks.to(torch.uint8)})
    return out


def loss_fn(model: nn.Module, batch: dict) -> dict[str, Tensor]:
    """``fit``'s loss: torchvision's RPN / Fast R-CNN / mask losses + both reconstructions.

    torchvision's detectors return losses only in training mode, so a validation loss (``fit``
    without a metric) is computed in training mode (same sampling of RoIs, nothing updated).
    """
    was = model.training
    model.train()
    try:
        terms = model(batch["image"], targets_of(batch))
    finally:
        model.train(was)
    terms = {k.removeprefix("loss_"): v for k, v in terms.items()}
    return {"loss": sum(terms.values()), **terms}


# ----------------------------------------------------------------------------------------------
# Evaluation: pycocotools COCOeval at IoU 0.4 / 0.5 / 0.6, Recall@100 and mAP
# ----------------------------------------------------------------------------------------------

def _rle(mask: Tensor) -> dict:
    import numpy as np
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_eval(gts: list[dict], dets: list[dict], class_ids: Sequence[int], iou_type: str,
              image_ids: Sequence[int],
              sizes: dict[int, tuple[int, int]] | tuple[int, int] = (64, 64),
              ) -> dict[str, list[float]]:
    """pycocotools ``COCOeval`` over in-memory annotations.

    gts / dets: COCO-style dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``segmentation``
    RLE, dets with ``score``); ``sizes``: (H, W) per image id, or one (H, W) for all.
    -> {"recall100": [R@100 at IoU 0.4, 0.5, 0.6], "map": [mAP at the same IoUs]}: COCO's
    101-point interpolated AP and max recall with 100 detections, averaged over the classes that
    have ground truth (pycocotools' -1 = no ground truth).
    """
    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gts = [dict(a, id=k + 1) for k, a in enumerate(gts)]
    for a in gts:
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))

    def hw(i):
        return sizes[i] if isinstance(sizes, dict) else sizes

    gt = COCO()
    gt.dataset = {"images": [{"id": int(i), "height": int(hw(i)[0]), "width": int(hw(i)[1])}
                             for i in image_ids],
                  "annotations": gts,
                  "categories": [{"id": int(c)} for c in class_ids]}
    with contextlib.redirect_stdout(io.StringIO()):     # pycocotools prints progress
        gt.createIndex()
        if not dets:
            return {"recall100": [0.0] * len(IOU_THRESHOLDS), "map": [0.0] * len(IOU_THRESHOLDS)}
        dt = gt.loadRes([dict(d) for d in dets])
        E = COCOeval(gt, dt, iou_type)
        E.params.imgIds = [int(i) for i in image_ids]
        E.params.catIds = [int(c) for c in class_ids]
        E.params.iouThrs = np.array(IOU_THRESHOLDS)
        E.params.maxDets = [1, 10, 100]
        E.evaluate()
        E.accumulate()
    prec = E.eval["precision"][:, :, :, 0, -1]        # (T, 101, K): all areas, 100 dets
    rec = E.eval["recall"][:, :, 0, -1]                # (T, K)
    out = {"recall100": [], "map": []}
    for t in range(len(IOU_THRESHOLDS)):
        r = rec[t][rec[t] > -1]
        p = prec[t][prec[t] > -1]
        out["recall100"].append(float(r.mean()) if r.size else 0.0)
        out["map"].append(float(p.mean()) if p.size else 0.0)
    return out


@torch.no_grad()
def _detect(model: ZSIModel, loader, mode: str, unseen_ids: Sequence[int]) -> list[dict]:
    """Run the detector over a loader -> one record per image: ground truth and detections as
    COCO dicts (RLE masks, xywh boxes; no tensors kept, so a 40k-image val set fits)."""
    model.set_output(mode, unseen_ids)
    records = []
    for batch in loader:
        for i, out in enumerate(model(batch["image"])):
            masks = batch["instance_masks"][i]
            gt = [{"category_id": int(lab), "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                   "segmentation": _rle(m), "area": float(m.sum())}
                  for lab, (x0, y0, x1, y1), m in zip(batch["instance_labels"][i].tolist(),
                                                      batch["boxes"][i].tolist(), masks)]
            dt = [{"score": sc, "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": _rle(m[0] > .5)}
                  for sc, (x0, y0, x1, y1), m in zip(out["scores"].tolist(),
                                                     out["boxes"].tolist(), out["masks"])]
            records.append({"gt": gt, "dt": dt, "dt_labels": out["labels"].cpu(),
                            "size": tuple(masks.shape[-2:])})
    from .metrics import gather_over_ranks  # under DDP: every rank's images, in data-set order

    return gather_over_ranks(records)


def _coco_lists(records: list[dict], keep_classes: set[int],
                only_images_with: set[int] | None, relabel=None):
    gts, dts, image_ids = [], [], []
    for img, r in enumerate(records):
        if only_images_with is not None and not {a["category_id"] for a in r["gt"]} & \
                only_images_with:
            continue
        image_ids.append(img)
        gts += [dict(a, image_id=img) for a in r["gt"] if a["category_id"] in keep_classes]
        labs = r["dt_labels"] if relabel is None else relabel(img, r["dt_labels"])
        dts += [dict(d, image_id=img, category_id=lab)
                for d, lab in zip(r["dt"], labs.tolist()) if lab in keep_classes]
    return gts, dts, image_ids


def _zsi_figures(records, unseen: set[int], relabel=None) -> dict[str, float]:
    """ZSI figures of unseen-mode detections: ``unseen_{box,mask}_{recall,ap}{40,50,60}``."""
    out: dict[str, float] = {}
    sizes = {i: r["size"] for i, r in enumerate(records)}
    gts, dts, ids = _coco_lists(records, unseen, unseen, relabel)
    for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
        r = coco_eval(gts, dts, sorted(unseen), iou_type, ids, sizes)
        for t, thr in enumerate(IOU_THRESHOLDS):
            out[f"unseen_{kind}_recall{round(thr * 100)}"] = r["recall100"][t]
            out[f"unseen_{kind}_ap{round(thr * 100)}"] = r["map"][t]
    return out


def _gzsi_figures(records, seen: set[int], unseen: set[int]) -> dict[str, float]:
    """GZSI figures at IoU 0.5: ``gzsi_{seen,unseen,hm}_{box,mask}_{recall50,ap50}``."""
    out: dict[str, float] = {}
    sizes = {i: r["size"] for i, r in enumerate(records)}
    for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
        fig = {}
        for name, keep in (("seen", seen), ("unseen", unseen)):
            gts, dts, ids = _coco_lists(records, keep, None)
            r = coco_eval(gts, dts, sorted(keep), iou_type, ids, sizes)
            fig[name] = (r["recall100"][1], r["map"][1])
        hm = harmonic_mean(torch.tensor([fig["seen"]], dtype=torch.float64),
                           torch.tensor([fig["unseen"]], dtype=torch.float64))[0].tolist()
        for name, (rec, ap) in (*fig.items(), ("hm", hm)):
            out[f"gzsi_{name}_{kind}_recall50"] = rec
            out[f"gzsi_{name}_{kind}_ap50"] = ap
    return out


def evaluate_zsi(model: ZSIModel, loader, unseen_ids: Sequence[int], gzsi: bool = True,
                 baselines: bool = False, seed: int = 0) -> dict[str, float]:
    """ZSI (unseen only, on images holding an unseen instance) and GZSI (seen and unseen at
    once, every image; harmonic mean), boxes and masks, through pycocotools.

    -> flat dict: ``unseen_{box,mask}_{recall,ap}{40,50,60}``; with ``gzsi`` also
    ``gzsi_{seen,unseen,hm}_{box,mask}_{recall50,ap50}`` (GZSI at IoU 0.5, METHODS.md §5.0).
    With ``baselines``, two controls measured on the same model in the same call, under the
    keys ``chance_unseen_...`` and ``shuffled_unseen_...``:

    - chance: the model's own unseen detections, each label replaced by a uniformly random unseen
      class — what naming by chance scores with these very boxes and masks;
    - shuffled: the unseen class vectors permuted among the unseen classes (a cyclic shift), so
      every unseen class is scored with another one's vector — semantics removed, all else equal.
    """
    unseen = {int(i) for i in unseen_ids}
    was = model.training
    model.eval()
    try:
        records = _detect(model, loader, "unseen", unseen_ids)
        out = _zsi_figures(records, unseen)
        if gzsi:
            out.update(_gzsi_figures(_detect(model, loader, "gzsi", unseen_ids),
                                     set(model.seen_ids.tolist()), unseen))
        if baselines:
            g = torch.Generator().manual_seed(seed)
            pool = torch.tensor(sorted(unseen))

            def random_labels(img, labels):
                return pool[torch.randint(len(pool), (len(labels),), generator=g)]

            for k, v in _zsi_figures(records, unseen, random_labels).items():
                out[f"chance_{k}"] = v
            ids = sorted(unseen)
            vec = model.class_vectors.clone()
            try:
                model.class_vectors[ids] = vec[ids[1:] + ids[:1]]
                shuffled = _detect(model, loader, "unseen", unseen_ids)
                for k, v in _zsi_figures(shuffled, unseen).items():
                    out[f"shuffled_{k}"] = v
                out["shuffled_unseen_naming_acc"] = naming_accuracy(model, loader, ids)
            finally:
                model.class_vectors.copy_(vec)
            out["chance_unseen_naming_acc"] = 1 / len(ids)
    finally:
        model.set_output("seen")
        model.train(was)
    return out


@torch.no_grad()
def naming_accuracy(model: ZSIModel, loader, unseen_ids: Sequence[int]) -> float:
    """Top-1 accuracy of the zero-shot head naming unseen instances on their ground-truth boxes
    (among the unseen classes): the head alone, without the RPN's recall in the way."""
    unseen = list(unseen_ids)
    right = total = 0
    for batch in loader:
        for img, labels, boxes in zip(batch["image"], batch["instance_labels"], batch["boxes"]):
            keep = torch.tensor([int(x) in unseen for x in labels], dtype=torch.bool)
            if not keep.any():
                continue
            b = boxes[keep].float().clone()
            b[:, 2:] += 1
            s = model.scores_on_boxes(img, b, unseen)["unseen_scores"][:, 1:]
            pred = torch.tensor(unseen)[s.argmax(1).cpu()]
            right += int((pred == labels[keep].cpu()).sum())
            total += int(keep.sum())
    from .metrics import sum_over_ranks  # under DDP: every rank's instances

    right, total = sum_over_ranks((right, total))
    return right / max(total, 1)


def metric_fn(model: nn.Module, loader) -> dict[str, float]:
    """``fit``'s metric: ZSI / GZSI figures (pycocotools), unseen naming on ground-truth boxes,
    and the chance and shuffled-vector baselines on the same model (``evaluate_zsi``)."""
    unseen = _unseen_ids(model, loader)
    out = evaluate_zsi(model, loader, unseen, gzsi=True, baselines=True)
    out["unseen_naming_acc"] = naming_accuracy(model, loader, unseen)
    return out


def _unseen_ids(model: ZSIModel, loader) -> list[int]:
    ds = getattr(loader, "dataset", None)
    ids = getattr(ds, "unseen_class_ids", None)
    if ids:
        return list(ids)
    seen = set(model.seen_ids.tolist())
    return [k for k in range(1, model.num_classes) if k not in seen]


# ----------------------------------------------------------------------------------------------
# Full scale, run, load
# ----------------------------------------------------------------------------------------------

def full_scale_check(cfg: ZSIConfig | None = None) -> str | None:
    """Every piece the full-scale run lacks (a header, then one ``- `` line each with the exact
    command: GPUs, the timm weights, COCO 2014 with the ZSI files), or None."""
    from . import fullscale

    cfg = cfg or ZSIConfig.full()
    return fullscale.check("zeroshot", cfg.model_name if cfg.pretrained else None, gpus=4)


def full_data(cfg: ZSIConfig):
    """``(train, val)`` at full scale: COCO 2014 under ``cfg.split`` (``vitseg-lab eval`` reads a
    full-scale checkpoint's data through it)."""
    return _coco_data(cfg)


class COCOInstances(torch.utils.data.Dataset):
    """``COCOZeroShot`` in this chapter's sample format (the same as ShapeScenes').

    Labels are shifted by one (0 = background, seen classes 1..S, unseen S+1..K), boxes become
    inclusive pixel indices (COCO's exclusive ``x1, y1`` minus 1: ``targets_of`` and the
    evaluation add it back, so nothing is rounded), masks are bool; ``flip`` draws a horizontal
    flip per sample (the paper's only augmentation). ``class_vectors()`` puts the file's
    background column first.
    """

    def __init__(self, ds, flip: bool = False):
        self.ds, self.flip = ds, flip
        S = len(ds.seen_class_names)
        self.class_names = ["background", *ds.class_names]
        self.num_classes = len(self.class_names)
        self.seen_class_ids = list(range(1, S + 1))
        self.unseen_class_ids = list(range(S + 1, self.num_classes))

    def class_vectors(self) -> Tensor:
        return torch.cat([self.ds.background_vector[None], self.ds.class_vectors])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        s = self.ds[i]
        image = s["image"].as_subclass(Tensor)
        masks = s["instance_masks"].as_subclass(Tensor).bool()
        boxes = s["boxes"].as_subclass(Tensor).float().reshape(-1, 4)
        if self.flip and bool(torch.rand(()) < 0.5):
            W = image.shape[-1]
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], 1)
        boxes = boxes - torch.tensor([0.0, 0.0, 1.0, 1.0])
        return {"image": image, "instance_masks": masks, "boxes": boxes,
                "instance_labels": s["instance_labels"].as_subclass(Tensor).long() + 1}

    @staticmethod
    def collate(batch: list[dict]) -> dict:
        """Lists per key: COCO images differ in size (the detector's transform batches them)."""
        return {k: [b[k] for b in batch] for k in batch[0]}


def _coco_data(cfg: ZSIConfig, root: str | None = None):
    """COCO 2014 under ``cfg.split``: train_seen (flipped) and val_gzsi (every val image; ZSI
    figures are taken on the images holding an unseen instance, GZSI on all)."""
    from .data.coco_zsi import COCOZeroShot

    train = COCOZeroShot(root, split=cfg.split, subset="train_seen")
    val = COCOZeroShot(root, split=cfg.split, subset="val_gzsi")
    return COCOInstances(train, flip=True), COCOInstances(val)


def run(cfg: ZSIConfig) -> chapters.RunResult:
    """Build data and model, train with ``fit``, evaluate ZSI / GZSI and both baselines."""
    from .train import fit

    t0 = time.perf_counter()
    if cfg.dataset != "shapes":
        msg = full_scale_check(cfg)
        if msg:
            print(msg)
            return chapters.RunResult(None, None, {}, cfg.target_metric, cfg.target,
                                      time.perf_counter() - t0, _asdict(cfg), skipped=msg)
        train_ds, val_ds = _coco_data(cfg)
    else:
        train_ds, val_ds = quick_data(cfg)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        torch.manual_seed(cfg.train.seed)
        model = build(cfg, train_ds.num_classes, train_ds.class_vectors(),
                      train_ds.seen_class_ids)
        with warnings.catch_warnings():
            # fit's history.png puts every metric in one legend; ~60 ZSI/GZSI/baseline figures
            # overflow it and matplotlib warns (cosmetic: the plot is still written)
            warnings.filterwarnings("ignore", message="constrained_layout not applied")
            history = fit(model, train_ds, cfg.train, loss_fn, metric_fn, val_data=val_ds,
                          collate_fn=train_ds.collate,
                          meta=chapters.checkpoint_meta("zeroshot", cfg, train_ds.num_classes))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    metrics = dict(history.final)
    baseline = {k.removeprefix("shuffled_"): v for k, v in metrics.items()
                if k.startswith("shuffled_")}
    ckpt = f"{cfg.train.out_dir}/last.pt" if cfg.train.out_dir else None
    return chapters.RunResult(model, history, metrics, cfg.target_metric, cfg.target,
                              time.perf_counter() - t0, _asdict(cfg), baseline=baseline,
                              checkpoint=ckpt, val=val_ds)


def report(result: chapters.RunResult) -> str:
    """The run's unseen figures beside both baselines measured in the same run, as a table."""
    if result.skipped:
        return f"skipped: {result.skipped}"
    m = result.metrics
    rows = [("unseen mask mAP@0.5", "unseen_mask_ap50"), ("unseen box mAP@0.5", "unseen_box_ap50"),
            ("unseen mask Recall@100 (IoU 0.5)", "unseen_mask_recall50"),
            ("unseen box Recall@100 (IoU 0.5)", "unseen_box_recall50"),
            ("unseen naming on GT boxes", "unseen_naming_acc")]
    lines = [f"{'':<34}{'ours':>8}{'chance':>8}{'shuffled':>10}"]
    for label, key in rows:
        lines.append(f"{label:<34}{m.get(key, float('nan')):>8.3f}"
                     f"{m.get('chance_' + key, float('nan')):>8.3f}"
                     f"{m.get('shuffled_' + key, float('nan')):>10.3f}")
    lines.append(f"GZSI mask mAP@0.5: seen {m.get('gzsi_seen_mask_ap50', float('nan')):.3f}, "
                 f"unseen {m.get('gzsi_unseen_mask_ap50', float('nan')):.3f}, "
                 f"harmonic mean {m.get('gzsi_hm_mask_ap50', float('nan')):.3f}")
    lines.append(result.summary())
    return "\n".join(lines)


def _asdict(cfg: ZSIConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def load(checkpoint: str) -> ZSIModel:
    """The model rebuilt from a checkpoint written by ``run`` / ``fit``."""
    return chapters.load_model(checkpoint, "zeroshot")


def instance_explorer(model: ZSIModel, dataset, index: int = 0):
    """The chapter's explorer: one scene's instances, their seen and unseen scores, and the
    detections when the learner chooses which classes are unseen (re-scored, not retrained).

    Left: the scene with its ground-truth instances numbered. Middle: the detector's output in
    ``unseen`` mode for the chosen unseen classes (boxes, names, masks above 0.5). Right: for
    the chosen instance (on its ground-truth box), the seen probabilities and the unseen scores
    of ``seen_to_unseen``, and its mask for the best unseen class. Everything runs the learner's
    plugged functions.

    Args:
        model: a trained ``ZSIModel``. dataset: ShapeScenes-like items with ``image``,
            ``boxes`` (inclusive xyxy), ``instance_labels``; ``class_names`` and
            ``unseen_class_ids`` are read when present.
    Returns:
        an ipywidgets VBox; ``.state`` holds the scene, the unseen ids, the instance, its
        ``unseen_scores`` (1 + U,), ``seen_probs`` (1 + S,) and the detections' labels.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from . import viz

    model.eval()
    names = list(getattr(dataset, "class_names", [str(k) for k in range(model.num_classes)]))
    seen = model.seen_ids.tolist()
    default = list(getattr(dataset, "unseen_class_ids", []) or
                   [k for k in range(1, model.num_classes) if k not in seen])
    scene = widgets.IntSlider(value=index, min=0, max=len(dataset) - 1, description="scene")
    choose = widgets.SelectMultiple(options=[(names[k], k) for k in range(1, model.num_classes)],
                                    value=tuple(default), description="unseen", rows=5)
    inst = widgets.Dropdown(description="instance")
    out = widgets.Output()
    box = widgets.VBox([widgets.HBox([scene, inst]), choose, out])
    box.state = {}

    def instances(_=None):
        labels = dataset[scene.value]["instance_labels"].tolist()
        inst.options = [(f"{i}: {names[k]}" + (" (unseen)" if k not in seen else ""), i)
                        for i, k in enumerate(labels)]

    def draw():
        item = dataset[scene.value]
        image, labels = item["image"], item["instance_labels"]
        unseen = list(choose.value) or default
        dev = model.class_vectors.device
        model.set_output("unseen", unseen)
        try:
            with torch.no_grad():
                det = model(image[None].to(dev))[0]
        finally:
            model.set_output("seen")
        i = inst.value or 0
        b = item["boxes"][i:i + 1].float().clone()
        b[:, 2:] += 1
        res = model.scores_on_boxes(image.to(dev), b, unseen)
        un, sp = res["unseen_scores"][0].cpu(), res["seen_probs"][0].cpu()
        box.state.update(scene=scene.value, unseen=unseen, instance=i,
                         unseen_scores=un.clone(), seen_probs=sp.clone(),
                         det_labels=det["labels"].tolist())
        fig, ax = plt.subplots(1, 4, figsize=(13, 3.2),
                               gridspec_kw={"width_ratios": [1, 1, 1.3, 1]})
        viz.show_image(image, ax[0], title="scene, instances numbered")
        for j, (bb, k) in enumerate(zip(item["boxes"].tolist(), labels.tolist())):
            ax[0].add_patch(plt.Rectangle((bb[0] - .5, bb[1] - .5), bb[2] - bb[0] + 1,
                                          bb[3] - bb[1] + 1, fill=False, lw=1.5,
                                          ec="yellow" if j == i else "white"))
            ax[0].text(bb[0], bb[1], str(j), color="yellow", fontsize=8, va="bottom")
        shown = det["scores"] > 0.3
        sem = torch.zeros(image.shape[-2:], dtype=torch.long)
        for m, k in zip(det["masks"][shown].cpu(), det["labels"][shown].cpu()):
            sem[m[0] > 0.5] = int(k)
        viz.show_mask(image, sem, model.num_classes, ax[1],
                      title="detections, unseen mode (score > 0.3)")
        for bb, k, sc in zip(det["boxes"][shown].tolist(), det["labels"][shown].tolist(),
                             det["scores"][shown].tolist()):
            ax[1].text(bb[0], bb[1], f"{names[k]} {sc:.2f}", color="white", fontsize=7,
                       va="bottom", bbox={"facecolor": "black", "alpha": .5, "pad": 1})
        cols = ["background"] + [names[k] for k in seen]
        ucols = ["background"] + [names[k] for k in unseen]
        y = list(range(len(cols))) + [len(cols) + 0.5 + j for j in range(len(ucols))]
        vals = sp.tolist() + un.tolist()
        ax[2].barh(y, vals, color=["tab:blue"] * len(cols) + ["tab:orange"] * len(ucols))
        ax[2].set_yticks(y, [f"seen: {c}" for c in cols] + [f"unseen: {c}" for c in ucols],
                         fontsize=7)
        ax[2].invert_yaxis()
        ax[2].set_title(f"instance {i} ({names[int(labels[i])]}): seen p, unseen scores",
                        fontsize=9)
        best = int(un[1:].argmax()) + 1
        viz.show_heatmap(image, _paste(res["masks"][0, best].cpu(), b[0], image.shape[-2:]),
                         ax[3], vmin=0, vmax=1, title=f"mask as {ucols[best]}")
        fig.tight_layout()
        return fig

    def render(_=None):
        with out:
            out.clear_output(wait=True)
            fig = draw()
            plt.show()
            plt.close(fig)

    scene.observe(lambda _: (instances(), render()), names="value")
    choose.observe(render, names="value")
    inst.observe(render, names="value")
    instances()
    render()
    return box


def _paste(mask: Tensor, box: Tensor, size: tuple[int, int]) -> Tensor:
    """An (M, M) RoI mask pasted into its exclusive xyxy box on an image of ``size``."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    return paste_masks_in_image(mask[None, None], box[None], size)[0, 0]
