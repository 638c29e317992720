"""Matplotlib pictures shared by the chapters: images, mask overlays, attention grids.

Every function draws into a given ``ax`` (or makes a figure) and returns the figure, so notebooks,
widgets and tests use the same code. Tensors may live on any device; they are moved to the CPU here.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

IGNORE_COLOR = (1.0, 1.0, 1.0)


def to_numpy_image(image: torch.Tensor) -> np.ndarray:
    """image: (3, H, W) float in [0, 1] -> (H, W, 3) numpy array for imshow."""
    return image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def palette(num_classes: int, seed: int = 3) -> np.ndarray:
    """(num_classes, 3) distinct colours; class 0 (background) is dark grey."""
    cmap = plt.get_cmap("tab20", max(num_classes, 2))
    colors = np.array([cmap(i)[:3] for i in range(num_classes)])
    colors[0] = (0.15, 0.15, 0.15)
    return colors


def colorize(mask: torch.Tensor, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """mask: (H, W) int class ids (ignore_index allowed) -> (H, W, 3) RGB."""
    m = mask.detach().cpu().long().numpy()
    out = np.empty(m.shape + (3,))
    pal = palette(num_classes)
    valid = m != ignore_index
    out[valid] = pal[np.clip(m[valid], 0, num_classes - 1)]
    out[~valid] = IGNORE_COLOR
    return out


def show_image(image: torch.Tensor, ax=None, title: str | None = None):
    """Draw an image (3, H, W) in [0, 1]."""
    ax = ax or plt.subplots(figsize=(3, 3))[1]
    ax.imshow(to_numpy_image(image))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax.figure


def show_mask(image: torch.Tensor, mask: torch.Tensor, num_classes: int, ax=None,
              title: str | None = None, alpha: float = 0.55, ignore_index: int = 255):
    """Overlay a class mask (H, W) on an image (3, H, W)."""
    ax = ax or plt.subplots(figsize=(3, 3))[1]
    ax.imshow(to_numpy_image(image))
    ax.imshow(colorize(mask, num_classes, ignore_index), alpha=alpha)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax.figure


def show_heatmap(image: torch.Tensor, heat: torch.Tensor, ax=None, title: str | None = None,
                 cmap: str = "inferno", alpha: float = 0.6, vmin=None, vmax=None):
    """Overlay a heat map (h, w) — upsampled to the image size — on an image (3, H, W)."""
    ax = ax or plt.subplots(figsize=(3, 3))[1]
    H, W = image.shape[-2:]
    h = heat.detach().float().cpu()[None, None]
    h = torch.nn.functional.interpolate(h, size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    ax.imshow(to_numpy_image(image))
    ax.imshow(h.numpy(), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax.figure


def scene_grid(samples: list[dict], num_classes: int, class_names: list[str] | None = None):
    """Images (top row) and semantic masks (bottom row) of a few ShapeScenes samples."""
    n = len(samples)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 3.9), squeeze=False)
    for j, s in enumerate(samples):
        title = s.get("expression") if class_names is None else None
        show_image(s["image"], axes[0, j], title=title)
        show_mask(s["image"], s["semantic"], num_classes, axes[1, j])
    fig.tight_layout()
    return fig


def attention_grid(image: torch.Tensor, maps: torch.Tensor, titles: list[str] | None = None,
                   ncols: int = 6):
    """maps: (M, h, w) heat maps, drawn over the image in a grid."""
    m = maps.shape[0]
    nrows = (m + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, min(m, ncols), figsize=(2 * min(m, ncols), 2 * nrows),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < m:
            show_heatmap(image, maps[k], ax, title=titles[k] if titles else None)
        else:
            ax.set_axis_off()
    fig.tight_layout()
    return fig
