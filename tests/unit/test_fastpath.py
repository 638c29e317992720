"""Tests for vitseg_lab.fastpath: the fast path changes speed, never values (CPU, tiny sizes)."""

from __future__ import annotations

import dataclasses
import inspect
import io

import pytest
import torch
from torch import nn

from vitseg_lab import fastpath
from vitseg_lab.backbone import explicit_attention, quick_vit
from vitseg_lab.train import TrainConfig, param_groups


def _vit(seed: int = 0):
    torch.manual_seed(seed)
    # distinct sizes: 5x7 grid (L = 35) + CLS, C = 24, 3 heads
    return quick_vit(img_size=40, patch_size=8, embed_dim=24, depth=3, num_heads=3, num_classes=4)


def test_sdpa_and_explicit_attention_agree_forward_and_backward():
    vit = _vit()
    x = torch.rand(2, 3, 40, 56)
    grads = []
    outs = []
    for fused in (False, True):
        assert fastpath.set_sdpa(vit, fused) == 3          # one flag per block
        vit.zero_grad()
        out = vit(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in vit.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-5)


def test_set_sdpa_really_switches_the_kernel(monkeypatch):
    vit = _vit()
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fastpath.set_sdpa(vit, False)
    vit(torch.rand(1, 3, 40, 40))
    assert calls == []
    fastpath.set_sdpa(vit, True)
    vit(torch.rand(1, 3, 40, 40))
    assert len(calls) == 3


def test_segvit_loss_is_the_same_with_sdpa():
    from vitseg_lab import segvit

    cfg = segvit.SegViTConfig.smoke()
    train, _ = segvit.quick_data(cfg)
    batch = train.collate([train[i] for i in range(2)])
    torch.manual_seed(0)
    model = segvit.build(cfg, train.num_classes)
    losses = []
    for fused in (False, True):
        fastpath.set_sdpa(model, fused)
        losses.append(segvit.loss_fn(model, batch)["loss"].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_forward_blocks_materialises_only_the_asked_layers():
    vit = _vit()
    fastpath.set_sdpa(vit, True)
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(torch.rand(2, 3, 40, 56))))
    ref, ref_logits = x, []
    for blk in vit.blocks:
        ref_logits.append(explicit_attention(blk.attn, blk.norm1(ref))[2])
        ref = blk(ref)
    out, logits = fastpath.forward_blocks(vit, x, logits_for=(-1, 0))
    assert sorted(logits) == [0, 2]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for i in (0, 2):
        assert logits[i].shape == (2, 3, 36, 36)            # (B, nh, P + L, P + L)
        torch.testing.assert_close(logits[i], ref_logits[i], rtol=1e-5, atol=1e-5)


def test_channels_last_changes_layout_not_values_and_checkpoints_load():
    from vitseg_lab import segvit

    cfg = segvit.SegViTConfig.smoke()
    torch.manual_seed(0)
    model = segvit.build(cfg, 5).eval()
    ref = segvit.build(cfg, 5).eval()
    ref.load_state_dict(model.state_dict())
    fastpath.channels_last(model)
    fastpath.channels_last(model)                          # idempotent: one hook
    assert len(model._forward_pre_hooks) == 1
    w = model.backbone.vit.patch_embed.proj.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    x = torch.rand(3, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(x), ref.predict(x), rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = segvit.build(cfg, 5).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for (k, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_prepare_on_cpu_turns_sdpa_on_and_leaves_layout():
    vit = _vit()
    fastpath.set_sdpa(vit, False)
    out = fastpath.prepare(vit, TrainConfig(), "cpu")
    assert out is vit and all(b.attn.fused_attn for b in vit.blocks)
    assert not vit._forward_pre_hooks                      # channels-last is a CUDA-only choice


def test_plan_on_cpu_and_switched_off(monkeypatch):
    fp = fastpath.plan(TrainConfig(compile=True), "cpu")
    assert (fp.amp_dtype, fp.compile, fp.fused_adamw, fp.channels_last) == (None, False, False,
                                                                          False)
    assert fp.sdpa and "SDPA" in fp.describe()
    monkeypatch.setenv("VITSEG_FAST", "0")
    off = fastpath.plan(TrainConfig(), "cpu")
    assert not off.sdpa and "explicit attention" in off.describe()
    vit = _vit()
    fastpath.prepare(vit, TrainConfig(), "cpu")
    assert not any(b.attn.fused_attn for b in vit.blocks)


def test_optimizer_on_cpu_is_the_plain_adamw_update():
    cfg = TrainConfig(lr=1e-2)
    a, b = _vit(1), _vit(1)
    opt_a = fastpath.optimizer(param_groups(a, cfg), cfg, "cpu")
    opt_b = torch.optim.AdamW(param_groups(b, cfg), lr=cfg.lr, foreach=False)
    assert opt_a.defaults["foreach"] is True and not opt_a.defaults.get("fused")
    x = torch.rand(2, 3, 40, 40)
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cpus, device, asked, workers", [
    (0, "cpu", 0, 0), (1, "cpu", 4, 0), (16, "cpu", 0, 0), (16, "cpu", 4, 4),
    (0, "cuda", 0, 0), (1, "cuda", 8, 0), (2, "cuda", 0, 1), (12, "cuda", 0, 11),
    (12, "cuda", 8, 8), (64, "cuda", 0, 16),
])
def test_loader_kwargs_sized_from_the_machine(cpus, device, asked, workers):
    kw = fastpath.loader_kwargs(TrainConfig(num_workers=asked), device, cpus=cpus)
    assert kw["num_workers"] == workers
    assert kw["pin_memory"] == (device == "cuda")
    assert kw["persistent_workers"] == (workers > 0)
    assert ("prefetch_factor" in kw) == (workers > 0)
    inspect.signature(torch.utils.data.DataLoader).bind(list(range(4)), **kw)  # valid kwargs


