"""ipywidgets explorers. Each runs the learner's plugged functions (looked up at call time), so
what a learner sees is what their own code computes.

One explorer per chapter; each returns the top-level widget (display it as the cell's value) and
keeps its state on that widget (``explorer.state``) so tests and follow-up cells can read it.
"""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from . import segvit, viz  # the module: plugged exercises are looked up at call time


def _render(out: widgets.Output, draw) -> None:
    """Redraw a matplotlib figure inside an Output widget."""
    with out:
        out.clear_output(wait=True)
        fig = draw()
        plt.show()
        plt.close(fig)


# ---------------------------------------------------------------------------------- chapter 01

def attention_explorer(model, dataset, index: int = 0) -> widgets.VBox:
    """Chapter 01: where does one patch (or the CLS token) attend, per layer and head?

    Args:
        model: an ``attention.ExplicitViT``; its forward runs the learner's plugged functions.
        dataset: items with "image" (3, H, W).
    Returns:
        a VBox; ``.state`` holds the current choice and the map drawn, ``(h, w)``.
    """
    model.eval()
    depth = len(model.vit.blocks)
    heads = model.num_heads
    img0 = dataset[index]["image"]
    h, w = (s // model.patch_size for s in img0.shape[-2:])

    scene = widgets.IntSlider(value=index, min=0, max=len(dataset) - 1, description="scene")
    layer = widgets.Dropdown(options=list(range(depth)), value=depth - 1, description="layer")
    head = widgets.Dropdown(options=["mean"] + list(range(heads)), value="mean", description="head")
    query = widgets.ToggleButtons(options=["patch", "CLS"], value="patch", description="query")
    row = widgets.IntSlider(value=h // 2, min=0, max=h - 1, description="patch row")
    col = widgets.IntSlider(value=w // 2, min=0, max=w - 1, description="patch col")
    out = widgets.Output()
    box = widgets.VBox([widgets.HBox([scene, layer, head]), widgets.HBox([query, row, col]), out])
    box.state = {}
    cache: dict[int, list[torch.Tensor]] = {}

    def attn_maps(i: int) -> list[torch.Tensor]:
        if i not in cache:  # one forward per scene; recomputed by the learner's code
            with torch.no_grad():
                dev = next(model.parameters()).device
                cache.clear()
                cache[i] = [a[0].cpu() for a in model(dataset[i]["image"][None].to(dev)).attn]
        return cache[i]

    def draw():
        image = dataset[scene.value]["image"]
        a = attn_maps(scene.value)[layer.value]                      # (nh, 1 + L, 1 + L)
        a = a.mean(0) if head.value == "mean" else a[head.value]
        q = 0 if query.value == "CLS" else 1 + row.value * w + col.value
        m = a[q, 1:].reshape(h, w)
        box.state.update(scene=scene.value, layer=layer.value, head=head.value,
                         query=query.value, patch=(row.value, col.value), map=m.clone())
        fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.2))
        viz.show_image(image, axes[0], title="query")
        if query.value == "patch":
            p = model.patch_size
            axes[0].add_patch(plt.Rectangle((col.value * p - 0.5, row.value * p - 0.5), p, p,
                                            fill=False, edgecolor="yellow", linewidth=2))
        hd = "heads averaged" if head.value == "mean" else f"head {head.value}"
        viz.show_heatmap(image, m, axes[1], title=f"layer {layer.value}, {hd}")
        fig.tight_layout()
        return fig

    def update(_=None):
        row.disabled = col.disabled = query.value == "CLS"
        _render(out, draw)

    for c in (scene, layer, head, query, row, col):
        c.observe(update, names="value")
    update()
    return box


# ---------------------------------------------------------------------------------- chapter 03

def mask_explorer(model, dataset, class_names: list[str], index: int = 0) -> widgets.VBox:
    """Chapter 03: one class token at one cascade stage — its similarity map, its mask, the truth.

    Args:
        model: a ``segvit.SegViT``; its forward runs the learner's ``atm_similarity``,
            ``atm_mask_logits`` and ``cascade_masks``, the prediction their ``semantic_scores``.
        dataset: items with "image" (3, H, W) and "semantic" (H, W), 255 = ignore.
        class_names: K names; token k is class k.
    Returns:
        a VBox; ``.state`` holds the choice, ``sim`` (this stage's head-averaged logits, (h, w)),
        ``mask`` (sigmoid of the accumulated logits, (h, w)) and ``p_class`` (the token's
        probability of its own class).
    """
    model.eval()
    layers = list(reversed(model.backbone.out_layers))       # decoding order: deepest first
    K = len(class_names)
    scene = widgets.IntSlider(value=index, min=0, max=len(dataset) - 1, description="scene")
    # Open on a class the first scene shows (not one absent from it).
    present = [int(k) for k in dataset[index]["semantic"].unique() if 0 < k < K]
    token = widgets.Dropdown(options=[(f"{k}: {n}", k) for k, n in enumerate(class_names)],
                             value=present[0] if present else min(1, K - 1),
                             description="class token")
    # Blocks 0-based, as model.backbone.out_layers and the notebook print them.
    stage = widgets.Dropdown(options=[(f"{s + 1} (ViT block {b}, 0-based)", s)
                                      for s, b in enumerate(layers)],
                             value=len(layers) - 1, description="stage")
    out = widgets.Output()
    box = widgets.VBox([widgets.HBox([scene, token, stage]), out])
    box.state = {}
    cache: dict[int, object] = {}

    def forward(i: int):
        if i not in cache:  # one forward per scene, through the learner's functions
            cache.clear()
            with torch.no_grad():
                dev = next(model.parameters()).device
                cache[i] = model(dataset[i]["image"][None].to(dev))
        return cache[i]

    def draw():
        item = dataset[scene.value]
        image, label = item["image"], item["semantic"]
        res, k, s = forward(scene.value), token.value, stage.value
        sim = res.stage_logits[s][0, k].cpu()
        mask = res.mask_logits[s][0, k].sigmoid().cpu()
        p_class = res.class_logits[s][0, k].softmax(-1)[k].item()
        logits = F.interpolate(res.mask_logits[s], size=image.shape[-2:], mode="bilinear",
                               align_corners=False)
        pred = segvit.semantic_scores(res.class_logits[s], logits)[0].argmax(0).cpu()
        truth = torch.where(label == 255, 0.5, (label == k).float())   # ignore drawn half-way
        box.state.update(scene=scene.value, token=k, stage=s, sim=sim.clone(),
                         mask=mask.clone(), p_class=p_class)
        fig, axes = plt.subplots(1, 4, figsize=(11, 3.1))
        viz.show_heatmap(image, truth, axes[0], vmin=0, vmax=1, title=f"truth: {class_names[k]}")
        lim = float(sim.abs().max()) or 1.0
        viz.show_heatmap(image, sim, axes[1], cmap="coolwarm", vmin=-lim, vmax=lim,
                         title=f"stage {s + 1} similarity (heads averaged)")
        viz.show_heatmap(image, mask, axes[2], vmin=0, vmax=1,
                         title=f"mask after stage {s + 1} · p(class)={p_class:.2f}")
        viz.show_mask(image, pred, K, axes[3], title=f"prediction after stage {s + 1}")
        fig.tight_layout()
        return fig

    for c in (scene, token, stage):
        c.observe(lambda _: _render(out, draw), names="value")
    _render(out, draw)
    return box
