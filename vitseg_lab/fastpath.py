"""The fast GPU path, decided in one place for every chapter: ``plan(cfg, device)``.

``fit()`` and the benchmarks ask this module, so a chapter never decides precision, attention
kernels or loader sizes itself. What the plan switches on, and why:

- **bf16 autocast** on CUDA devices that support bf16 (Ampere and later; no loss scaling needed).
  Off on CPU and MPS: the quick scale runs in fp32 on one thread.
- **Fused attention** (``F.scaled_dot_product_attention``) in every timm ``Attention`` whose
  weights nobody reads: ``set_sdpa(model, True)`` flips timm's ``fused_attn`` flag, which timm
  honours at call time. The explicit path stays where the weights *are* the method: the
  explorers (``backbone.ViTBackbone(return_attn=True)``), SegViT's ATM cross-attention (its
  logits are the masks; K x L, cheap) and AFA's last blocks. ``forward_blocks`` runs a ViT with
  fused attention everywhere except the blocks whose logits are asked for, so no layer is
  materialised that nobody reads.
- **torch.compile** on CUDA when ``cfg.compile`` (CPU compile costs minutes of C++ builds for a
  model that trains in seconds).
- **Fused AdamW** on CUDA (one kernel for all parameters), ``foreach`` elsewhere.
- **Channels-last** on CUDA for models with spatial convolutions (kernel > 1: a ViT's patch
  embedding, conv decoders): the weights are converted and a forward pre-hook converts 4-d
  image inputs, so callers change nothing. The values are unchanged (tested on CPU).
- **DataLoader** workers from the CPUs this process may use (SLURM's allocation, the affinity
  mask, divided among the GPUs of the node), ``pin_memory`` on CUDA, ``persistent_workers``.
- **cuDNN attention** (Hopper can beat FlashAttention with it) only by opt-in: the device must be
  listed in ``CUDNN_ATTENTION_MEASURED`` (filled from ``benchmarks/bench_train_step.py``'s
  measurement on that GPU) or ``VITSEG_SDPA=cudnn`` set. No GPU measurement has been committed
  yet, so the table is empty and PyTorch picks the kernel.
- **MIG**: a MIG slice shows as one CUDA device and cannot join NCCL groups with other slices;
  ``mig_message()`` says so in one line, ``gpus_for_run`` returns 1, and under ``torchrun``
  ``single_gpu_on_mig()`` (the CLI's ``train``) lets rank 0 train alone.

``VITSEG_FAST=0`` turns the whole plan off (eager fp32, explicit attention): the baseline that
``benchmarks/bench_train_step.py`` measures the fast path against.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CUDNN_ATTENTION_MEASURED", "DEVICE_PEAK_BF16_TFLOPS", "FastPath", "autocast",
           "available_cpus", "channels_last", "device_peak", "forward_blocks", "gpus_for_run",
           "loader_kwargs", "maybe_compile", "mig_message", "optimizer", "plan", "prepare",
           "sdpa_context", "set_sdpa", "single_gpu_on_mig"]

#: Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's datasheets. Matched
#: against ``torch.cuda.get_device_name()`` in this order (first substring that matches wins).
DEVICE_PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("GH200", "NVIDIA GH200", 989.0),
    ("H200 NVL", "NVIDIA H200 NVL", 835.0),
    ("H200", "NVIDIA H200 SXM", 989.0),
    ("H100 NVL", "NVIDIA H100 NVL", 835.0),
    ("H100 PCIe", "NVIDIA H100 PCIe", 756.0),
    ("H100", "NVIDIA H100 SXM", 989.0),
    ("B200", "NVIDIA B200", 2250.0),
    ("A100", "NVIDIA A100", 312.0),
    ("L40S", "NVIDIA L40S", 362.0),
    ("A30", "NVIDIA A30", 165.0),
    ("A10", "NVIDIA A10", 125.0),
    ("L4", "NVIDIA L4", 121.0),
)

#: GPUs (device-name substrings) on which ``benchmarks/bench_train_step.py --sdpa-backends``
#: measured cuDNN attention faster than FlashAttention for our shapes. Add a name only with the
#: committed measurement beside it; empty until then.
CUDNN_ATTENTION_MEASURED: dict[str, str] = {}


@dataclass(frozen=True)
class FastPath:
    """What the fast path does on one device (``plan`` builds it; ``describe`` prints it).

    amp_dtype: autocast dtype or None (fp32) · sdpa: fused attention in timm blocks ·
    compile: wrap with ``torch.compile`` · fused_adamw: AdamW(fused=True) · channels_last:
    convert conv weights and image inputs · sdpa_backends: ``SDPBackend`` names in priority order
    (None: PyTorch's own choice) · notes: one-line reasons (MIG, missing bf16...).
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    sdpa: bool = True
    compile: bool = False
    fused_adamw: bool = False
    channels_last: bool = False
    sdpa_backends: tuple[str, ...] | None = None
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"
        parts = [f"device {self.device}", amp, "SDPA" if self.sdpa else "explicit attention",
                 "compiled" if self.compile else "eager",
                 "fused AdamW" if self.fused_adamw else "foreach AdamW"]
        if self.channels_last:
            parts.append("channels-last")
        if self.sdpa_backends:
            parts.append("SDPA backends " + ">".join(self.sdpa_backends))
        return "fast path: " + ", ".join(parts) + "".join(f"; {n}" for n in self.notes)


def _enabled(cfg: Any) -> bool:
    env = os.environ.get("VITSEG_FAST", "").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    return bool(getattr(cfg, "fast", True))


def plan(cfg: Any = None, device: torch.device | str | None = None, *,
         model: nn.Module | None = None) -> FastPath:
    """The fast path for ``cfg`` (a ``TrainConfig``; reads ``amp``, ``compile``, and ``fast``
    when present) on ``device`` (default: the best available). ``model`` lets channels-last
    look for spatial convolutions. Off entirely with ``VITSEG_FAST=0`` or ``cfg.fast=False``."""
    from . import device as best_device

    device = torch.device(device) if device is not None else best_device()
    if not _enabled(cfg):
        return FastPath(device, sdpa=False, notes=("off (VITSEG_FAST=0 or cfg.fast=False)",))
    cuda = device.type == "cuda"
    notes = []
    amp_dtype = None
    if cuda and getattr(cfg, "amp", True):
        if torch.cuda.is_bf16_supported():
            amp_dtype = torch.bfloat16
        else:
            notes.append("no bf16 on this GPU: fp32")
    mig = mig_message() if cuda else None
    if mig:
        notes.append(mig)
    return FastPath(
        device=device,
        amp_dtype=amp_dtype,
        sdpa=True,
        compile=bool(getattr(cfg, "compile", False)) and cuda,
        fused_adamw=cuda,
        channels_last=cuda and model is not None and _has_spatial_conv(model),
        sdpa_backends=_sdpa_backends(device),
        notes=tuple(notes),
    )


# -- attention ------------------------------------------------------------------------------------

def set_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Fused (``True``) or explicit (``False``) attention in every submodule with timm's
    ``fused_attn`` flag; -> how many modules were set. Values agree to float rounding
    (``tests/unit/test_fastpath.py``); modules that need weights call ``explicit_attention``
    directly and are not affected."""
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn") and isinstance(m.fused_attn, bool):
            m.fused_attn = bool(enabled)
            n += 1
    return n


def forward_blocks(vit: nn.Module, x: Tensor, logits_for: Iterable[int] = ()
                   ) -> tuple[Tensor, dict[int, Tensor]]:
    """Run a timm ViT's blocks on tokens ``x`` (B, N, C): fused attention in every block except
    those in ``logits_for``, which go through ``backbone.explicit_attention`` and return their
    pre-softmax logits (B, nh, N, N). -> (tokens after the last block, {block index: logits}).
    Only the asked-for layers are materialised: memory B·nh·N² per listed block, not per block."""
    from .backbone import block_residual, explicit_attention

    want = {i % len(vit.blocks) for i in logits_for}
    logits: dict[int, Tensor] = {}
    for i, blk in enumerate(vit.blocks):
        if i in want:
            y, _, lg = explicit_attention(blk.attn, blk.norm1(x))
            x = block_residual(blk, x, y)
            logits[i] = lg
        else:
            x = blk(x)
    return x, logits


def _sdpa_backends(device: torch.device) -> tuple[str, ...] | None:
    if device.type != "cuda":
        return None
    env = os.environ.get("VITSEG_SDPA", "").strip().lower()
    if env == "cudnn":
        return ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    if env not in ("", "auto"):
        return None
    try:
        name = torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError):
        return None
    for key in CUDNN_ATTENTION_MEASURED:
        if key in name:
            return ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    return None


def sdpa_context(fp: FastPath):
    """``torch.nn.attention.sdpa_kernel`` with the plan's backend priority, or a no-op."""
    if not fp.sdpa_backends:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, n) for n in fp.sdpa_backends], set_priority=True)


