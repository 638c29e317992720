"""One training loop for every chapter: ``fit(model, data, cfg, loss_fn, metric_fn)``.

It reads top to bottom like nanoGPT's train.py: config, LR schedule, parameter groups, then
``fit``: set-up, resume, the loop, evaluation, checkpoints. Chapters differ only in what they pass:

- ``loss_fn(model, batch) -> {"loss": total, **terms}``; the batch is already on the device and
  the call runs under bf16 autocast on CUDA. Under DDP or ``torch.compile``, ``model`` is the
  wrapper: call it, and reach its attributes through ``unwrap(model)``.
- ``metric_fn(model, loader) -> {name: float}`` runs under ``torch.no_grad()`` and ``model.eval()``
  on ``val_data`` (or ``data``) with the plain model (no DDP/compile wrapper); the loader yields
  batches already on the device. Without a metric_fn, fit reports the mean loss terms on that
  loader (``val_loss``..., or ``train_loss``...). Scalars go into ``history.rows``, the whole
  dict (per-class lists too) into ``history.final``.
- DDP when launched by ``torchrun`` with more than one process: ``cfg.batch_size`` is per process,
  each rank reads its own shard of every epoch. Evaluation runs on every rank, each over its
  shard of the eval set (``metrics.shard``), inside ``metrics.sharded_eval``: the chapters'
  metrics reduce their sufficient statistics there (``SegMeter`` its confusion matrix,
  ``metrics.sum_over_ranks`` counts, ``metrics.gather_over_ranks`` per-item results in data-set
  order), so every rank's ``history`` holds the whole eval set's metrics, the same as one
  process would report. Only rank 0 writes ``last.pt``, ``metrics.csv`` and ``history.png`` and
  calls ``on_eval``.
- Resume: ``out_dir/last.pt`` holds model, optimizer, scheduler, step, every RNG state and the data
  position. Each epoch's order comes from ``(seed, epoch)`` and a resumed run skips the batches
  already consumed, so it ends with exactly the weights of an uninterrupted run on the same
  hardware and thread count. (With ``num_workers > 0``, random augmentations drawn inside
  workers differ after a resume; the sample order does not.)
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from . import device as best_device
from . import fastpath, metrics
from .chapters import RunResult, checkpoint_meta

__all__ = ["CheckpointError", "History", "TrainConfig", "evaluate", "fit", "load_checkpoint",
           "lr_at", "num_threads", "param_groups", "run_chapter", "save_checkpoint",
           "seed_everything", "skipped_run", "to_device", "unwrap"]

SCHEDULES = ("cosine", "poly", "constant")
# Settings a resumed run may change without changing its result (steps extends the schedule).
_FREE_TO_CHANGE = {"steps", "out_dir", "resume", "progress", "log_every", "eval_every",
                   "ckpt_every", "num_workers", "device", "compile", "fast"}


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of ``fit``; change one with ``dataclasses.replace(cfg, lr=3e-4)``.

    ``steps`` counts optimizer steps. ``batch_size`` is per process under DDP. ``eval_every``,
    ``log_every`` and ``ckpt_every`` are in steps; the last step always logs, evaluates and (with
    ``out_dir``) checkpoints. ``head_lr_mult`` scales the LR of parameters whose name starts with
    one of ``head_prefixes`` (SegViT trains its decoder at 10x).
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    schedule: str = "cosine"  # "cosine" | "poly" | "constant"
    poly_power: float = 1.0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    eval_every: int = 0  # 0 = evaluate once at the end
    log_every: int = 10
    ckpt_every: int = 0  # 0 = checkpoint only at the end (when out_dir is set)
    out_dir: str | None = None
    resume: bool = True
    seed: int = 0
    num_workers: int = 0
    amp: bool = True  # bf16 autocast on CUDA only; ignored elsewhere
    compile: bool = False
    device: str = "auto"
    progress: bool = True
    head_lr_mult: float = 1.0
    head_prefixes: tuple[str, ...] = ("head", "decoder")
    no_decay_norm_bias: bool | str = True  # no decay on norm layers, biases, 1-d; "norm": norms only
    fast: bool = True  # fastpath.plan: fused attention, bf16, fused AdamW, channels-last, loaders

    def __post_init__(self):
        checks = [
            (self.schedule in SCHEDULES, f"schedule={self.schedule!r} is not one of {SCHEDULES}"),
            (self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1"),
            (self.lr > 0 and self.poly_power > 0, "lr and poly_power must be > 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio={self.min_lr_ratio} is not in [0, 1]"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or None"),
            (min(self.warmup_steps, self.eval_every, self.log_every, self.ckpt_every,
                 self.num_workers) >= 0, "step counts and num_workers must be >= 0"),
            (isinstance(self.head_prefixes, tuple), "head_prefixes must be a tuple like ('head',)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}.")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR multiplier of 0-based ``step``: the optimizer uses ``cfg.lr * lr_at(step, cfg)``.

    Linear warmup ``(step + 1) / warmup_steps`` up to 1, then cosine or polynomial decay from 1 at
    ``warmup_steps`` to ``min_lr_ratio`` at ``cfg.steps`` (or constant 1).
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * t))
    else:  # poly, as in DeepLab/SegViT: (1 - t) ** power
        decay = (1.0 - t) ** cfg.poly_power
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups, each with a ``name``: decay, no_decay, head_decay, head_no_decay.

    Head parameters (name starts with one of ``cfg.head_prefixes``) get ``lr * head_lr_mult``.
    With ``no_decay_norm_bias``: norm-layer parameters, biases, 1-d parameters and the names a
    submodule lists in a timm-style ``no_weight_decay()`` (``pos_embed``, ``cls_token``) get no
    weight decay. Empty groups are left out.
    """
    norm_names, skip = set(), set()
    for prefix, mod in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(mod, _NORMS):
            norm_names |= {dot + n for n, _ in mod.named_parameters(recurse=False)}
        if callable(getattr(mod, "no_weight_decay", None)):
            skip |= {dot + n for n in mod.no_weight_decay()}
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = name.startswith(cfg.head_prefixes)
        only_norm = cfg.no_decay_norm_bias == "norm"  # the official SegViT: norm layers only
        no_decay = name in norm_names if only_norm else cfg.no_decay_norm_bias and (
            p.ndim <= 1 or name.endswith(".bias") or name in norm_names or name in skip)
        key = ("head_" if head else "") + ("no_decay" if no_decay else "decay")
        group = groups.setdefault(key, {
            "name": key, "params": [], "lr": cfg.lr * (cfg.head_lr_mult if head else 1.0),
            "weight_decay": 0.0 if no_decay else cfg.weight_decay})
        group["params"].append(p)
    if not groups:
        raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
    return [groups[k] for k in ("decay", "no_decay", "head_decay", "head_no_decay") if k in groups]


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor in a (nested) dict/list/tuple/namedtuple to ``device``; keep the rest."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=torch.device(device).type == "cuda")
    if isinstance(batch, Mapping):  # dict, or e.g. a tokenizer's BatchEncoding
        moved = {k: to_device(v, device) for k, v in batch.items()}
        with contextlib.suppress(TypeError):
            return type(batch)(moved)
        return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` and/or DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``torch.save(state)`` to a temporary file beside ``path``, then ``os.replace`` it: a crash
    mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (``weights_only``: no code runs)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or truncated ({type(e).__name__}); delete it, or set "
            "TrainConfig(resume=False), to start the run over."
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"Checkpoint {path} holds a {type(state).__name__}, not a dict; "
                              "delete it or set TrainConfig(resume=False).")
    return state


@dataclass
class History:
    """What ``fit`` logged. ``rows``: train rows ``{step, lr, loss, <terms>}`` every ``log_every``
    steps (means since the previous row) and eval rows ``{step, <metrics>}`` (no ``lr`` key);
    ``final``: the last evaluation's full dict; ``csv_path``: ``metrics.csv`` when out_dir is set."""

    rows: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    csv_path: str | None = None
    _header: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def append(self, row: dict) -> None:
        """Add a row and append it to the CSV (rewritten with a wider header if it has new keys)."""
        self.rows.append(row)
        if self.csv_path is None:
            return
        if not os.path.exists(self.csv_path) or any(k not in self._header for k in row):
            return self.rewrite_csv()
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self._header).writerow(row)

    def rewrite_csv(self) -> None:
        """Write every row to ``csv_path`` (temp file + ``os.replace``)."""
        if self.csv_path is None:
            return
        self._header = list(dict.fromkeys(k for row in self.rows for k in row))
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.csv_path) or ".", suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, self._header)
            if self._header:
                w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def plot(self, ax=None):
        """Loss terms (left) and eval metrics (right) against step -> matplotlib Figure.

        Without ``ax`` the figure is a pyplot figure, so ``plt.show()`` (or the end of a notebook
        cell) draws it; with ``ax``, losses go on ``ax`` and metrics on its twin y-axis."""
        if ax is None:
            import matplotlib.pyplot as plt  # here, not at import: fit() never needs pyplot

            fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
        else:
            fig, ax_loss, ax_metric = ax.figure, ax, ax.twinx()
        self._draw(ax_loss, ax_metric)
        return fig

    def _draw(self, ax_loss, ax_metric) -> None:
        for a, rows, style in ((ax_loss, [r for r in self.rows if "lr" in r], "-"),
                               (ax_metric, [r for r in self.rows if "lr" not in r], "o-")):
            for key in dict.fromkeys(k for r in rows for k in r if k not in ("step", "lr")):
                pts = [(r["step"], r[key]) for r in rows if key in r]
                a.plot(*zip(*pts), style, label=key, markersize=3)
            if rows:
                a.legend(fontsize=8)
            a.set_xlabel("step")
        ax_loss.set_ylabel("train loss")
        ax_metric.set_ylabel("eval")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch: the one place a chapter's ``run`` and ``fit`` seed from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_GROUPS_MADE = itertools.count()  # process groups process_group made in this process


def _processes(cfg: TrainConfig) -> tuple[bool, int, int, torch.device]:
    """(under torchrun?, rank, world size, this process's device) from the environment."""
    env = os.environ
    ddp = int(env.get("WORLD_SIZE", "1")) > 1 and "RANK" in env and "LOCAL_RANK" in env
    rank, world = (int(env["RANK"]), int(env["WORLD_SIZE"])) if ddp else (0, 1)
    return ddp, rank, world, _pick_device(cfg.device, int(env["LOCAL_RANK"]) if ddp else None)


@contextlib.contextmanager
def process_group(cfg: TrainConfig):
    """Under torchrun, the process group for the block (created here unless one exists, and then
    destroyed on exit) -> this process's device. Outside torchrun: nothing but the device.

    ``run_chapter`` holds one around the baseline evaluation and ``fit``, so the untrained model
    is evaluated on the GPU, each rank over its shard, like every later evaluation."""
    ddp, rank, world, device = _processes(cfg)
    created = False
    if ddp and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Long timeout: a slow evaluation (COCO AP over a gathered split) or a checkpoint
        # write keeps the other ranks waiting at the next collective.
        timeout = timedelta(minutes=60)
        store = next(dist.rendezvous("env://", rank, world, timeout=timeout))[0]
        store.set_timeout(timeout)
        # A fresh key prefix per group: torchrun's store outlives a destroyed group, and a second
        # group under torch's default prefix (two fit() calls in one process) can read the first
        # group's stale addresses and hang at its rendezvous. Every rank counts alike.
        store = dist.PrefixStore(f"vitseg_pg{next(_GROUPS_MADE)}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=world, timeout=timeout)
        created = True
    try:
        yield device
    finally:
        if created:
            dist.destroy_process_group()


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run the block on ``n`` torch CPU threads (None: leave the setting), then restore it.

    Small models on a busy machine train faster on one thread: with more, torch's workers
    spin-wait on each other's tiny matmuls."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fit(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    loss_fn: Callable[[nn.Module, Any], dict],
    metric_fn: Callable[[nn.Module, Any], dict] | None = None,
    *,
    val_data: Dataset | None = None,
    collate_fn: Callable | None = None,
    on_eval: Callable[[History], None] | None = None,
    meta: dict | None = None,
) -> History:
    """Train ``model`` on ``data`` for ``cfg.steps`` AdamW steps; see the module docstring.

    ``meta`` (``chapters.checkpoint_meta``: the chapter, its config, the class count) is stored in
    every checkpoint so ``chapters.load_model`` can rebuild the model; resuming a checkpoint whose
    ``meta`` differs (another chapter or model configuration) is refused.

    Returns the History (also written to ``cfg.out_dir`` as metrics.csv and history.png). The model
    stays on the training device, in the train/eval mode it came in.
    """
    # -- processes, device, seeds ---------------------------------------------------------------
    ddp, rank, world, device = _processes(cfg)
    n_train = _length(data, "data")
    if n_train // world < cfg.batch_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} is larger than the {n_train // world} training samples "
            "per process, and fit drops incomplete batches; lower batch_size or add data.")
    steps_per_epoch = n_train // world // cfg.batch_size
    if val_data is not None:
        _length(val_data, "val_data")

    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(process_group(cfg))
        seed_everything(cfg.seed + rank)

        # -- model, optimizer, schedule ---------------------------------------------------------
        raw = fastpath.prepare(model, cfg, device)
        fp = fastpath.plan(cfg, device, model=raw)
        cleanup.callback(raw.train, raw.training)  # leave the model in the mode it came in
        if ddp:
            # static_graph: parameters the forward never touches (a ViT's last norm when the head
            # reads inner layers) are fine, with no per-step search for them.
            model = nn.parallel.DistributedDataParallel(
                raw, device_ids=[device.index] if device.type == "cuda" else None,
                static_graph=True)
        model = fastpath.maybe_compile(model, cfg, device)
        opt = fastpath.optimizer(param_groups(raw, cfg), cfg, device)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))

        # -- resume -----------------------------------------------------------------------------
        out = Path(cfg.out_dir) if cfg.out_dir else None
        ckpt_path = out / "last.pt" if out else None
        if out and rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        history = History(csv_path=str(out / "metrics.csv") if out and rank == 0 else None)
        step, log_sums, log_n = 0, {}, 0
        plotted = -math.inf  # when history.png was last written
        if ckpt_path and cfg.resume and ckpt_path.exists():
            ck = load_checkpoint(ckpt_path)
            missing = {"model", "optimizer", "scheduler", "step", "rng", "data", "log"} - set(ck)
            if missing:
                raise CheckpointError(f"Checkpoint {ckpt_path} lacks {sorted(missing)}, so fit() "
                                      "did not write it; delete it or set resume=False.")
            try:
                raw.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
                sched.load_state_dict(ck["scheduler"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(
                    f"Checkpoint {ckpt_path} does not fit this model or optimizer ({e!s:.200}); "
                    "use another out_dir, delete it, or set resume=False.") from e
            if meta is not None and ck.get("meta") not in (None, meta):
                old = ck["meta"]
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise CheckpointError(
                    f"Checkpoint {ckpt_path} was written by another run ({', '.join(diff)} "
                    "differ); use another out_dir, delete it, or set resume=False.")
            step = ck["step"]
            changed = [k for k, v in asdict(cfg).items()
                       if k not in _FREE_TO_CHANGE and ck.get("config", {}).get(k) != v]
            if changed:
                warnings.warn(f"Resuming {ckpt_path} with other settings ({', '.join(changed)}): "
                              "the run will differ from an uninterrupted one.", stacklevel=2)
            if rank == 0 and cfg.progress:
                print(f"fit: resuming {ckpt_path} at step {step}/{cfg.steps}")
            rngs = ck["rng"]
            _set_rng(rngs[rank] if len(rngs) == world else rngs[0])
            if ck["data"]["steps_per_epoch"] != steps_per_epoch or len(rngs) != world:
                warnings.warn(f"Resuming {ckpt_path} with another dataset size, batch size or "
                              "process count: the data order will differ from the first run.",
                              stacklevel=2)
            history.rows, history.final = ck["log"]["rows"], ck["log"]["final"]
            log_sums = {k: v.to(device) for k, v in ck["log"]["sums"].items()}
            log_n = ck["log"]["n"]
        if history.csv_path:
            history.rewrite_csv()  # drop rows a killed run logged after its last checkpoint

        # -- the loop ---------------------------------------------------------------------------
        batches = _batches(data, cfg, step, steps_per_epoch, rank, world, collate_fn, device)
        cleanup.callback(batches.close)
        bar = tqdm(total=cfg.steps, initial=step, desc="fit", dynamic_ncols=True,
                   disable=not cfg.progress or rank != 0)
        cleanup.callback(bar.close)
        model.train()
        while step < cfg.steps:
            batch = to_device(next(batches), device)
            with fastpath.autocast(fp), fastpath.sdpa_context(fp):
                terms = loss_fn(model, batch)
            loss = _check_loss(terms, step, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            bar.update()

            # Sums stay tensors between rows: no GPU sync per step.
            for k, v in terms.items():
                if _is_scalar(v):
                    log_sums[k] = log_sums.get(k, 0) + torch.as_tensor(v).detach().float()
            log_n += 1
            if (cfg.log_every and step % cfg.log_every == 0) or step == cfg.steps:
                row = {"step": step, "lr": cfg.lr * lr_at(step - 1, cfg)}
                row.update({k: (v / log_n).item() for k, v in log_sums.items()})
                log_sums, log_n = {}, 0
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.2e}")

            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                # every rank evaluates its shard; the metrics come back reduced over all ranks
                prefix = "val_" if val_data is not None else "train_"
                result = evaluate(raw, val_data if val_data is not None else data, cfg, loss_fn,
                                  metric_fn, collate_fn, device, prefix)
                history.final = result
                history.append({"step": step, **{k: float(v) for k, v in result.items()
                                                 if isinstance(v, (int, float))}})
                if not bar.disable:
                    bar.write(f"step {step}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in history.rows[-1].items() if k != "step"))
                if on_eval is not None and rank == 0:
                    on_eval(history)
                # history.png (~0.5 s to draw): at most every PLOT_EVERY_S seconds, and at the end
                if out and rank == 0 and (step == cfg.steps
                                          or time.perf_counter() - plotted >= PLOT_EVERY_S):
                    _save_plot(history, out / "history.png")
                    plotted = time.perf_counter()

            if out and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps):
                rngs = [_get_rng()]
                if ddp:
                    rngs = [None] * world
                    dist.all_gather_object(rngs, _get_rng())
                if rank == 0:
                    save_checkpoint({
                        "model": raw.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "step": step, "rng": rngs,
                        "config": asdict(cfg), "meta": meta,
                        "data": {"epoch": step // steps_per_epoch,
                                 "batch": step % steps_per_epoch,
                                 "steps_per_epoch": steps_per_epoch, "world_size": world},
                        "log": {"rows": history.rows, "final": history.final,
                                "sums": {k: v.cpu() for k, v in log_sums.items()}, "n": log_n},
                    }, ckpt_path)
    return history


def run_chapter(slug: str, cfg: Any, build: Callable, loss_fn: Callable, metric_fn: Callable,
                data: tuple[Dataset, Dataset], num_classes: int, collate_fn: Callable | None = None):
    """What every chapter's ``run(cfg)`` does once its data is chosen -> ``chapters.RunResult``.

    Seeds once (``cfg.train.seed``), builds the model, evaluates it untrained on the validation
    data (the baseline, also the first point of the eval curve) on the training device (under
    torchrun: each rank its shard, inside the process group ``fit`` then uses), trains with
    ``fit`` on ``cfg.num_threads`` threads with the chapter's checkpoint ``meta``, and reports.
    """
    t0 = time.perf_counter()
    train_ds, val_ds = data
    seed_everything(cfg.train.seed)
    model = build(cfg, num_classes)
    with num_threads(cfg.num_threads), process_group(cfg.train) as device:
        model = fastpath.prepare(model, cfg.train, device)  # what fit() runs: same device, kernels
        baseline = evaluate(model, val_ds, cfg.train, loss_fn, metric_fn, collate_fn, device)
        history = fit(model, train_ds, cfg.train, loss_fn, metric_fn, val_data=val_ds,
                      collate_fn=collate_fn, meta=checkpoint_meta(slug, cfg, num_classes))
    history.rows.insert(0, {"step": 0, **{k: float(v) for k, v in baseline.items()
                                          if isinstance(v, (int, float))}})
    history.rewrite_csv()
    out = cfg.train.out_dir
    return RunResult(model, history, history.final, cfg.target_metric, cfg.target,
                     time.perf_counter() - t0, asdict(cfg), baseline=baseline,
                     checkpoint=str(Path(out) / "last.pt") if out else None, val=val_ds)


def skipped_run(cfg: Any, message: str):
    """The ``chapters.RunResult`` of a run that could not start (``message``: what is missing)."""
    return RunResult(None, None, {}, cfg.target_metric, cfg.target, 0.0, asdict(cfg),
                     skipped=message)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, cfg: TrainConfig, loss_fn, metric_fn=None,
             collate_fn=None, device=None, prefix: str = "val_", *, sharded: bool = True) -> dict:
    """``metric_fn(model, loader)`` in eval mode, or the mean loss terms (``val_loss``...) without
    one; the train/eval mode is restored afterwards.

    Under ``torch.distributed`` (``fit`` under DDP) with ``sharded``, each process evaluates its
    shard (``metrics.shard``) inside ``metrics.sharded_eval``, where the chapter's metric reduces
    across processes: every rank returns the whole data set's metrics. A ``metric_fn`` that
    does not reduce through ``metrics`` (``SegMeter``, ``sum_over_ranks``,
    ``gather_over_ranks``) would report its shard only: pass ``sharded=False`` for it. A data set
    smaller than the process count is evaluated whole on every rank."""
    device = device or next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if (
        sharded and dist.is_available() and dist.is_initialized()) else (0, 1)
    if world > 1 and len(dataset) >= world:
        dataset = metrics.shard(dataset, rank, world)
    else:
        rank, world = 0, 1
    # Own generator: evaluating never moves the global RNG, so eval_every can't change training.
    loader = _OnDevice(DataLoader(dataset, cfg.batch_size, shuffle=False, collate_fn=collate_fn,
                                  **{**fastpath.loader_kwargs(cfg, device),
                                     "persistent_workers": False},
                                  generator=torch.Generator().manual_seed(cfg.seed)), device)
    was_training = model.training
    model.eval()
    try:
        with _autocast(device, cfg), metrics.sharded_eval(rank, world):
            if metric_fn is not None:
                result = metric_fn(model, loader)
            else:
                sums, n = {}, 0
                for batch in loader:
                    for k, v in _check_loss(loss_fn(model, batch), None, cfg, grad=False).items():
                        if _is_scalar(v):
                            sums[prefix + k] = sums.get(prefix + k, 0.0) + float(v)
                    n += 1
                if world > 1:  # batch means summed over every rank's batches
                    parts: list[Any] = [None] * world
                    dist.all_gather_object(parts, (sums, n))
                    sums = {k: sum(p[0][k] for p in parts) for k in parts[0][0]}
                    n = sum(p[1] for p in parts)
                result = {k: v / n for k, v in sums.items()}
    finally:
        model.train(was_training)
    if not isinstance(result, dict):
        raise TypeError(f"metric_fn must return a dict like {{'mIoU': 0.5}}, not "
                        f"{type(result).__name__}.")
    return {k: _plain(v) for k, v in result.items()}


# -- helpers ---------------------------------------------------------------------------------------

class _EpochBatches:
    """Batch sampler: epoch e is a permutation seeded by (cfg.seed, e), cut into per-rank shards
    (DistributedSampler, also for one process) and full batches; a resumed run starts at
    ``skip``. One object for the whole run, so ``persistent_workers`` keeps the workers alive."""

    def __init__(self, data, cfg: TrainConfig, start_step: int, per_epoch: int, rank, world):
        self.order = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                        seed=cfg.seed, drop_last=True)
        self.batch_size, self.per_epoch = cfg.batch_size, per_epoch
        self.epoch, self.skip = divmod(start_step, per_epoch)

    def __iter__(self):
        self.order.set_epoch(self.epoch)
        idx, bs = list(self.order), self.batch_size
        for b in range(self.skip, self.per_epoch):
            yield idx[b * bs:(b + 1) * bs]
        self.epoch, self.skip = self.epoch + 1, 0

    def __len__(self):
        return self.per_epoch - self.skip


def _batches(data, cfg, start_step, per_epoch, rank, world, collate_fn, device):
    """Batches forever, epoch after epoch."""
    loader = DataLoader(data, batch_sampler=_EpochBatches(data, cfg, start_step, per_epoch, rank,
                                                          world),
                        collate_fn=collate_fn, **fastpath.loader_kwargs(cfg, device),
                        generator=torch.Generator().manual_seed(cfg.seed))  # not the global RNG
    while True:
        yield from loader


class _OnDevice:
    """A DataLoader whose batches arrive on ``device`` (``len`` and ``.dataset`` still work)."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device, self.dataset = loader, device, loader.dataset

    def __iter__(self):
        return (to_device(b, self.device) for b in self.loader)

    def __len__(self):
        return len(self.loader)


def _check_loss(terms: Any, step: int | None, cfg: TrainConfig, grad: bool = True) -> Any:
    loss = terms.get("loss") if isinstance(terms, dict) else None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a dict with keys {sorted(terms)}" if isinstance(terms, dict) else type(terms).__name__
        raise TypeError("loss_fn must return a dict with the total as a scalar tensor under "
                        f"'loss', e.g. {{'loss': ce + dice, 'ce': ce}}; it returned {got}.")
    if not grad:
        return terms
    if not loss.requires_grad:
        raise ValueError("The 'loss' from loss_fn does not require grad; compute it from the "
                         "model's output without .detach(), .item() or torch.no_grad().")
    if not torch.isfinite(loss):  # one sync per step, so a NaN is named at the step it appears
        raise FloatingPointError(
            f"The loss is {loss.item()} at step {step + 1}: training diverged; lower the "
            f"learning rate (cfg.lr={cfg.lr:g}) or use a longer warmup.")
    return loss


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) or (isinstance(v, torch.Tensor) and v.numel() == 1)


def _plain(v: Any) -> Any:
    """Tensors and numpy values -> Python numbers or lists (checkpoints load with weights_only)."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.ndarray, np.generic)):
        return v.item() if v.size == 1 else v.tolist()
    return v


def _length(data: Any, name: str) -> int:
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"{name} must be a map-style Dataset (with __len__ and __getitem__), "
                        f"not {type(data).__name__}; fit builds the DataLoader itself.")
    if len(data) == 0:
        raise ValueError(f"{name} is empty (len 0); check the data path, split or filters.")
    return len(data)


def _pick_device(name: str, local_rank: int | None) -> torch.device:
    if name == "auto":
        if local_rank is not None:
            return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        return best_device()
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device='auto' or 'cpu'.")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    return dev


def _autocast(device: torch.device, cfg: TrainConfig):
    return fastpath.autocast(fastpath.plan(cfg, device))


def _get_rng() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, keys.tolist(), pos, has_gauss, gauss)}  # lists: weights_only-loadable
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


PLOT_EVERY_S = 30.0  # fit() redraws history.png at an evaluation at most this often (and at the end)


def _save_plot(history: History, path: Path) -> None:
    # A Figure outside pyplot: saving it mid-training must not add a figure to a notebook cell.
    from matplotlib.figure import Figure  # here: DDP workers and fit() without out_dir skip it

    fig = Figure(figsize=(10, 3.5), layout="constrained")
    history._draw(*fig.subplots(1, 2))
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
