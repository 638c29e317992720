"""Segmentation losses: sigmoid focal and dice on binary masks, and SegViT's ATM criterion.

Chapter 03 (SegViT, Zhang et al., NeurIPS 2022; the weights are its official code's) trains every
cascade stage with ``1.0·CE(class) + 20·focal(mask) + 1.0·dice(mask)`` (focal: Lin et al., ICCV
2017; dice: Milletari et al., 3DV 2016): a (K+1)-way cross-entropy per class token ("no object"
weighted 0.1) and two mask losses on the classes present in the image.

Ignore pixels (label 255): the official code leaves them out of the list of present classes but
counts them as negatives in every binary mask target. This course leaves them out of the mask
losses too (``ignore_in_masks="skip"``, the default): an ignored pixel is a pixel whose label is
unknown, typically an object boundary, and calling it "not class k" for every k would teach each
mask to stop one pixel short of its object. ``ignore_in_masks="negative"`` reproduces the paper.

Shapes: B batch · S cascade stages · K classes = class tokens · N masks of present classes ·
P pixels · H, W pixels · h, w mask grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["atm_loss", "dice_loss", "global_num_masks", "sigmoid_focal_loss"]



# ----------------------------------------------------------------------------------------------
# Exercises
# ----------------------------------------------------------------------------------------------

def sigmoid_focal_loss(logits: Tensor, targets: Tensor, valid: Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Exercise 3.5 · sigmoid focal loss of each mask, averaged over its valid pixels.

    Per pixel, with p = sigmoid(x) and t the binary target:
    p_t = p·t + (1 - p)·(1 - t),  α_t = α·t + (1 - α)·(1 - t),
    FL = -α_t · (1 - p_t)^γ · log(p_t)      (Lin et al. 2017; -log p_t is the BCE with logits).
    Each mask's loss is the mean of FL over its valid pixels (0 when it has none).

    Args:
        logits: (N, P) mask logits. targets: (N, P) float, 1 inside the mask, 0 outside.
        valid: (N, P) bool, False where the label is ignored.
    Returns:
        (N,) one loss per mask.
    """
    ### BEGIN SOLUTION
    p = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log p_t
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    loss = alpha_t * (1 - p_t) ** gamma * bce * valid
    return loss.sum(-1) / valid.sum(-1).clamp(min=1)
    ### END SOLUTION