def autocast(fp: FastPath):
    """bf16 autocast on the plan's device, or a no-op (fp32)."""
    if fp.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(fp.device.type, dtype=fp.amp_dtype)


# -- model, optimizer -----------------------------------------------------------------------------

def _has_spatial_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 for m in model.modules())


def _to_channels_last_hook(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last)
                 if isinstance(a, Tensor) and a.dim() == 4 and a.is_floating_point() else a
                 for a in args)


def channels_last(model: nn.Module) -> nn.Module:
    """Convert ``model``'s 4-d parameters and buffers to channels-last and convert 4-d float
    positional inputs on every call (a forward pre-hook, installed once). Same values; only the
    memory layout differs. -> the same model."""
    model.to(memory_format=torch.channels_last)
    if not getattr(model, "_vitseg_channels_last", False):
        model.register_forward_pre_hook(_to_channels_last_hook)
        model._vitseg_channels_last = True
    return model


def prepare(model: nn.Module, cfg: Any = None, device: torch.device | str | None = None
            ) -> nn.Module:
    """The one line in ``fit()``: move ``model`` to ``device`` and apply the plan (fused attention
    in timm blocks, channels-last where it helps). Compilation stays separate
    (``maybe_compile``): under DDP it must wrap the DDP module. -> the same module."""
    fp = plan(cfg, device, model=model)
    model = model.to(fp.device)
    set_sdpa(model, fp.sdpa)
    if fp.channels_last:
        channels_last(model)
    return model


