"""Chapter 04 (AFA): what limits the random walk at quick scale — measured on a trained model.

On a trained quick checkpoint (default ``runs/afa-quick/last.pt``, written by the notebook or
``vitseg-lab train afa``) and the quick validation scenes, prints:

1. every stage's mIoU (``afa.stage_predictions``, as ``metric_fn``);
2. the learned affinity (the image's own grid) against the *true* token labels inside the
   window: accuracy of A > 0.5, and the mean A over same-object (foreground) pairs, background
   pairs and different-class pairs;
3. one random-walk step from the same CAM, at background scores 0.35 (the released validation's
   score for the walk), 0.45 (the one every stage of ``metric_fn`` uses) and 0.55, with the
   affinity of the image itself (the released validation) and of the 1.5x (the released
   training walk) and 2x views, against the CAM at the same score;
4. ceilings that do not depend on the learned affinity: the walk with an *oracle* affinity on
   the image's own grid — soft (cosine of the two tokens' true class fractions, boundary
   pixels left out) and binary (1 iff the true classes at the two tokens' sampled pixels agree:
   the best an affinity trained on token-resolution labels can learn).

Writes ``benchmarks/results/diag_afa_rw.json``. Run:
``.venv/bin/python benchmarks/diag_afa_rw.py [checkpoint]`` (one thread, about a minute).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vitseg_lab import afa
from vitseg_lab.metrics import SegMeter

OUT = Path(__file__).parent / "results" / "diag_afa_rw.json"


def main(checkpoint: str = "runs/afa-quick/last.pt") -> dict:
    torch.set_num_threads(1)
    model = afa.load(checkpoint).eval()
    cfg = model.cfg
    _, val = afa.quick_data(cfg)
    batch = val.collate([val[i] for i in range(len(val))])
    imgs, sems, labs = batch["image"], batch["semantic"], batch["labels"].float()
    K, (H, W) = model.num_classes, imgs.shape[-2:]

    def miou(pred):
        m = SegMeter(K)
        m.update(pred, sems)
        return round(m.compute()["mIoU"], 3)

    def walk(cams, aff, grid, score, radius=cfg.radius):
        probs = afa.add_background(afa._resize(cams, grid), labs, score)
        rw = afa.random_walk(probs, aff, afa.window_mask(*grid, radius), cfg.alpha)
        return miou(afa._resize(rw, (H, W)).argmax(1))

    res: dict = {"checkpoint": checkpoint, "val_scenes": len(val),
                 "config": {k: getattr(cfg, k) for k in (
                     "img_size", "patch_size", "radius", "walk_scale", "aff_init", "aff_weight",
                     "cam_iters", "bkg_score")}}
    with torch.no_grad():
        res["stages"] = {k: miou(v) for k, v in afa.stage_predictions(model, imgs, labs).items()}
        cams, _, _ = afa.multi_scale_cams(model, imgs, cfg.cam_scales, cfg.cam_flip)
        cams = cams * labs[:, :, None, None]
        A, (h, w) = afa.walk_affinity(model, imgs, 1.0)
        mask = afa.window_mask(h, w, cfg.radius)
        tok = afa._labels_at(sems, (h, w)).flatten(1)
        known = (tok[:, :, None] != 255) & (tok[:, None, :] != 255) & mask
        same = tok[:, :, None] == tok[:, None, :]
        fg = tok[:, :, None] > 0
        res["affinity"] = {
            "grid": [h, w],
            "acc_A>0.5": round(((A > 0.5) == same)[known].float().mean().item(), 3),
            "mean_A_same_object_class": round(A[known & same & fg].mean().item(), 3),
            "mean_A_background_pairs": round(A[known & same & ~fg].mean().item(), 3),
            "mean_A_different_class": round(A[known & ~same].mean().item(), 3),
            "share_of_positive_pairs_that_are_foreground":
                round((known & same & fg).sum().item() / max(1, (known & same).sum().item()), 3),
        }
        views = {s: afa.walk_affinity(model, imgs, s) for s in (1.0, 1.5, 2.0)}
        res["walk_vs_cam"] = {}
        for score in (0.35, 0.45, 0.55):
            row = {"cam": miou(afa.add_background(cams, labs, score).argmax(1))}
            for s, (aff, grid) in views.items():
                row[f"rw_view{s}x_grid{grid[0]}"] = walk(cams, aff, grid, score)
            res["walk_vs_cam"][f"bkg_score_{score}"] = row
        # oracles on the image's own grid; 255 (object boundaries) belongs to no class
        onehot = F.one_hot(torch.where(sems == 255, K, sems), K + 1).permute(0, 3, 1, 2)
        frac = F.adaptive_avg_pool2d(onehot[:, :K].float(), (h, w)).flatten(2)
        unit = frac / frac.norm(dim=1, keepdim=True).clamp_min(1e-6)
        soft = torch.einsum("bki,bkj->bij", unit, unit)
        binary = (tok[:, :, None] == tok[:, None, :]).float()
        ceil = {}
        for score in (0.45,):
            for r in (1, 2, 4):
                ceil[f"soft_oracle_radius{r}"] = walk(cams, soft, (h, w), score, r)
                ceil[f"binary_oracle_radius{r}"] = walk(cams, binary, (h, w), score, r)
                ceil[f"learned_radius{r}"] = walk(cams, A, (h, w), score, r)
        res["oracles_on_own_grid_bkg_0.45"] = ceil
    return res


if __name__ == "__main__":
    result = main(*sys.argv[1:2])
    print(json.dumps(result, indent=1))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
