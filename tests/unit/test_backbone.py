"""vitseg_lab.backbone: shape contract, explicit attention vs timm and vs a per-head loop,
gradients, out_layers validation, and the cache-first pretrained loading (no network)."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock

from vitseg_lab import ShapeError
from vitseg_lab.backbone import (
    BackboneOutput,
    ViTBackbone,
    WeightsNotFound,
    create_vit,
    explicit_attention,
    quick_vit,
    weights_available,
)

# Distinct sizes so a transposed axis cannot pass: B=2, 48x64 px, patch 8 -> grid (6, 8), L=48,
# C=60, nh=4 (hd=15), depth=3; P = 1 (CLS), 3 (CLS + 2 registers) or 0.
B, H, W, PATCH, C, NH, DEPTH = 2, 48, 64, 8, 60, 4, 3
CONFIGS = {
    "cls": {},
    "qknorm_reg_layerscale": {
        "qk_norm": True,
        "reg_tokens": 2,
        "init_values": 0.1,
        "no_embed_class": True,
    },
    "no_prefix": {"class_token": False, "global_pool": "avg"},
}


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    # img_size 32 != the 48x64 inputs, so every test also exercises pos-embed resampling
    return quick_vit(img_size=32, patch_size=PATCH, embed_dim=C, depth=DEPTH, num_heads=NH, **kw)


def images(b: int = B, h: int = H, w: int = W) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def naive_attention(attn, x):
    """The attention equation per head, written literally from the qkv/proj weights (no reshape
    of the fused projection). x: (B, N, C) -> out (B, N, C), probs and logits (B, nh, N, N)."""
    hd, d = attn.head_dim, attn.num_heads * attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    heads, probs, logits = [], [], []
    for h in range(attn.num_heads):
        rows = slice(h * hd, (h + 1) * hd)
        q = x @ w[rows].T + b[rows]
        k = x @ w[d:][rows].T + b[d:][rows]
        v = x @ w[2 * d :][rows].T + b[2 * d :][rows]
        q, k = attn.q_norm(q), attn.k_norm(k)
        lg = (q @ k.transpose(-1, -2)) / hd**0.5
        e = torch.exp(lg - lg.amax(-1, keepdim=True))
        pr = e / e.sum(-1, keepdim=True)
        heads.append(pr @ v)
        probs.append(pr)
        logits.append(lg)
    out = torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias
    return out, torch.stack(probs, 1), torch.stack(logits, 1)


def timm_attention_io(vit, x):
    """Inputs (blk.norm1(x)) and outputs of every block's attention in timm's own forward."""
    io = []
    hooks = [
        blk.attn.register_forward_hook(lambda m, a, out: io.append((a[0], out)))
        for blk in vit.blocks
    ]
    try:
        feats = vit.forward_features(x)
    finally:
        for hk in hooks:
            hk.remove()
    return io, feats


@pytest.mark.parametrize("return_attn", [False, True])
def test_shape_contract(return_attn):
    vit = tiny(reg_tokens=2)
    bb = ViTBackbone(vit, out_layers=(0, -1))
    P, L = 3, 6 * 8
    assert (bb.embed_dim, bb.num_heads, bb.depth, bb.patch_size, bb.num_prefix_tokens) == (
        C,
        NH,
        DEPTH,
        PATCH,
        P,
    )
    assert bb.grid_size(H, W) == (6, 8)
    out = bb(images(), return_attn=return_attn)
    assert isinstance(out, BackboneOutput)
    assert out.grid == (6, 8)
    assert len(out.tokens) == len(out.prefix) == 2
    for t, p in zip(out.tokens, out.prefix):
        assert t.shape == (B, L, C) and p.shape == (B, P, C)
    assert out.final.shape == (B, P + L, C)
    if return_attn:
        assert len(out.attn) == len(out.attn_logits) == DEPTH
        for a, lg in zip(out.attn, out.attn_logits):
            assert a.shape == lg.shape == (B, NH, P + L, P + L)
    else:
        assert out.attn is None and out.attn_logits is None


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_tokens_match_timm_forward_features_and_intermediates(cfg):
    vit = tiny(**cfg).eval()
    layers = (0, 2)
    bb = ViTBackbone(vit, out_layers=layers)
    x = images()
    with torch.no_grad():
        fast, slow = bb(x), bb(x, return_attn=True)
        ref_final = vit.forward_features(x)
        ref = vit.forward_intermediates(
            x,
            indices=list(layers),
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
    P = vit.num_prefix_tokens
    ref_tokens = [r[0] for r in ref] if P else ref
    ref_prefix = [r[1] for r in ref] if P else [t[:, :0] for t in ref]
    for out in (fast, slow):
        torch.testing.assert_close(out.final, ref_final, atol=1e-5, rtol=1e-5)
        for got, want in zip(out.tokens, ref_tokens):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for got, want in zip(out.prefix, ref_prefix):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_explicit_attention_matches_timm_and_naive_loop(cfg):
    vit = tiny(**cfg).eval()
    x = images()
    with torch.no_grad():
        io, _ = timm_attention_io(vit, x)
        out = ViTBackbone(vit)(x, return_attn=True)
        for i, (blk, (normed, timm_out)) in enumerate(zip(vit.blocks, io)):
            y, probs, logits = explicit_attention(blk.attn, normed)
            # softmax(logits) @ v -> proj reproduces timm's fused SDPA block attention
            torch.testing.assert_close(y, timm_out, atol=1e-5, rtol=1e-5)
            n_y, n_probs, n_logits = naive_attention(blk.attn, normed)
            torch.testing.assert_close(y, n_y, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits, n_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(probs, n_probs, atol=1e-6, rtol=1e-5)
            # what the backbone returns for block i is the same map
            torch.testing.assert_close(out.attn[i], n_probs, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.attn_logits[i], n_logits, atol=1e-4, rtol=1e-4)


def test_attention_rows_sum_to_one_and_logits_give_probs():
    out = ViTBackbone(tiny().eval())(images(), return_attn=True)
    for probs, logits in zip(out.attn, out.attn_logits):
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        torch.testing.assert_close(logits.softmax(-1), probs)
        # logits are not already normalised: a constant shift per row would leave probs equal
        assert not torch.allclose(logits.logsumexp(-1), torch.zeros(()), atol=1e-3)


@pytest.mark.parametrize("return_attn", [False, True])
def test_gradients_reach_patch_embedding(return_attn):
    vit = tiny()
    bb = ViTBackbone(vit, out_layers=(1,))
    out = bb(images(), return_attn=return_attn)
    loss = out.tokens[0].square().mean() + out.final.mean()
    if return_attn:
        loss = loss + sum((a * torch.arange(a.shape[-1])).mean() for a in out.attn)
    loss.backward()
    for p in (vit.patch_embed.proj.weight, vit.blocks[0].attn.qkv.weight, vit.pos_embed):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_other_image_sizes_and_single_patch():
    bb = ViTBackbone(tiny().eval())
    for h, w in [(32, 32), (64, 40), (8, 8)]:  # (8, 8): one patch, L=1
        out = bb(images(1, h, w), return_attn=True)
        assert out.grid == (h // PATCH, w // PATCH)
        assert out.tokens[-1].shape == (1, (h // PATCH) * (w // PATCH), C)
        torch.testing.assert_close(out.final, bb.vit.forward_features(images(1, h, w)))


def test_out_layers_default_negative_and_errors():
    vit = tiny()
    assert ViTBackbone(vit).out_layers == (0, 1, 2)
    assert ViTBackbone(vit, out_layers=(-1, 0)).out_layers == (2, 0)
    assert ViTBackbone(vit, out_layers=1).out_layers == (1,)
    for bad, msg in [
        ((3,), "out of range"),
        ((-4,), "out of range"),
        ((), "empty"),
        ((1, -2), "twice"),
    ]:
        with pytest.raises(ValueError, match=msg) as e:
            ViTBackbone(vit, out_layers=bad)
        assert "0..2" in str(e.value) or "twice" in str(e.value)
    with pytest.raises(TypeError, match="not an int"):
        ViTBackbone(vit, out_layers=(1.0,))


def test_bad_images_raise_clear_errors():
    bb = ViTBackbone(tiny())
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        bb(images(1, 50, 64))
    with pytest.raises(ShapeError, match="images"):
        bb(torch.randn(1, 4, 48, 64))
    with pytest.raises(ShapeError, match="images"):
        bb(torch.randn(3, 48, 64))
    fixed = ViTBackbone(tiny(dynamic_img_size=False))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        fixed(images())


def test_return_attn_refuses_blocks_it_cannot_rewrite():
    bb = ViTBackbone(tiny(block_fn=ResPostBlock))
    bb(images())  # timm's own blocks: fine
    with pytest.raises(NotImplementedError, match="ResPostBlock"):
        bb(images(), return_attn=True)


def test_state_dict_keeps_timm_names():
    vit = tiny()
    sd = ViTBackbone(vit).state_dict()
    assert set(sd) == {f"vit.{k}" for k in vit.state_dict()}
    fresh = tiny()
    torch.nn.init.zeros_(fresh.pos_embed)
    fresh.load_state_dict({k.removeprefix("vit."): v for k, v in sd.items()})
    assert torch.equal(fresh.pos_embed, vit.pos_embed)


def test_create_vit_full_scale_config_on_meta_device():
    vit = create_vit("vit_base_patch16_224", img_size=640, drop_path_rate=0.1, device="meta")
    bb = ViTBackbone(vit)
    assert (bb.embed_dim, bb.num_heads, bb.depth, bb.patch_size, bb.num_prefix_tokens) == (
        768,
        12,
        12,
        16,
        1,
    )
    assert bb.grid_size(640, 480) == (40, 30)
    assert vit.dynamic_img_size and vit.num_classes == 0 and vit.pos_embed.device.type == "meta"
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    small = create_vit("vit_base_patch16_224", device="meta", depth=2, patch_size=8, num_heads=4)
    assert (len(small.blocks), small.patch_embed.patch_size, small.blocks[0].attn.num_heads) == (
        2,
        (8, 8),
        4,
    )
    with pytest.raises(ValueError, match="no model called"):
        create_vit("vit_bsae_patch16_224")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """HF and torch caches in an empty tmp dir, and any socket connection fails loudly."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("backbone tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