def maybe_compile(model: nn.Module, cfg: Any = None, device: torch.device | str | None = None
                  ) -> nn.Module:
    """``torch.compile(model)`` when the plan compiles (CUDA and ``cfg.compile``), else ``model``."""
    return torch.compile(model) if plan(cfg, device).compile else model


def optimizer(params: Iterable[Any], cfg: Any, device: torch.device | str | None = None
              ) -> torch.optim.AdamW:
    """AdamW over ``params`` (``train.param_groups`` output) at ``cfg.lr``: fused on CUDA, the
    multi-tensor ``foreach`` implementation elsewhere (same update, fewer kernel launches)."""
    fp = plan(cfg, device)
    if fp.fused_adamw:
        return torch.optim.AdamW(params, lr=cfg.lr, fused=True)
    return torch.optim.AdamW(params, lr=cfg.lr, foreach=fp.device.type != "mps")


# -- data loading ---------------------------------------------------------------------------------

def available_cpus(env: Mapping[str, str] | None = None) -> int:
    """CPUs this process may use: SLURM's ``SLURM_CPUS_PER_TASK``, else the affinity mask, else
    ``os.cpu_count()``; divided among the processes of this node under torchrun
    (``LOCAL_WORLD_SIZE``). At least 1."""
    env = os.environ if env is None else env
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cpus = int(env["SLURM_CPUS_PER_TASK"])
        tasks = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        if tasks.isdigit() and int(tasks) > 1:
            local = 1  # one srun task per GPU (submitit): the allocation is per process already
    else:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS
            cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local))


