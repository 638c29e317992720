"""Segmentation metrics from one confusion matrix: mean IoU and pixel accuracy.

Every metric here is a function of the (K, K) confusion matrix, accumulated over a whole data set
first: mIoU is *not* the mean of per-image IoUs (an image without a class would count it as 0 or
skip it, and small images would weigh as much as large ones). This is how ADE20K, VOC and
mmsegmentation report it.

Shapes: K classes; pred and target share any shape (B, H, W), (H, W)... of integer class ids;
``ignore_index`` (255 by default) marks unlabelled pixels in target.

Under DDP, ``fit`` evaluates each process's ``shard`` of the eval set inside ``sharded_eval``,
where ``SegMeter.compute``, ``sum_over_ranks`` and ``gather_over_ranks`` reduce across the
processes, so every chapter's metric is the whole set's, exactly (see the section at the end).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["SegMeter", "confusion_matrix", "eval_world", "gather_over_ranks", "miou",
           "pixel_accuracy", "shard", "sharded_eval", "sum_over_ranks"]


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255
) -> Tensor:
    """Count (target, pred) pairs over all labelled pixels.

    Args:
        pred: (...) int, predicted class ids in [0, K).
        target: (...) int, same shape; pixels equal to ``ignore_index`` are skipped.
        num_classes: K.
        ignore_index: label of unlabelled pixels (None: every pixel counts).

    Returns:
        (K, K) int64 on pred's device: ``conf[t, p]`` = number of pixels of class t predicted p
        (rows = target, columns = prediction).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape; "
            "take pred = logits.argmax(1) after upsampling the logits to the label size."
        )
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"{name} must hold integer class ids but has dtype {t.dtype}; "
                "use logits.argmax(1) for predictions and .long() for labels."
            )
    k = num_classes
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long().to(pred.device)
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    # Only labelled pixels are checked: a prediction under an ignored pixel never counts.
    for name, t in (("pred", pred), ("target", target)):
        bad = (t < 0) | (t >= k)
        if bool(bad.any()):
            raise ValueError(
                f"{name} holds class id {int(t[bad][0])} outside [0, {k}) at a labelled pixel; "
                f"check num_classes={k} and ignore_index={ignore_index}."
            )
    return torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)


def miou(conf: Tensor) -> tuple[float, Tensor]:
    """Mean intersection-over-union from a confusion matrix.

    conf: (K, K), rows = target, columns = prediction
    -> (mean IoU over classes whose IoU is defined, per-class IoU (K,) float64 on CPU).

    IoU_c = TP / (TP + FP + FN); a class absent from both target and prediction has no IoU
    (NaN) and does not enter the mean. All classes absent: the mean is NaN.
    """
    conf = _square(conf)
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    per_class = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    defined = per_class[~per_class.isnan()]
    mean = defined.mean().item() if defined.numel() else math.nan
    return mean, per_class


def pixel_accuracy(conf: Tensor) -> float:
    """Fraction of labelled pixels predicted right: trace / sum of conf (K, K). NaN if empty."""
    conf = _square(conf)
    total = conf.sum().item()
    return conf.diagonal().sum().item() / total if total > 0 else math.nan


def _square(conf: Tensor) -> Tensor:
    if conf.dim() != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(
            f"conf must be a (K, K) confusion matrix, got shape {tuple(conf.shape)}; "
            "build it with confusion_matrix(pred, target, num_classes)."
        )
    return conf.detach().to("cpu", torch.float64)  # CPU: MPS has no float64


class SegMeter:
    """Accumulate one confusion matrix over many batches, then report mIoU and pixel accuracy.

    Example::

        meter = SegMeter(num_classes=K)
        for batch in loader:
            meter.update(model(batch["image"]), batch["mask"])   # logits (B, K, H, W) or ids
        meter.compute()   # {"mIoU": 0.71, "pixel_acc": 0.93, "iou": [0.9, 0.5, nan, ...]}
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: (B, H, W) int class ids, or logits (B, K, H, W); target: (B, H, W) int."""
        if pred.is_floating_point() and pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {pred.shape[1]} channels at dim 1 but the meter counts "
                    f"{self.num_classes} classes; pass class ids or (B, K, H, W) logits."
                )
            pred = pred.argmax(1)
        conf = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.conf += conf.cpu()

    def compute(self) -> dict:
        """-> {"mIoU": float, "pixel_acc": float, "iou": list of K floats (NaN = class absent)}.

        Inside ``sharded_eval`` (fit's evaluation under DDP) the confusion matrix is first summed
        over the processes (``self.conf`` itself stays this process's), so every rank reports the
        whole eval set exactly."""
        conf = sum_over_ranks(self.conf)
        mean, per_class = miou(conf)
        return {"mIoU": mean, "pixel_acc": pixel_accuracy(conf), "iou": per_class.tolist()}