def test_pretrained_missing_raises_at_once(empty_caches):
    name, repo = "vit_base_patch16_224", "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert not weights_available(name)
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFound) as e:
        create_vit(name, pretrained=True, img_size=640)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError)
    for part in (f"'{name}'", repo, "python -c", "timm.create_model", str(empty_caches / "hf")):
        assert part in msg, part


def test_pretrained_missing_url_source_names_torch_cache(empty_caches):
    # without a hub id timm falls back to the checkpoint URL and the torch hub cache
    with pytest.raises(WeightsNotFound) as e:
        create_vit(
            "vit_small_patch14_dinov2", pretrained=True, pretrained_cfg_overlay={"hf_hub_id": None}
        )
    msg = str(e.value)
    assert "curl -L https://" in msg and str(empty_caches / "torch") in msg


def hf_snapshot(cache_root, repo: str):
    """An empty snapshot folder of ``repo`` in the Hugging Face cache layout (refs/main -> commit)."""
    folder = cache_root / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    return folder / "snapshots" / commit


def test_pretrained_loads_from_a_cached_snapshot_offline(empty_caches):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    # vit_tiny's default weights live in this hub repo; fake a small snapshot of it
    kw = {"img_size": 32, "embed_dim": 48, "depth": 1, "num_heads": 3}
    src = create_vit("vit_tiny_patch16_224", num_classes=1000, **kw)
    snap = hf_snapshot(empty_caches, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors")
    )

    assert weights_available("vit_tiny_patch16_224")
    offline_before = (constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    vit = create_vit("vit_tiny_patch16_224", pretrained=True, **kw)  # num_classes=0 drops head
    assert (constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")) == offline_before
    assert vit.num_classes == 0
    loaded = vit.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(loaded[k], v), k


def test_hf_hub_name_loads_config_and_weights_from_cache(empty_caches):
    from timm.models._hub import save_for_hf

    # a course checkpoint published the way timm publishes (config.json + pytorch_model.bin)
    args = {"img_size": 32, "patch_size": PATCH, "embed_dim": C, "depth": DEPTH, "num_heads": NH}
    src = create_vit("vit_tiny_patch16_224", num_classes=5, **args)
    name = "hf-hub:vitseg/quick-vit"
    with pytest.raises(WeightsNotFound, match="vitseg/quick-vit"):
        create_vit(name, pretrained=True)
    save_for_hf(src, str(hf_snapshot(empty_caches, "vitseg/quick-vit")), model_args=args)
    vit = create_vit(name, pretrained=True, num_classes=5)
    assert vit.dynamic_img_size and len(vit.blocks) == DEPTH
    for k, v in src.state_dict().items():
        assert torch.equal(vit.state_dict()[k], v), k
