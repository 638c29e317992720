"""One training step, eager fp32 with explicit attention vs the fast path (``vitseg_lab.fastpath``),
for every chapter's model and for its bare timm backbone, measured in one run.

For each chapter (the registry's, plus the planned ones, which are skipped with a message until
they exist) this builds the chapter's model with ``build(cfg, num_classes)`` and trains it with
its own ``loss_fn`` on one batch of its own data, the way ``fit()`` does (AdamW, gradient
clipping), twice from the same weights:

- **eager**: fp32, timm's attention in its explicit (non-fused) form, default AdamW;
- **fast**: ``fastpath.plan``: SDPA, bf16 autocast, ``torch.compile`` and fused AdamW on CUDA,
  channels-last where it helps.

Beside it, the chapter's ViT alone (a copy, classifier head of 1000 classes) is trained the way
timm's ``benchmark.py`` trains a model: random input at the crop size, cross-entropy on random
targets, SGD lr 1e-4, warm-up steps, then samples/s over timed steps (eager and fast again).
Then **loader-only** throughput (the chapter's training set through a DataLoader sized by
``fastpath.loader_kwargs``) and **end to end** throughput (the fast step fed by that loader).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of the
eager model (explicit attention: every attention matmul is an ``aten.bmm`` the counter sees;
on CPU the fused SDPA kernel is not in its registry and would count as 0). They are 2 x the
multiply-adds; the attention part (batched matmuls) is checked to be non-zero and at least
3 x 4·B·N²·C per ViT block (forward + backward of Q·Kᵀ and P·V). MFU = FLOPs per step x steps/s / the GPU's dense bf16 peak
(``fastpath.DEVICE_PEAK_BF16_TFLOPS``); on a CPU it is "n/a". Every figure printed is a ratio
of two measurements of this run, or an absolute number next to the device's name.

    python benchmarks/bench_train_step.py                       # paper size on CUDA, tiny on CPU
    python benchmarks/bench_train_step.py --size tiny --chapters segvit --steps 2 --warmup 1
    python benchmarks/bench_train_step.py --sdpa-backends       # CUDA: FLASH vs CUDNN vs EFFICIENT

Goals on an H100/H200 (issue 13): SegViT within 10 % of the bare backbone's FLOP/s, model-only
MFU >= 40 %, end to end >= 25 %, loader/step >= 1. None has been measured here yet: no GPU run
has been committed (benchmarks/results/bench_train_step.json names the device it ran on).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from vitseg_lab import chapters, fastpath
from vitseg_lab.train import num_threads, param_groups, to_device

#: Every chapter the course plans, in order; those not in the registry yet are skipped.
PLANNED = ("attention", "tokens", "segvit", "afa", "restr", "zeroshot")
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "bench_train_step.json"


# -- building ---------------------------------------------------------------------------------

def _replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` with only the fields ``cfg`` has."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in names})


def chapter_setup(slug: str, size: str, batch: int | None) -> dict[str, Any]:
    """The chapter's config, data, class count and batch size at ``size`` (tiny | paper), or
    ``{"skip": reason}``."""
    if slug not in chapters.CHAPTERS:
        return {"skip": f"chapter {slug!r} is not in the registry yet"}
    ch = chapters.get(slug)
    try:
        mod = ch.load_module()
    except Exception as e:  # noqa: BLE001 (a chapter being written may not import yet)
        return {"skip": f"chapter {slug!r} does not import ({type(e).__name__}: {e!s:.80})"}
    missing = [n for n in ("build", "loss_fn", "quick_data") if not hasattr(mod, n)]
    if missing:
        return {"skip": f"chapter {slug!r} lacks {', '.join(missing)}"}
    cls = ch.config_class()
    note = ""
    if size == "tiny":
        cfg = cls.smoke()
        B = batch or cfg.train.batch_size
        cfg = _replace(cfg, num_train=max(4 * B, 16))
        data = mod.quick_data(cfg)
        num_classes = data[0].num_classes
    else:
        full = _replace(cls.full(), pretrained=False)   # random weights: same cost, no download
        B = batch or full.train.batch_size
        data, note = _paper_data(mod, full, B)
        num_classes = getattr(mod, "ADE_CLASSES", None) if slug == "segvit" else None
        num_classes = num_classes or data[0].num_classes
        cfg = full
    return {"mod": mod, "cfg": cfg, "data": data, "num_classes": num_classes, "B": B,
            "note": note}


def _paper_data(mod: Any, full: Any, B: int) -> tuple[Any, str]:
    """The chapter's full-scale training set when it is on disk, else ShapeScenes at the crop."""
    if hasattr(mod, "full_data"):
        try:
            return mod.full_data(full), "real full-scale data"
        except Exception as e:  # noqa: BLE001 (absent data raises the loader's own error)
            why = f"{type(e).__name__}"
    else:
        why = "no full_data()"
    crop = getattr(full, "crop", None) or getattr(full, "img_size", None)
    shapes = _replace(full, dataset="shapes", img_size=crop, num_train=8 * B, num_val=B)
    return mod.quick_data(shapes), (f"full-scale data absent ({why}): ShapeScenes at {crop} px "
                                    "for the loader")


