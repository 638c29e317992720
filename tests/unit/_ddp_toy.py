"""A tiny deterministic model, data set, loss and metric for test_train.py, and the entry point of
its DDP workers:

    torchrun --standalone --nproc_per_node 2 tests/unit/_ddp_toy.py OUT   # DDP over gloo

The data set draws augmentation noise from torch, numpy and Python's ``random`` and the model
has dropout, so a resume is exact only if every RNG state comes back.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vitseg_lab.metrics import sum_over_ranks
from vitseg_lab.train import TrainConfig, evaluate, fit, run_chapter

IN, HIDDEN, CLASSES = 6, 12, 3


class ToyData(Dataset):
    """n samples {"x": (6,), "y": int, "meta": {"idx": int, "name": str}}; y = argmax(W x)."""

    def __init__(self, n: int = 40, seed: int = 0, noise: bool = True):
        self.noise = noise
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN, generator=g)
        w = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(123))
        self.y = (self.x @ w).argmax(1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if self.noise:
            x = x + 0.01 * torch.randn(IN) + 0.01 * float(np.random.randn())
            x = x * 1.01 if random.random() < 0.5 else x
        return {"x": x, "y": self.y[i], "meta": {"idx": i, "name": f"s{i}"}}


class ToyNet(nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        if unused:  # a parameter forward never touches, as a ViT's final norm under a head
            self.unused = nn.LayerNorm(HIDDEN)  # that reads inner layers: DDP must cope
        self.backbone = nn.Sequential(nn.Linear(IN, HIDDEN), nn.LayerNorm(HIDDEN), nn.GELU(),
                                      nn.Dropout(0.1))
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        return self.head(self.backbone(x))


def toy_loss(model, batch):
    assert isinstance(batch["meta"]["name"], list)  # non-tensors pass through untouched
    logits = model(batch["x"])
    ce = F.cross_entropy(logits, batch["y"])
    return {"loss": ce, "ce": ce.detach(), "acc": (logits.argmax(1) == batch["y"]).float().mean()}


def toy_cfg(**kw) -> TrainConfig:
    base = {"steps": 20, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "log_every": 3,
            "progress": False, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def toy_model(seed: int = 0, unused: bool = False) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet(unused)


def toy_metric(model, loader):
    """Accuracy and item count, reduced across ranks under fit's sharded evaluation."""
    right = n = 0
    for batch in loader:
        right += int((model(batch["x"]).argmax(1) == batch["y"]).sum())
        n += len(batch["y"])
    right, n = sum_over_ranks((right, n))
    return {"acc": right / n, "n": n}


LOCAL_COUNTS: list[int] = []  # items each toy_metric call saw in this process


def counting_metric(model, loader):
    """toy_metric, also recording how many items this process evaluated."""
    LOCAL_COUNTS.append(sum(len(b["y"]) for b in loader))
    return toy_metric(model, loader)


@dataclass(frozen=True)
class ToyChapterConfig:
    """What ``run_chapter`` reads of a chapter config."""
    train: TrainConfig = field(default_factory=lambda: toy_cfg(steps=6, eval_every=6))
    num_threads: int = 1
    target_metric: str = "acc"
    target: float = 0.0


def toy_val() -> ToyData:
    """15 noise-free samples: an odd count (uneven shards), the same in every process."""
    return ToyData(15, seed=1, noise=False)


if __name__ == "__main__":  # torchrun --nproc_per_node 2 _ddp_toy.py OUT
    import torch.distributed as dist

    out = sys.argv[1]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    # run_chapter with no process group yet: it makes one for the baseline and fit, then ends it.
    # Twice: the second group is made after the first is destroyed, on the same torchrun store.
    res, again = (run_chapter("toy", ToyChapterConfig(), lambda cfg, k: toy_model(seed=rank),
                              toy_loss, counting_metric, (ToyData(40), toy_val()), CLASSES)
                  for _ in range(2))
    chapter = {"baseline": res.baseline, "final": res.metrics, "counts": LOCAL_COUNTS,
               "again": [again.baseline, again.metrics], "group_left": dist.is_initialized()}
    dist.init_process_group("gloo")  # here, so evaluate() below still has the group after fit
    # Different weights on purpose: DDP must broadcast rank 0's.
    model = toy_model(seed=rank, unused=True)
    cfg = toy_cfg(steps=12, out_dir=os.path.join(out, "run"), ckpt_every=5, eval_every=6)
    hist = fit(model, ToyData(40), cfg, toy_loss, toy_metric, val_data=toy_val())
    loss_eval = evaluate(model, toy_val(), cfg, toy_loss)  # no metric_fn: mean loss terms
    torch.save({"state": model.state_dict(), "final": hist.final, "rows": hist.rows,
                "loss_eval": loss_eval, "chapter": chapter}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()