def loader_kwargs(cfg: Any, device: torch.device | str | None = None, *,
                  cpus: int | None = None, max_workers: int = 16) -> dict[str, Any]:
    """DataLoader keyword arguments sized from the machine -> ``num_workers``, ``pin_memory``,
    ``persistent_workers`` (and ``prefetch_factor`` with workers).

    Workers: one core stays with the training process, the rest (at most ``max_workers``) load.
    ``cfg.num_workers`` is a ceiling on CPU devices (0 keeps quick-scale runs in-process and
    bit-exact) and a ceiling on CUDA too when set (> 0); 0 on CUDA means "as many as fit".
    ``cpus`` overrides ``available_cpus()`` (tests)."""
    device = torch.device(device) if device is not None else plan(cfg).device
    cpus = available_cpus() if cpus is None else max(0, int(cpus))
    fit_machine = max(0, min(cpus - 1, max_workers))
    asked = int(getattr(cfg, "num_workers", 0) or 0)
    if device.type == "cuda":
        workers = min(asked, fit_machine) if asked > 0 else fit_machine
    else:
        workers = min(asked, fit_machine)
    kw: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda",
                          "persistent_workers": workers > 0}
    if workers > 0:
        kw["prefetch_factor"] = 4
    return kw


# -- devices --------------------------------------------------------------------------------------

def device_peak(name: str | None = None) -> tuple[str, float] | None:
    """(datasheet name, dense bf16 peak in FLOP/s) of the GPU called ``name`` (default: CUDA
    device 0), or None (CPU, or a GPU not in ``DEVICE_PEAK_BF16_TFLOPS``)."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
    for key, label, tflops in DEVICE_PEAK_BF16_TFLOPS:
        if key in name:
            return label, tflops * 1e12
    return None


@functools.lru_cache(maxsize=1)
def _nvidia_smi_list() -> str:  # once per process: plan() may be asked many times
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ""
    try:
        return subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10,
                              check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def mig_message(env: Mapping[str, str] | None = None, device_names: Sequence[str] | None = None,
                smi: str | None = None) -> str | None:
    """One line when this process runs on a MIG slice, else None.

    Looks at ``CUDA_VISIBLE_DEVICES`` (``MIG-<uuid>``), the CUDA device names, and
    ``nvidia-smi -L`` (``MIG 3g.40gb Device 0: ...``). The arguments replace those sources
    (tests)."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if device_names is None:
        device_names = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                        if torch.cuda.is_available() else [])
    found = "MIG-" in visible or any("MIG" in n for n in device_names)
    if not found:
        smi = _nvidia_smi_list() if smi is None else smi
        found = any(line.strip().startswith("MIG") for line in smi.splitlines())
    if not found:
        return None
    return ("MIG slice: it shows as one CUDA device and cannot join a multi-GPU (NCCL) group, "
            "so this runs single-GPU (nproc_per_node=1)")


def single_gpu_on_mig(env: MutableMapping[str, str] | None = None,
                      **mig_kwargs: Any) -> tuple[bool, str | None]:
    """Several ``torchrun`` processes on a MIG slice -> (does this process train?, the MIG line).

    Rank 0 trains single-GPU: its DDP variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``...) are
    removed from ``env`` (``os.environ``), so ``fit()`` starts no process group; the other ranks
    get False and should exit. One process, or no MIG: (True, None), ``env`` untouched."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return True, None
    msg = mig_message(env=env, **mig_kwargs)
    if not msg:
        return True, None
    if env.get("RANK", "0") != "0":
        return False, msg
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "ROLE_RANK", "ROLE_WORLD_SIZE"):
        env.pop(key, None)
    return True, msg


def gpus_for_run(requested: int, **mig_kwargs: Any) -> tuple[int, str | None]:
    """(GPUs to use, message or None): ``requested``, or 1 with the MIG line on a MIG slice."""
    msg = mig_message(**mig_kwargs)
    if msg and requested > 1:
        return 1, msg
    return requested, msg