# -- evaluation spread over the processes of a multi-GPU run ----------------------------------------
#
# Under DDP, ``train.evaluate`` (and so ``fit``) gives each process its own shard of the eval set
# (``shard``: items rank, rank + world, ...) and runs the chapter's ``metric_fn`` inside
# ``sharded_eval()``. There, every chapter's metric reduces its *sufficient statistics* across the
# processes before it computes anything, so each rank reports the metric of the whole set:
#
# - ``SegMeter.compute()`` sums the confusion matrices (integers: exact);
# - ``sum_over_ranks(x)`` sums counts (top-1 hits, found / total);
# - ``gather_over_ranks(items)`` brings every process's per-item results (scores for mAP, masks
#   for oIoU / prec@X, detection records for COCO AP) back into the data set's order, so an
#   order-dependent metric (ties in a ranking, a seeded random baseline) sees what one process
#   sees.
#
# Outside ``sharded_eval`` (one process, or a metric_fn called on the whole set) all three are
# no-ops, so a metric_fn written with them runs unchanged in a notebook.

_SHARDED: list[tuple[int, int]] = []  # stack of (rank, world) while sharded_eval is active


@contextlib.contextmanager
def sharded_eval(rank: int, world: int):
    """Mark the block as this process's part of an evaluation split by ``shard(rank, world)``:
    ``SegMeter.compute``, ``sum_over_ranks`` and ``gather_over_ranks`` reduce across the
    ``world`` processes of the default ``torch.distributed`` group inside it."""
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sharded_eval(world > 1) needs an initialised torch.distributed group.")
    _SHARDED.append((rank, world))
    try:
        yield
    finally:
        _SHARDED.pop()


def eval_world() -> tuple[int, int]:
    """``(rank, world)`` of the sharded evaluation in progress; ``(0, 1)`` outside one."""
    return _SHARDED[-1] if _SHARDED else (0, 1)


class _Shard(Dataset):
    """Items ``rank, rank + world, ...`` of ``dataset``; other attributes (``collate``,
    ``num_classes``, ``unseen_class_ids``...) are the data set's."""

    def __init__(self, dataset: Any, rank: int, world: int):
        self.dataset, self.indices = dataset, range(rank, len(dataset), world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "indices"):  # unpickling: no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def shard(dataset: Any, rank: int | None = None, world: int | None = None) -> Dataset:
    """This process's share of ``dataset`` for evaluation: items rank, rank + world, ... (no
    padding, unlike ``DistributedSampler``, so no image is counted twice; ranks may hold one item
    more than others). Rank and world default to the ``torch.distributed`` group's."""
    r, w = (dist.get_rank(), dist.get_world_size()) if (
        dist.is_available() and dist.is_initialized()) else (0, 1)
    return _Shard(dataset, r if rank is None else rank, w if world is None else world)


def _comm_device() -> torch.device:
    # gloo reduces CPU tensors, NCCL CUDA ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(x: Any) -> Any:
    """Inside ``sharded_eval``: ``x`` summed over the processes (a tensor, an int or float, or a
    tuple / list of them; a new object, ``x`` is not changed). Outside: ``x``. Exact for integer
    counts; float sums may differ from one process's in the last bits."""
    if eval_world()[1] == 1:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(sum_over_ranks(v) for v in x)
    if isinstance(x, Tensor):
        t = x.detach().to(_comm_device(), copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(x.device)
    if isinstance(x, (int, float)):
        dtype = torch.int64 if isinstance(x, int) else torch.float64
        return type(x)(sum_over_ranks(torch.tensor(x, dtype=dtype)).item())
    raise TypeError(f"sum_over_ranks sums tensors and numbers, not {type(x).__name__}.")


def gather_over_ranks(items: Any) -> Any:
    """Inside ``sharded_eval``: every process's ``items`` (a tensor (N_rank, ...) or a list of
    N_rank entries, one per item of its shard, in shard order) -> the whole eval set's, in the
    data set's order (a tensor on ``items``' device, or a list). Outside: ``items``."""
    world = eval_world()[1]
    if world == 1:
        return items
    if not isinstance(items, (Tensor, list)):
        raise TypeError(f"gather_over_ranks takes a tensor or a list, not {type(items).__name__}.")
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, items.detach().cpu() if isinstance(items, Tensor) else items)
    n = sum(len(p) for p in parts)
    for r, p in enumerate(parts):
        if len(p) != len(range(r, n, world)):
            raise ValueError(
                f"gather_over_ranks: rank {r} sent {len(p)} entries for its {len(range(r, n, world))}"
                " items; pass one entry per item of the process's shard.")
    if isinstance(items, Tensor):
        # item i of the data set is entry i // world of rank i % world
        flat = torch.cat(parts)
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + len(p))
        order = torch.tensor([offsets[i % world] + i // world for i in range(n)], dtype=torch.long)
        return flat[order].to(items.device)
    return [parts[i % world][i // world] for i in range(n)]
