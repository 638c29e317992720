"""A tiny deterministic model, data set and loss for test_train.py, and the entry point of its
subprocesses.

    torchrun --standalone --nproc_per_node 2 tests/unit/_ddp_toy.py ddp OUT   # DDP over gloo
    python tests/unit/_ddp_toy.py kill OUT K THREADS                          # SIGKILL at step K

The data set draws augmentation noise from torch, numpy and Python's ``random`` and the model
has dropout, so a resume is exact only if every RNG state comes back.
"""

from __future__ import annotations

import os
import random
import signal
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vitseg_lab.train import TrainConfig, fit

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


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    # CPU kernels reduce in thread-sized chunks: bit-equal weights need the parent's thread count.
    torch.set_num_threads(int(sys.argv[4]) if mode == "kill" else 1)
    if mode == "ddp":
        rank = int(os.environ["RANK"])
        # Different weights on purpose: DDP must broadcast rank 0's.
        model = toy_model(seed=rank, unused=True)
        cfg = toy_cfg(steps=12, out_dir=os.path.join(out, "run"), ckpt_every=5)
        hist = fit(model, ToyData(40), cfg, toy_loss)
        torch.save({"state": model.state_dict(), "final": hist.final},
                   os.path.join(out, f"rank{rank}.pt"))
    elif mode == "kill":
        kill_at = int(sys.argv[3])
        calls = 0

        def killing_loss(model, batch):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real crash
            return toy_loss(model, batch)

        fit(toy_model(), ToyData(40), toy_cfg(out_dir=out, ckpt_every=5), killing_loss)