def test_available_cpus_reads_slurm_and_torchrun():
    assert fastpath.available_cpus({"SLURM_CPUS_PER_TASK": "32", "LOCAL_WORLD_SIZE": "4"}) == 8
    # submitit: one task per GPU, each with its own cpus-per-task
    assert fastpath.available_cpus({"SLURM_CPUS_PER_TASK": "8", "SLURM_NTASKS_PER_NODE": "4",
                                    "LOCAL_WORLD_SIZE": "4"}) == 8
    assert fastpath.available_cpus({"SLURM_CPUS_PER_TASK": "2", "LOCAL_WORLD_SIZE": "8"}) == 1
    assert fastpath.available_cpus({}) >= 1


def test_mig_is_detected_and_runs_single_gpu():
    env = {"CUDA_VISIBLE_DEVICES": "MIG-4f1b2c3d-0000-5555-aaaa-123456789abc"}
    assert "single-GPU" in fastpath.mig_message(env=env, device_names=[], smi="")
    assert fastpath.mig_message(env={}, device_names=["NVIDIA A100-SXM4-80GB MIG 3g.40gb"],
                                smi="") is not None
    smi = "GPU 0: NVIDIA H100 (UUID: GPU-1)\n  MIG 1g.10gb     Device  0: (UUID: MIG-2)\n"
    assert fastpath.mig_message(env={}, device_names=[], smi=smi) is not None
    plain = {"env": {"CUDA_VISIBLE_DEVICES": "0,1"}, "device_names": ["NVIDIA H100 80GB HBM3"],
             "smi": "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"}
    assert fastpath.mig_message(**plain) is None
    assert fastpath.gpus_for_run(4, **plain) == (4, None)
    n, msg = fastpath.gpus_for_run(4, env=env, device_names=[], smi="")
    assert n == 1 and msg.startswith("MIG slice")


def test_torchrun_on_a_mig_slice_trains_on_rank_0_alone():
    mig = "MIG-4f1b2c3d-0000-5555-aaaa-123456789abc"
    ddp = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "29500"}
    rank1 = {**ddp, "RANK": "1", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": mig}
    trains, msg = fastpath.single_gpu_on_mig(rank1, device_names=[], smi="")
    assert not trains and msg.startswith("MIG slice") and rank1["WORLD_SIZE"] == "2"
    rank0 = {**ddp, "RANK": "0", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": mig}
    trains, msg = fastpath.single_gpu_on_mig(rank0, device_names=[], smi="")
    # fit() reads WORLD_SIZE / RANK / LOCAL_RANK: without them it trains in one process
    assert trains and msg and rank0 == {"MASTER_PORT": "29500", "CUDA_VISIBLE_DEVICES": mig}
    whole = {**ddp, "RANK": "1", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert fastpath.single_gpu_on_mig(dict(whole), device_names=["NVIDIA H100"], smi="") == (
        True, None)
    one = {"CUDA_VISIBLE_DEVICES": mig}
    assert fastpath.single_gpu_on_mig(one, device_names=[], smi="") == (True, None)


def test_gpu_line_says_gpu_or_gpus(monkeypatch):
    from vitseg_lab import fullscale

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one = fullscale.gpu_line("afa", 1)
    assert one.endswith("on one GPU.") and "GPUs" not in one and "torchrun" not in one
    eight = fullscale.gpu_line("segvit", 8)
    assert "torchrun --nproc_per_node 8 " in eight and eight.endswith("on 8 GPUs.")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fullscale.gpu_line("segvit", 8) is None


@pytest.mark.parametrize("name, label, tflops", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989), ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", "NVIDIA H200 SXM", 989), ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312),
    ("NVIDIA L4", "NVIDIA L4", 121), ("NVIDIA L40S", "NVIDIA L40S", 362),
])
def test_device_peak_names_the_datasheet(name, label, tflops):
    assert fastpath.device_peak(name) == (label, tflops * 1e12)


def test_device_peak_unknown_and_cpu():
    assert fastpath.device_peak("Tesla V100-SXM2-16GB") is None   # no bf16 tensor cores
    if not torch.cuda.is_available():
        assert fastpath.device_peak() is None


def test_sdpa_context_and_autocast_are_no_ops_on_cpu():
    fp = fastpath.plan(TrainConfig(), "cpu")
    with fastpath.sdpa_context(fp), fastpath.autocast(fp):
        y = nn.Linear(3, 2)(torch.rand(1, 3))
    assert y.dtype == torch.float32
    bf = dataclasses.replace(fp, amp_dtype=torch.bfloat16)
    with fastpath.autocast(bf):
        assert nn.Linear(3, 2)(torch.rand(1, 3)).dtype == torch.bfloat16