def first_batch(data: Any, B: int) -> Any:
    collate = getattr(data, "collate", None) or torch.utils.data.default_collate
    return collate([data[i % len(data)] for i in range(B)])


def find_vit(model: nn.Module) -> nn.Module | None:
    from timm.models.vision_transformer import VisionTransformer

    return next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)


# -- counting -----------------------------------------------------------------------------------

_ATTENTION_OPS = ("bmm", "baddbmm", "_scaled_dot_product", "_flash_attention", "_efficient_attention",
                  "flex_attention")


def count_flops(step_fn, model: nn.Module) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of one forward + backward -> {"total", "attention"}.

    "attention" sums the batched matmuls (``aten.bmm``/``baddbmm``: Q·Kᵀ, P·V and their
    gradients, wherever the model computes them, backbone or decoder) and any fused attention
    op; ``nn.Linear`` layers are ``mm``/``addmm`` and do not enter it."""
    with FlopCounterMode(display=False) as counter:
        step_fn(backward=True)
    ops = counter.get_flop_counts().get("Global", {})
    attn = sum(v for op, v in ops.items() if any(k in str(op) for k in _ATTENTION_OPS))
    model.zero_grad(set_to_none=True)
    return {"total": float(counter.get_total_flops()), "attention": float(attn)}


def expected_attention_flops(vit: nn.Module, images: torch.Tensor) -> float:
    """Forward + backward attention-core FLOPs of explicit attention: per block, Q·Kᵀ and P·V are
    2·B·N²·C FLOPs each (N = P + L tokens), and the backward does both matmuls twice."""
    B, _, H, W = images.shape
    p = vit.patch_embed.patch_size[0]
    N = (H // p) * (W // p) + vit.num_prefix_tokens
    return 3.0 * 4.0 * B * N * N * vit.embed_dim * len(vit.blocks)


# -- timing ---------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Median-free, timm-style: ``warmup`` untimed steps, then ``steps`` timed back to back.
    -> {"seconds": elapsed, "peak_mem_gib": CUDA peak or nan}."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else float("nan"))
    return {"seconds": elapsed, "peak_mem_gib": peak}


def chapter_step(model, mod, cfg, batch, device, fast: bool, compile_: bool):
    """A ``fit()``-like step closure for the eager or the fast configuration."""
    tcfg = dataclasses.replace(cfg.train, compile=compile_)
    fp = fastpath.plan(tcfg, device, model=model) if fast else None
    if fast:
        fastpath.prepare(model, tcfg, device)
        opt = fastpath.optimizer(param_groups(model, tcfg), tcfg, device)
    else:
        model.to(device)
        fastpath.set_sdpa(model, False)
        opt = torch.optim.AdamW(param_groups(model, tcfg), lr=tcfg.lr)
    run = fastpath.maybe_compile(model, tcfg, device) if fast else model
    clip = cfg.train.grad_clip
    model.train()

    def step(b=None, backward=True, opt_step=True):
        with (fastpath.autocast(fp) if fp else _null()), \
             (fastpath.sdpa_context(fp) if fp else _null()):
            loss = mod.loss_fn(run, batch if b is None else b)["loss"]
        if backward:
            loss.backward()
        if opt_step:
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step, fp


def timm_step(vit, images, device, fast: bool, compile_: bool):
    """timm ``benchmark.py``'s TrainBenchmarkRunner step: CE on random targets, SGD lr 1e-4."""
    from timm.optim import create_optimizer_v2

    model = copy.deepcopy(vit)
    model.reset_classifier(1000)
    model.to(device).train()
    tcfg = _TimmCfg(compile=compile_)
    fp = fastpath.plan(tcfg, device, model=model) if fast else None
    if fast:
        fastpath.prepare(model, tcfg, device)
    else:
        fastpath.set_sdpa(model, False)
    run = fastpath.maybe_compile(model, tcfg, device) if fast else model
    opt = create_optimizer_v2(model, opt="sgd", lr=1e-4)
    x = images.to(device)
    target = torch.empty(x.shape[0], dtype=torch.long, device=device).random_(1000)
    loss_f = nn.CrossEntropyLoss()

    def step(backward=True, opt_step=True):
        opt.zero_grad()
        with (fastpath.autocast(fp) if fp else _null()), \
             (fastpath.sdpa_context(fp) if fp else _null()):
            loss = loss_f(run(x), target)
        if backward:
            loss.backward()
        if opt_step:
            opt.step()
        return loss

    return model, step


