"""timm ViT backbone: per-layer patch tokens and, on request, explicit per-head attention maps.

Every chapter reads its ViT through ``ViTBackbone``: the timm model stays a submodule (``.vit``)
with timm's parameter names, so timm and course checkpoints load unchanged. timm's attention uses
fused ``scaled_dot_product_attention``, which never materialises the attention weights; with
``return_attn=True`` each block is re-run from its own ``qkv``/``proj`` weights with an explicit
softmax, and ``tests/unit/test_backbone.py`` checks that this reproduces timm's outputs.

Pretrained weights are looked up in the local Hugging Face / torch hub cache *before* timm is
called: offline, timm's hub client retries for about 50 s, so a missing file raises
``WeightsNotFound`` at once, naming the command that fetches it and the folder to copy it into.

Shapes: B batch · H,W pixels · h,w patch grid · L = h*w patch tokens · P prefix (CLS/register)
tokens · C channels · nh heads · hd = C/nh head width.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import constants, try_to_load_from_cache
from timm.layers import Attention
from timm.models import get_pretrained_cfg, is_model, parse_model_name, split_model_name_tag
from timm.models._builder import _resolve_pretrained_source  # timm's own choice of weight source
from timm.models._hub import hf_split
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from .exercises import expect_shape

__all__ = [
    "BackboneOutput",
    "ViTBackbone",
    "WeightsNotFound",
    "block_residual",
    "create_vit",
    "explicit_attention",
    "quick_vit",
    "weights_available",
    "weights_problem",
]


class WeightsNotFound(RuntimeError):
    """Pretrained weights were asked for but are not in the local cache (no network is tried)."""


# ---------------------------------------------------------------------------------------------
# Building timm ViTs
# ---------------------------------------------------------------------------------------------


def quick_vit(
    img_size: int = 64,
    patch_size: int = 8,
    embed_dim: int = 96,
    depth: int = 4,
    num_heads: int = 3,
    num_classes: int = 0,
    **kwargs: Any,
) -> VisionTransformer:
    """The quick-scale ViT (4 blocks, width 96, 8 x 8 patches: sized so a chapter trains on 2 CPU
    cores in under a minute), random init; ``kwargs`` go to timm.

    -> ``timm.models.VisionTransformer`` with ``dynamic_img_size=True`` (any H, W divisible by
    ``patch_size`` works; timm interpolates the position embedding).
    """
    kwargs.setdefault("dynamic_img_size", True)
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=num_classes,
        **kwargs,
    )


def create_vit(
    name: str,
    pretrained: bool = False,
    img_size: int | None = None,
    num_classes: int = 0,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> VisionTransformer:
    """``timm.create_model(name, ...)`` with ``dynamic_img_size=True`` and a cache-first load.

    Args:
        name: a timm model name, optionally tagged (``vit_base_patch16_224.augreg_in21k``), or
            ``hf-hub:owner/repo`` (its config.json is read from the cache too).
        pretrained: load weights from the local cache only, with ``HF_HUB_OFFLINE=1``; raises
            ``WeightsNotFound`` (repo id, fetch command, cache folder) at once when missing.
        img_size: training crop; timm resamples the pretrained position embedding to it.
        overrides: other timm kwargs (``patch_size``, ``embed_dim``, ``depth``...), passed only
            when given.
    """
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": drop_path_rate}
    kwargs["dynamic_img_size"] = True
    if img_size is not None:
        kwargs["img_size"] = img_size
    kwargs.update(overrides)
    _check_known(name)
    if pretrained or name.startswith("hf-hub:"):
        path, cache_dir, problem = _find_weights(name, overrides.get("pretrained_cfg_overlay"))
        if path is None:
            raise WeightsNotFound(problem)
        if cache_dir is not None:  # a hub load: hand timm the cache we checked
            kwargs["cache_dir"] = cache_dir
    # Every file is on disk now; offline, the hub client reads it without asking the server.
    with _hf_offline():
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"{name!r} builds a timm {type(model).__name__}, not a VisionTransformer; "
            "pick a plain ViT (`timm.list_models('vit_*')`)."
        )
    return model


def weights_available(name: str) -> bool:
    """True when ``create_vit(name, pretrained=True)`` would find its weights in the local cache."""
    return weights_problem(name) is None


def weights_problem(name: str) -> str | None:
    """None when ``name``'s pretrained weights are cached, else one line: what is missing and the
    command that fetches it (no network is tried)."""
    _check_known(name)
    path, _, problem = _find_weights(name)
    return None if path is not None else problem


def _check_known(name: str) -> None:
    source, model_id = parse_model_name(name)
    if source is None and not is_model(split_model_name_tag(model_id)[0]):
        raise ValueError(
            f"timm has no model called {name!r}; list ViTs with `timm.list_models('vit_*')`."
        )


def _hf_cache_dir() -> Path:
    # Read the environment now: huggingface_hub froze it at import, before a notebook set HF_HOME.
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def _find_weights(name: str, overlay: dict | None = None) -> tuple[str | None, str | None, str]:
    """Where timm would read ``name``'s weights, looked up on disk only.

    -> (cached file or None, Hugging Face cache dir for timm or None, why it is missing).
    """
    source, model_id = parse_model_name(name)
    if source == "local-dir":
        return model_id, None, ""  # a local folder: timm reads it and names what is missing
    if source == "hf-hub":
        load_from, loc, needs = "hf-hub", model_id, ["config.json"]
    else:
        cfg = get_pretrained_cfg(model_id)
        load_from, loc = _resolve_pretrained_source(
            {**(cfg.to_dict() if cfg else {}), **(overlay or {})}
        )
        needs = []
    fetch = f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`"
    if load_from == "hf-hub":
        repo_id, filename = (loc, None) if isinstance(loc, str) else loc
        repo, revision = hf_split(repo_id)
        cache = _hf_cache_dir()

        def cached(f: str) -> str | None:
            hit = try_to_load_from_cache(repo, f, cache_dir=cache, revision=revision)
            return hit if isinstance(hit, str) else None

        # timm's order: the cfg's file, else model.safetensors, then pytorch_model.bin
        files = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
        path = next((p for p in map(cached, files) if p), None)
        if path and all(map(cached, needs)):
            return path, str(cache), ""
        folder = f"models--{repo.replace('/', '--')}"
        return _missing(
            f"Pretrained weights for {name!r} (Hugging Face repo '{repo}') are not cached on this "
            f"machine: where there is network run {fetch} (or `hf download {repo}`), then copy "
            f"its ~/.cache/huggingface/hub/{folder} folder into {cache}/ here (or point HF_HOME "
            "at a copy), or use pretrained=False."
        )
    if load_from == "url":
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        path = folder / os.path.basename(loc.split("?")[0])
        if path.is_file():
            return str(path), None, ""
        return _missing(
            f"Pretrained weights for {name!r} ({loc}) are not in the torch hub cache: where there "
            f"is network run `curl -L {loc} -o {path.name}`, then copy {path.name} into "
            f"{folder}/ here (or point TORCH_HOME at a copy), or use pretrained=False."
        )
    if load_from == "file":
        if os.path.isfile(loc):
            return loc, None, ""
        return _missing(f"The weight file {loc} given for {name!r} does not exist; fix the path.")
    if load_from == "state_dict":
        return "<in memory>", None, ""
    return _missing(
        f"timm has no pretrained weights for {name!r}; use pretrained=False or a tagged name "
        f"from `timm.list_pretrained('{model_id.split('.')[0]}*')`."
    )


def _missing(why: str) -> tuple[None, None, str]:
    return None, None, why


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` for the duration (env var and huggingface_hub's import-time flag)."""
    old_env, old_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


