"""What SegViT costs, counted two ways: plain vs Shrunk ViT-L/16 SegViT at 640 and ViT-B/16 at 512,
built from the chapter's own full-scale configs on PyTorch's ``meta`` device (shapes only: no
weights, no memory, seconds on a laptop).

Zhang et al., "SegViT: Semantic Segmentation with Plain Vision Transformers" (NeurIPS 2022) and
its official code (github.com/zbwxp/SegVit): 637.9 GFLOPs for ViT-L SegViT, 373.5 for
SegViT-Shrunk (640 x 640 ADE20K image), 120.9 for ViT-B at its 512 crop. The official repository
counts them with **fvcore**'s ``FlopCountAnalysis`` (its mmcv call is commented out; METHODS
§1.6), whose rules are:

- one FLOP per multiply-add of every matmul / linear / conv / einsum (our ``FlopCounterMode``
  counts 2 per multiply-add: we halve it);
- the whole inference at crop size: the model, the bilinear upsampling of the masks to the crop,
  the semantic-inference einsum (K x K x H x W: 9.22 G for ViT-L at 640 with 150 classes) and the
  segmentor's final resize of the scores to the image (mmseg's ``encode_decode``), a same-size
  resize that fvcore still counts;
- ``aten::upsample_bilinear2d`` at 4 per output element, ``aten::layer_norm`` at 5 per input
  element (4 without affine); softmax, GELU, additions and the like count 0.

``count_gmacs`` gives both: ``torch`` = FlopCounterMode over the model's forward (matmuls, convs,
attention: what PyTorch counts by default), ``fvcore`` = the same rules as fvcore, i.e. the full
inference with LayerNorm and bilinear upsampling counted as fvcore counts them. fvcore itself is
not a dependency: its three extra rules are registered on ``FlopCounterMode`` here.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import segvit
from .segvit import ADE_CLASSES, PAPER, SegViTConfig, build

__all__ = ["FVCORE_RULES", "build_paper_models", "count_gmacs", "flops_table",
           "print_flops_table"]

aten = torch.ops.aten


def _layer_norm_flops(x_shape, normalized_shape=None, weight=None, *args, out_shape=None,
                      **kwargs) -> int:
    # fvcore norm_flop_counter: 5 per input element with affine parameters, 4 without; x2 because
    # FlopCounterMode counts 2 per multiply-add and everything is halved at the end.
    return 2 * math.prod(x_shape) * (5 if weight is not None else 4)


def _bilinear_flops(*args, out_shape=None, **kwargs) -> int:
    # fvcore elementwise_flop_counter(0, 4) on aten::upsample_bilinear2d: 4 per output element.
    return 2 * 4 * math.prod(out_shape)


#: The rules fvcore adds to FlopCounterMode's (both counted as multiply-adds after halving).
FVCORE_RULES = {aten.native_layer_norm: _layer_norm_flops,
                aten.upsample_bilinear2d: _bilinear_flops,
                aten._upsample_bilinear2d_aa: _bilinear_flops}

#: name -> (config, image size, paper GFLOPs); configs are the chapter's full-scale ones.
_MODELS = {
    "SegViT ViT-L": (lambda: SegViTConfig.full_large(), 640, PAPER["vit_l_gflops"]),
    "SegViT-Shrunk ViT-L": (lambda: replace(SegViTConfig.full_large(), structure="shrunk",
                                            qd_index=8), 640, PAPER["vit_l_shrunk_gflops"]),
    "SegViT ViT-B": (lambda: SegViTConfig.full(), 512, PAPER["vit_b_gflops"]),
}


def build_paper_models(num_classes: int = ADE_CLASSES, device: str | torch.device = "meta"
                       ) -> dict[str, tuple[nn.Module, int, float]]:
    """The paper's three cost rows, each ``segvit.build`` of the chapter's full-scale config with
    a randomly initialised ViT of the same shape (no weights are read; ``meta``: no memory).

    ViT-L: layers 8, 16, 24 decoded by 3 stages of 3 layers, d = 512, 16 heads, no CLS token.
    Shrunk: QD at block index 8, no final norm, QU with (img/16)^2 queries and 3-layer decoders,
    ``ATMSingleHead``. ViT-B: layers 6, 8, 12, d = 384, 12 heads, at 512.
    -> {name: (model in eval mode, image size, paper GFLOPs)}
    """
    out = {}
    for name, (make, img, paper) in _MODELS.items():
        cfg = replace(make(), model_name="quick", pretrained=False, img_size=img)
        with torch.device(device):
            out[name] = (build(cfg, num_classes).eval(), img, paper)
    return out


def count_gmacs(model: nn.Module, img_size: int = 640) -> dict[str, float]:
    """Cost of one ``img_size`` x ``img_size`` image in G multiply-adds, two ways.

    -> {"torch": FlopCounterMode over ``model(x)`` (default rules),
        "backbone", "head": the torch count split by module (head = decoder + QU),
        "fvcore": fvcore's rules over ``model.predict(x)`` + the final resize,
        "layer_norm", "upsample": the fvcore count's LayerNorm and bilinear terms,
        "inference": the fvcore count's matmul part beyond the forward (the einsum)}
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    extra = tuple(FVCORE_RULES)
    # One pass over the whole inference with fvcore's extra rules; the default-rule count of the
    # forward is read from the same pass: the submodules' ops less LayerNorm and upsampling.
    # Grad mode on: FlopCounterMode's module tracker needs it, and on meta it costs nothing.
    with FlopCounterMode(display=False, custom_mapping=FVCORE_RULES) as counter:
        scores = model.predict(x)
        # mmseg's encode_decode resizes the scores to the image: same size here, fvcore counts it
        F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)
    per_module = counter.get_flop_counts()
    top = type(model).__name__

    def without_extra(counts: dict) -> float:
        return sum(v for k, v in counts.items() if k not in extra) / 2e9

    ops = per_module["Global"]
    ln = ops.get(aten.native_layer_norm, 0) / 2e9
    up = sum(ops.get(op, 0) for op in (aten.upsample_bilinear2d, aten._upsample_bilinear2d_aa)) / 2e9
    fvcore = counter.get_total_flops() / 2e9
    # The semantic-inference einsum, counted on its own (it runs outside every submodule).
    K = model.num_classes
    with FlopCounterMode(display=False) as ein:
        segvit.semantic_scores(torch.zeros(1, K, K + 1, device=device),
                               torch.zeros(1, K, img_size, img_size, device=device))
    inference = ein.get_total_flops() / 2e9
    total = fvcore - ln - up - inference
    head = sum(without_extra(per_module.get(f"{top}.{m}", {})) for m in ("head", "upsampler"))
    return {"torch": total, "backbone": total - head, "head": head, "fvcore": fvcore,
            "layer_norm": ln, "upsample": up, "inference": inference}