@dataclasses.dataclass(frozen=True)
class _TimmCfg:
    compile: bool = False
    amp: bool = True
    lr: float = 1e-4


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- one chapter -----------------------------------------------------------------------------

def bench_chapter(slug: str, a: argparse.Namespace, device: torch.device,
                  peak: tuple[str, float] | None) -> dict[str, Any]:
    s = chapter_setup(slug, a.size, a.batch)
    if "skip" in s:
        return {"chapter": slug, "skipped": s["skip"]}
    # On a CPU, the chapter's own thread count (quick scale: 1; more threads spin-wait on a
    # shared machine and measure the neighbours, not the model).
    threads = a.threads or (getattr(s["cfg"], "num_threads", None) if device.type == "cpu"
                            else None)
    with num_threads(threads):
        row = _bench_chapter(slug, s, a, device, peak)
    row["threads"] = torch.get_num_threads() if threads is None else threads
    return row


def _bench_chapter(slug: str, s: dict[str, Any], a: argparse.Namespace, device: torch.device,
                   peak: tuple[str, float] | None) -> dict[str, Any]:
    mod, cfg, data, B = s["mod"], s["cfg"], s["data"], s["B"]
    train_ds = data[0]
    batch = to_device(first_batch(train_ds, B), device)
    torch.manual_seed(0)
    eager_model = mod.build(cfg, s["num_classes"])
    fast_model = copy.deepcopy(eager_model)
    compile_ = a.compile == "on" or (a.compile == "auto" and device.type == "cuda")
    row: dict[str, Any] = {"chapter": slug, "batch": B, "note": s["note"],
                           "params_M": sum(p.numel() for p in eager_model.parameters()) / 1e6}

    eager, _ = chapter_step(eager_model, mod, cfg, batch, device, fast=False, compile_=False)
    fl = count_flops(lambda backward: eager(backward=backward, opt_step=False), eager_model)
    vit = find_vit(eager_model)
    images = batch.get("image") if isinstance(batch, dict) else None
    if vit is not None and images is not None:
        expect = expected_attention_flops(vit, images)
        if fl["attention"] <= 0:
            raise AssertionError(f"{slug}: the FLOP count has no attention FLOPs; the counter "
                                 "missed the attention matmuls.")
        if fl["attention"] < expect * (1 - 1e-6):
            raise AssertionError(f"{slug}: attention FLOPs {fl['attention']:.4g} counted, at "
                                 f"least {expect:.4g} expected (3 x 4·B·N²·C per ViT block).")
    row["gflops_per_step"] = fl["total"] / 1e9
    row["attention_share"] = fl["attention"] / fl["total"]

    t_eager = timed(eager, device, a.warmup, a.steps)
    fast, fp = chapter_step(fast_model, mod, cfg, batch, device, fast=True, compile_=compile_)
    t_fast = timed(fast, device, max(a.warmup, 3 if compile_ else 0), a.steps)
    row["fast_path"] = fp.describe()
    row["eager_img_s"] = B * a.steps / t_eager["seconds"]
    row["fast_img_s"] = B * a.steps / t_fast["seconds"]
    row["fast_vs_eager"] = row["fast_img_s"] / row["eager_img_s"]
    row["eager_peak_gib"], row["fast_peak_gib"] = t_eager["peak_mem_gib"], t_fast["peak_mem_gib"]

    # The data: loader alone, then the fast step fed by it (end to end).
    kw = fastpath.loader_kwargs(cfg.train, device)
    loader = DataLoader(train_ds, batch_size=B, shuffle=True, drop_last=True,
                        collate_fn=getattr(train_ds, "collate", None), **kw)
    n_load = max(2, min(a.steps, len(loader) - 1))
    it = iter(loader)
    next(it)                                   # workers started, first batch out
    t = time.perf_counter()
    for _ in range(n_load - 1):
        next(it)
    row["loader_img_s"] = B * (n_load - 1) / (time.perf_counter() - t)
    row["loader_workers"] = kw["num_workers"]
    row["loader_vs_step"] = row["loader_img_s"] / row["fast_img_s"]
    it = iter(loader)
    n_e2e = min(a.steps, len(loader))
    _sync(device)
    t = time.perf_counter()
    for _ in range(n_e2e):
        fast(to_device(next(it), device))
    _sync(device)
    row["e2e_img_s"] = B * n_e2e / (time.perf_counter() - t)
    row["e2e_vs_model_only"] = row["e2e_img_s"] / row["fast_img_s"]
    del it, loader

    if peak:
        flops_img = fl["total"] / B
        row["mfu_model_only"] = flops_img * row["fast_img_s"] / peak[1]
        row["mfu_e2e"] = flops_img * row["e2e_img_s"] / peak[1]
        row["mfu_eager"] = flops_img * row["eager_img_s"] / peak[1]

    if vit is not None and images is not None and not a.no_timm:
        row.update(bench_timm(vit, images, device, a, compile_, fl, B, peak, row))
    if a.sdpa_backends and device.type == "cuda":
        row["sdpa_backends"] = bench_sdpa_backends(fast_model, mod, cfg, batch, device, a)
    return row


