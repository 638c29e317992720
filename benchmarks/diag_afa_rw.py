"""Chapter 04 (AFA): why the random walk does not improve the CAM at quick scale — measured.

On a trained quick checkpoint (default ``runs/afa-quick/last.pt``, written by the notebook or
``vitseg-lab train afa``) and the quick validation scenes, prints:

1. every stage's mIoU (``afa.stage_predictions``, as ``metric_fn``);
2. the learned affinity against the *true* token labels inside the window: accuracy of A > 0.5,
   and the mean A over same-object (foreground) pairs, background pairs and different-class pairs;
3. ceilings of the random-walk stage that do not depend on the learned affinity: the true
   label sampled to the token grid and upsampled again (nearest, and area-averaged), and one
   random-walk step with an *oracle* affinity A_ij = Σ_c p_i(c) p_j(c) (p = the true mask's
   class fractions in each token), and with a *binary* oracle (1 iff the true classes at the two
   token centres agree: the best an affinity trained on token-resolution labels can learn), on
   grids of 8, 12 and 16 tokens, against the full-resolution CAM it refines.

Writes ``benchmarks/results/diag_afa_rw.json``. Run:
``.venv/bin/python benchmarks/diag_afa_rw.py [checkpoint]`` (one thread, ~30 s of CPU).
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
    model = afa.load(checkpoint)
    cfg = model.cfg
    _, val = afa.quick_data(cfg)
    batch = val.collate([val[i] for i in range(len(val))])
    imgs, sems, labs = batch["image"], batch["semantic"], batch["labels"].float()
    K, (H, W) = model.num_classes, imgs.shape[-2:]

    def miou(pred):
        m = SegMeter(K)
        m.update(pred, sems)
        return round(m.compute()["mIoU"], 3)

    res: dict = {"checkpoint": checkpoint, "val_scenes": len(val)}
    with torch.no_grad():
        res["stages"] = {k: miou(v) for k, v in afa.stage_predictions(model, imgs, labs).items()}
        cams, _, _ = afa.multi_scale_cams(model, imgs, cfg.cam_scales)
        cams = cams * labs[:, :, None, None]
        out = model(imgs, seg=False)
        (h, w), A = out.grid, out.affinity
        mask = afa.window_mask(h, w, cfg.radius)
        tok = afa._labels_at(sems, (h, w)).flatten(1)
        known = (tok[:, :, None] != 255) & (tok[:, None, :] != 255) & mask
        same = tok[:, :, None] == tok[:, None, :]
        fg = tok[:, :, None] > 0
        res["affinity"] = {
            "acc_A>0.5": round(((A > 0.5) == same)[known].float().mean().item(), 3),
            "mean_A_same_object_class": round(A[known & same & fg].mean().item(), 3),
            "mean_A_background_pairs": round(A[known & same & ~fg].mean().item(), 3),
            "mean_A_different_class": round(A[known & ~same].mean().item(), 3),
            "share_of_positive_pairs_that_are_foreground":
                round((known & same & fg).sum().item() / max(1, (known & same).sum().item()), 3),
        }
        onehot = F.one_hot(sems.clamp(max=K - 1), K).permute(0, 3, 1, 2).float()
        ceil = {"full_res_cam": miou(afa.add_background(cams, labs, cfg.bkg_score).argmax(1))}
        for g in (8, 12, 16):
            near = F.one_hot(afa._labels_at(sems, (g, g)).clamp(max=K - 1), K)
            frac = F.adaptive_avg_pool2d(onehot, g)
            oracle = torch.einsum("bki,bkj->bij", frac.flatten(2), frac.flatten(2))
            probs = afa.add_background(afa._resize(cams, (g, g)), labs, cfg.bkg_score)
            row = {"true_label_nearest": miou(afa._resize(near.permute(0, 3, 1, 2).float(),
                                                          (H, W)).argmax(1)),
                   "true_label_area": miou(afa._resize(frac, (H, W)).argmax(1)),
                   "cam_on_grid": miou(afa._resize(probs, (H, W)).argmax(1))}
            tl = afa._labels_at(sems, (g, g)).flatten(1)
            binary = (tl[:, :, None] == tl[:, None, :]).float()
            for r in (1, 2, 4):
                win = afa.window_mask(g, g, r)
                rw = afa.random_walk(probs, oracle, win, cfg.alpha)
                row[f"oracle_rw_radius{r}"] = miou(afa._resize(rw, (H, W)).argmax(1))
                rw = afa.random_walk(probs, binary, win, cfg.alpha)
                row[f"binary_oracle_rw_radius{r}"] = miou(afa._resize(rw, (H, W)).argmax(1))
            ceil[f"grid{g}"] = row
        res["ceilings"] = ceil
    return res


if __name__ == "__main__":
    result = main(*sys.argv[1:2])
    print(json.dumps(result, indent=1))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
