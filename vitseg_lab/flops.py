"""What SegViT-Shrunk saves: plain vs Shrunk ViT-L/16 SegViT at the paper's sizes, counted by
``torch.utils.flop_counter.FlopCounterMode`` on PyTorch's ``meta`` device (shapes only: no weights,
no memory, seconds on a laptop).

Zhang et al., "SegViT: Semantic Segmentation with Plain Vision Transformers" (NeurIPS 2022) and
its official code (github.com/zbwxp/SegVit): 637.9 GFLOPs for ViT-L SegViT, 373.5 for SegViT-Shrunk
on a 640 x 640 ADE20K image. Those "GFLOPs" are mmcv's count, multiply-adds; so are ours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .backbone import ViTBackbone, quick_vit
from .segvit import ADE_CLASSES, PAPER, ATMHead, SegViT
from .shrunk import QueryUpsampler, ShrunkSegViT

__all__ = ["build_paper_models", "count_gmacs", "flops_table", "print_flops_table"]


def build_paper_models(img_size: int = 640, num_classes: int = ADE_CLASSES,
                       device: str | torch.device = "meta") -> dict[str, nn.Module]:
    """ViT-L/16 SegViT and SegViT-Shrunk at the paper's sizes (random init; ``meta``: no memory).

    Plain: layers 8, 16, 24 (``out_indices`` 7, 15, 23) decoded by 3 stages of 3 layers,
    d = 512, 16 heads. Shrunk: QD at block index 8, QU with (img/16)^2 queries and 3-layer
    decoders, then a single-stage ATM head. -> {"SegViT ViT-L": ..., "SegViT-Shrunk ViT-L": ...}
    """
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