def bench_timm(vit, images, device, a, compile_, chapter_fl, B, peak, row) -> dict[str, Any]:
    out: dict[str, Any] = {}
    flops = None
    for fast in (False, True):
        model, step = timm_step(vit, images, device, fast=fast, compile_=compile_ and fast)
        if flops is None:  # counted on the eager copy, as for the chapter
            flops = count_flops(lambda backward, s=step: s(backward=backward, opt_step=False),
                                model)
        t = timed(step, device, max(a.warmup, 3 if (compile_ and fast) else 0), a.steps)
        out["timm_fast_img_s" if fast else "timm_eager_img_s"] = B * a.steps / t["seconds"]
    out["timm_gflops_per_step"] = flops["total"] / 1e9
    out["timm_fast_vs_eager"] = out["timm_fast_img_s"] / out["timm_eager_img_s"]
    # Throughput per FLOP: achieved FLOP/s of the whole model over the bare backbone's.
    ours = chapter_fl["total"] / B * row["fast_img_s"]
    theirs = flops["total"] / B * out["timm_fast_img_s"]
    out["flops_per_s_vs_timm"] = ours / theirs
    if peak:
        out["timm_mfu"] = theirs / peak[1]
    return out


def bench_sdpa_backends(model, mod, cfg, batch, device, a) -> dict[str, float]:
    """images/s of the fast step with each SDPA backend forced (CUDA only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tcfg = dataclasses.replace(cfg.train, compile=False)
    fp = fastpath.plan(tcfg, device, model=model)
    opt = fastpath.optimizer(param_groups(model, tcfg), tcfg, device)
    res = {}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        def step(name=name):
            with fastpath.autocast(fp), sdpa_kernel(getattr(SDPBackend, name)):
                mod.loss_fn(model, batch)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        try:
            t = timed(step, device, a.warmup, a.steps)
            res[name] = batch["image"].shape[0] * a.steps / t["seconds"]
        except RuntimeError as e:
            res[name] = float("nan")
            print(f"  {name}: not available here ({e!s:.80})")
    return res


# -- main ----------------------------------------------------------------------------------------

def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--size", choices=("tiny", "paper"), default=None,
                    help="tiny: the smoke configs (CPU, CI); paper: full() models, random weights "
                         "(default: paper on CUDA, tiny elsewhere)")
    ap.add_argument("--chapters", default="all", help="comma-separated slugs, or all")
    ap.add_argument("--batch", type=int, default=None, help="default: the config's batch size")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (timm: 50 on GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (timm: 10 on GPU)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: the chapter's num_threads on CPU, else torch's)")
    ap.add_argument("--no-timm", action="store_true", help="skip the bare-backbone runs")
    ap.add_argument("--sdpa-backends", action="store_true",
                    help="CUDA: also time FLASH / CUDNN / EFFICIENT attention kernels")
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    a.size = a.size or ("paper" if device.type == "cuda" else "tiny")
    gpu = device.type == "cuda"
    a.steps = a.steps or (50 if gpu else 5)
    a.warmup = a.warmup if a.warmup is not None else (10 if gpu else 1)
    slugs = (list(dict.fromkeys([*PLANNED, *chapters.CHAPTERS])) if a.chapters == "all"
             else [s.strip() for s in a.chapters.split(",") if s.strip()])
    cpu = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({cpu})"
    peak = fastpath.device_peak(name) if gpu else None
    mig = fastpath.mig_message() if gpu else None
    print(f"bench_train_step: {name}, {a.size} size, torch {torch.__version__}, "
          f"peak for MFU: "
          f"{f'{peak[0]} {peak[1] / 1e12:.0f} TFLOP/s bf16 dense' if peak else 'n/a'}"
          + (f"; {mig}" if mig else ""))
    rows = []
    for slug in slugs:
        t = time.perf_counter()
        try:
            row = bench_chapter(slug, a, device, peak)
        except Exception as e:  # noqa: BLE001 (one chapter's failure must not hide the others')
            row = {"chapter": slug, "error": f"{type(e).__name__}: {e!s:.300}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        if "skipped" in row:
            print(f"  {slug}: skipped: {row['skipped']}")
        elif "error" in row:
            print(f"  {slug}: FAILED: {row['error']}")
        else:
            print(f"  {slug}: {row['fast_path']}" + (f"; {row['note']}" if row["note"] else ""))
    done = [r for r in rows if "skipped" not in r and "error" not in r]
    cols = ["chapter", "batch", "gflops_per_step", "attention_share", "fast_vs_eager",
            "flops_per_s_vs_timm", "timm_fast_vs_eager", "loader_vs_step", "e2e_vs_model_only"]
    if peak:
        cols += ["mfu_model_only", "mfu_e2e", "timm_mfu", "fast_peak_gib"]
    print(" | ".join(cols))
    for r in done:
        print(" | ".join(fmt(r.get(c, float("nan"))) for c in cols))
    if not peak:
        print("MFU: n/a (no GPU with a known bf16 peak); absolute images/s are in the JSON, "
              f"measured on {name}.")
    result = {"benchmark": "bench_train_step", "device": name, "size": a.size,
              "torch": torch.__version__, "default_threads": torch.get_num_threads(),
              "peak_flops": peak[1] if peak else None, "peak_name": peak[0] if peak else None,
              "steps": a.steps, "warmup": a.warmup, "rows": rows,
              "goals": {"flops_per_s_vs_timm": ">= 0.9", "mfu_model_only": ">= 0.40",
                        "mfu_e2e": ">= 0.25", "loader_vs_step": ">= 1"}}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()["rows"]) else 0)