# ---------------------------------------------------------------------------------------------
# Explicit attention and the backbone
# ---------------------------------------------------------------------------------------------


def explicit_attention(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """timm ``Attention.forward`` with the attention weights materialised (same weights, same math).

    Args:
        attn: a block's ``blk.attn`` (timm ``Attention``).
        x: (B, N, C) the block's normed input ``blk.norm1(x)``, N = P + L.
    Returns:
        out: (B, N, C) equal to ``attn(x)``;
        probs: (B, nh, N, N) softmax over keys, rows sum to 1 (before attention dropout);
        logits: (B, nh, N, N) pre-softmax ``q·kᵀ·scale`` (after ``q_norm``/``k_norm``).
    """
    B, N, _ = x.shape
    nh, hd = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(B, N, 3, nh, hd).permute(2, 0, 3, 1, 4)  # (3, B, nh, N, hd)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, nh, N, N); scale q first, as timm does
    probs = logits.softmax(dim=-1)
    out = attn.attn_drop(probs) @ v  # (B, nh, N, hd)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, nh * hd))  # (B, N, nh*hd)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), probs, logits


def block_residual(blk: Block, x: Tensor, y: Tensor) -> Tensor:
    """The rest of timm's pre-norm ``Block.forward`` once its attention output is known.

    x: (B, N, C) the residual stream (the block's input, or QD's sub-sampled queries);
    y: (B, N, C) the attention output ``blk.attn(blk.norm1(x))`` computed some other way.
    -> (B, N, C): ``x + ls1(y)``, then the MLP branch, each with timm's drop-path.
    """
    x = x + blk.drop_path1(blk.ls1(y))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _block_with_attn(blk: Block, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """timm ``Block.forward`` with ``explicit_attention``. x: (B, N, C) -> (x, probs, logits)."""
    y, probs, logits = explicit_attention(blk.attn, blk.norm1(x))
    return block_residual(blk, x, y), probs, logits


@dataclass
class BackboneOutput:
    """What ``ViTBackbone`` returns: lists over ``out_layers`` (tokens, prefix) or all blocks.

    tokens: list of (B, L, C) patch tokens after each block in ``out_layers`` (no final norm).
    prefix: list of (B, P, C) CLS/register tokens at the same layers (P may be 0).
    final: (B, P + L, C) last block output after the final norm ``vit.norm``.
    grid: (h, w) patch grid, L = h*w, tokens in row-major order.
    attn: None, or list over all blocks of (B, nh, P+L, P+L) softmax probabilities.
    attn_logits: None, or list over all blocks of (B, nh, P+L, P+L) pre-softmax logits.
    """

    tokens: list[Tensor]
    prefix: list[Tensor]
    final: Tensor
    grid: tuple[int, int]
    attn: list[Tensor] | None = None
    attn_logits: list[Tensor] | None = None


class ViTBackbone(nn.Module):
    """A timm ``VisionTransformer`` read out per layer (tokens) and per head (attention maps).

    Args:
        vit: the timm model (``create_vit``/``quick_vit``); kept as ``self.vit`` so its
            state_dict keys stay timm's under a ``vit.`` prefix.
        out_layers: 0-based block indices whose outputs are returned, negatives count from the
            end; default all blocks.
    """

    def __init__(self, vit: VisionTransformer, out_layers: Sequence[int] | None = None):
        super().__init__()
        for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "num_prefix_tokens"):
            if not hasattr(vit, attr):
                raise TypeError(
                    f"ViTBackbone wraps a timm VisionTransformer, but "
                    f"{type(vit).__name__} has no .{attr}; build it with create_vit()."
                )
        self.vit = vit
        ph, pw = vit.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"ViTBackbone expects square patches, got {ph}x{pw}.")
        self.out_layers = self._check_layers(out_layers, len(vit.blocks))

    @staticmethod
    def _check_layers(out_layers: Sequence[int] | None, depth: int) -> tuple[int, ...]:
        if out_layers is None:
            return tuple(range(depth))
        if isinstance(out_layers, int):
            out_layers = (out_layers,)
        layers = tuple(out_layers)
        hint = f"use block indices in 0..{depth - 1} (or -{depth}..-1) for this {depth}-block ViT"
        if not layers:
            raise ValueError(f"out_layers is empty; {hint}, or None for all blocks.")
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"out_layers entry {i!r} is not an int; {hint}.")
            if not -depth <= i < depth:
                raise ValueError(f"out_layers entry {i} is out of range; {hint}.")
        layers = tuple(i % depth for i in layers)
        if len(set(layers)) != len(layers):
            raise ValueError(f"out_layers {tuple(out_layers)} names a block twice; list each once.")
        return layers

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def num_heads(self) -> int:
        return int(self.vit.blocks[0].attn.num_heads)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    def grid_size(self, H: int, W: int) -> tuple[int, int]:
        """(H, W) pixels -> (h, w) patch grid; H and W must be multiples of the patch size."""
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the patch size {p}; "
                f"resize or pad it to e.g. {-(-H // p) * p}x{-(-W // p) * p}."
            )
        return H // p, W // p

    def extra_repr(self) -> str:
        return f"out_layers={self.out_layers}"

    def forward(self, images: Tensor, return_attn: bool = False) -> BackboneOutput:
        """images: (B, 3, H, W) -> BackboneOutput (see its docstring for every shape).

        ``return_attn=False`` runs timm's own blocks (fused attention). ``return_attn=True`` runs
        each block through ``explicit_attention`` and returns probabilities and logits for all
        blocks: memory grows as depth * B * nh * (P+L)^2, so keep B small at full scale.
        """
        vit = self.vit
        expect_shape(images, "B C H W", name="images", C=vit.patch_embed.proj.in_channels)
        grid = self.grid_size(images.shape[-2], images.shape[-1])
        if not getattr(vit, "dynamic_img_size", False) and grid != tuple(vit.patch_embed.grid_size):
            raise ValueError(
                f"this ViT was built for a {vit.patch_embed.img_size} image, got "
                f"{tuple(images.shape[-2:])}; build it with dynamic_img_size=True "
                "(create_vit and quick_vit do)."
            )
        if return_attn:
            self._check_explicit_supported()
        P = self.num_prefix_tokens

        # timm's forward_features preamble: patches, prefix tokens + (resampled) pos-embed
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)  # (B, P + L, C)

        tokens: dict[int, Tensor] = {}
        probs: list[Tensor] = []
        logits: list[Tensor] = []
        for i, blk in enumerate(vit.blocks):
            if return_attn:
                x, p, lg = _block_with_attn(blk, x)
                probs.append(p)
                logits.append(lg)
            else:
                x = blk(x)
            if i in self.out_layers:
                tokens[i] = x
        return BackboneOutput(
            tokens=[tokens[i][:, P:] for i in self.out_layers],
            prefix=[tokens[i][:, :P] for i in self.out_layers],
            final=vit.norm(x),
            grid=grid,
            attn=probs if return_attn else None,
            attn_logits=logits if return_attn else None,
        )

    def _check_explicit_supported(self) -> None:
        # The explicit path rewrites Block.forward and Attention.forward; other block or
        # attention classes (ResPostBlock, parallel blocks, RoPE...) would be silently wrong.
        for i, blk in enumerate(self.vit.blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention:
                raise NotImplementedError(
                    f"return_attn=True supports timm's Block/Attention, but block {i} is a "
                    f"{type(blk).__name__} with {type(blk.attn).__name__}; use return_attn=False."
                )