def dice_loss(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Exercise 3.6 · soft dice loss of each mask over its valid pixels (smoothed by 1).

    With p = sigmoid(x) and sums over the valid pixels only:
    dice = 1 - (2·Σ p·t + 1) / (Σ p + Σ t + 1).

    Args:
        logits: (N, P) mask logits. targets: (N, P) float in {0, 1}.
        valid: (N, P) bool, False where the label is ignored.
    Returns:
        (N,) one loss per mask, in [0, 1).
    """
    ### BEGIN SOLUTION
    p = logits.sigmoid() * valid
    t = targets * valid
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    ### END SOLUTION


# ----------------------------------------------------------------------------------------------
# The ATM criterion (scaffolding; calls the exercises through this module's globals)
# ----------------------------------------------------------------------------------------------

def atm_targets(semantic: Tensor, num_classes: int, ignore_index: int = 255
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token targets of SegViT: token k is class k, absent classes are "no object" (index K).

    Args:
        semantic: (B, H, W) int64 class ids, ``ignore_index`` where unlabelled.
    Returns:
        present: (B, K) bool, class k occurs at a labelled pixel;
        class_target: (B, K) int64, k where present else K;
        onehot: (B, K, H, W) float, ``semantic == k`` (ignore pixels are 0 in every channel).
    """
    if semantic.dim() != 3 or semantic.is_floating_point():
        raise ValueError(f"semantic must be (B, H, W) int class ids, got {tuple(semantic.shape)} "
                         f"{semantic.dtype}; pass batch['semantic'].")
    K = num_classes
    labelled = semantic != ignore_index
    bad = labelled & ((semantic < 0) | (semantic >= K))
    if bool(bad.any()):
        raise ValueError(f"semantic holds class id {int(semantic[bad][0])} outside [0, {K}) "
                         f"(ignore_index={ignore_index}); check num_classes.")
    ids = torch.where(labelled, semantic, K)                      # ignore -> an extra channel
    onehot = F.one_hot(ids, K + 1)[..., :K].permute(0, 3, 1, 2)   # (B, K, H, W), drop it again
    present = onehot.flatten(2).any(-1)                           # (B, K)
    arange = torch.arange(K, device=semantic.device).expand_as(present)
    class_target = torch.where(present, arange, torch.full_like(arange, K))
    return present, class_target, onehot.float()


def global_num_masks(num_masks: int, device: torch.device | str = "cpu",
                     reduce: bool = True) -> float:
    """The mask-loss normaliser as the official criterion computes it: this process's count of
    present-class masks, summed over the DDP ranks (``all_reduce``) and divided by the world size
    when ``torch.distributed`` is initialised and ``reduce``; then at least 1.

    So every rank divides by the *average* count, not its own: a rank whose images hold few
    classes does not weigh its few masks up.
    """
    n = torch.tensor(float(num_masks), device=device)
    if reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return max(float(n), 1.0)


def atm_loss(
    class_logits: list[Tensor],
    mask_logits: list[Tensor],
    semantic: Tensor,
    *,
    ignore_index: int = 255,
    ce_weight: float = 1.0,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    no_object_weight: float = 0.1,
    ignore_in_masks: str = "skip",
    reduce_num_masks: bool = True,
) -> dict[str, Tensor]:
    """SegViT's loss with deep supervision: the same weighted sum at every cascade stage, summed.

    Args:
        class_logits: per stage, (B, K, K+1) class logits of the K class tokens.
        mask_logits: per stage, (B, K, h, w) accumulated mask logits; upsampled (bilinear) to the
            label size before the mask losses, as the paper does.
        semantic: (B, H, W) int64 labels, ``ignore_index`` = unlabelled.
        ignore_in_masks: "skip" (course default) leaves ignore pixels out of focal and dice;
            "negative" counts them as background of every mask (the official code).
        reduce_num_masks: normalise focal and dice by ``global_num_masks`` (the count averaged
            over DDP ranks, as the official code); False: by this process's own count.
    Returns:
        {"loss": total over stages, "ce", "focal", "dice": the last stage's terms, detached}.
    """
    if len(class_logits) != len(mask_logits) or not class_logits:
        raise ValueError(f"got {len(class_logits)} stages of class logits and {len(mask_logits)} "
                         "of mask logits; pass one of each per cascade stage.")
    if ignore_in_masks not in ("skip", "negative"):
        raise ValueError(f"ignore_in_masks={ignore_in_masks!r}; use 'skip' or 'negative'.")
    K = class_logits[0].shape[1]
    if class_logits[0].shape[-1] != K + 1:
        raise ValueError(f"class logits {tuple(class_logits[0].shape)} should be (B, K, K+1): "
                         "K tokens, K classes + 'no object'.")
    present, class_target, onehot = atm_targets(semantic, K, ignore_index)
    H, W = semantic.shape[-2:]
    valid = (semantic != ignore_index) if ignore_in_masks == "skip" else torch.ones_like(
        semantic, dtype=torch.bool)
    valid = valid.flatten(1)[:, None].expand(-1, K, -1)[present]   # (N, H*W)
    targets = onehot.flatten(2)[present]                            # (N, H*W)
    num_masks = global_num_masks(int(present.sum()), semantic.device, reduce_num_masks)
    empty_weight = class_logits[0].new_ones(K + 1)
    empty_weight[K] = no_object_weight

    total = class_logits[0].new_zeros(())
    for cls, masks in zip(class_logits, mask_logits):
        ce = F.cross_entropy(cls.transpose(1, 2), class_target, weight=empty_weight)
        # Upsample only the present classes' masks (the others get no mask loss).
        logits = F.interpolate(masks[present][:, None], size=(H, W), mode="bilinear",
                               align_corners=False).flatten(1)      # (N, H*W)
        focal = sigmoid_focal_loss(logits, targets.to(logits.dtype), valid).sum() / num_masks
        dice = dice_loss(logits, targets.to(logits.dtype), valid).sum() / num_masks
        total = total + ce_weight * ce + focal_weight * focal + dice_weight * dice
    return {"loss": total, "ce": ce.detach(), "focal": focal.detach(), "dice": dice.detach()}