def flops_table(num_classes: int = ADE_CLASSES) -> list[dict[str, Any]]:
    """Both counts of the paper's three cost rows beside its GFLOPs (G multiply-adds)."""
    rows = []
    for name, (model, img, paper) in build_paper_models(num_classes).items():
        c = count_gmacs(model, img)
        rows.append({"model": name, "img": img, "torch": round(c["torch"], 1),
                     "backbone": round(c["backbone"], 1), "head": round(c["head"], 1),
                     "inference": round(c["inference"], 2), "upsample": round(c["upsample"], 2),
                     "layer_norm": round(c["layer_norm"], 2), "fvcore": round(c["fvcore"], 1),
                     "paper": paper})
    base = rows[0]["fvcore"]
    for r in rows[:2]:
        r["saving"] = round(1 - r["fvcore"] / base, 3)
    return rows


def print_flops_table(rows: list[dict[str, Any]]) -> None:
    """The table ``flops_table`` returns, as text (G multiply-adds, the paper's unit)."""
    print("One image, 150 classes, G multiply-adds. torch = FlopCounterMode over the forward; "
          "fvcore rules = + semantic-inference einsum, bilinear upsampling, LayerNorm "
          "(how the paper counted)")
    print(f"{'model':<20}{'crop':>5}{'torch':>8}{'+einsum':>8}{'+upsmp':>8}{'+LN':>7}"
          f"{'fvcore':>8}{'paper':>8}{'saving':>8}")
    for r in rows:
        saving = f"{r['saving']:>8.0%}" if "saving" in r else f"{'':>8}"
        print(f"{r['model']:<20}{r['img']:>5}{r['torch']:>8.1f}{r['inference']:>8.2f}"
              f"{r['upsample']:>8.2f}{r['layer_norm']:>7.2f}{r['fvcore']:>8.1f}{r['paper']:>8.1f}"
              f"{saving}")
    paper = 1 - PAPER["vit_l_shrunk_gflops"] / PAPER["vit_l_gflops"]
    print(f"{'paper saving (ViT-L)':<20}{'':>60}{paper:>8.0%}")
