"""Launch and watch a chapter's full-scale run on a cluster from the notebook, and reduce metrics
across the processes of a multi-GPU run.

``launch(chapter)`` submits ``TrainTask`` with submitit's ``AutoExecutor``: on a SLURM login or
JupyterHub node it becomes an ``sbatch`` job (one task per GPU, DDP set up by ``fit()`` from the
environment); elsewhere (a laptop, CI) the same code runs under submitit's local executor. The
notebook kernel never touches CUDA: it only pickles the task and reads files.

- **Watching**: ``run.watch()`` redraws one output area with the job's state, a tqdm-like progress
  line and the live metrics plot, all read from ``out_dir/metrics.csv`` (written by ``fit()``).
- **Pre-emption and time limits**: ``TrainTask`` is ``Checkpointable``: when SLURM signals the end
  (``--signal=USR2@<delay>``, set by submitit), submitit requeues the same task, and ``fit()``
  resumes exactly from ``out_dir/last.pt`` (model, optimizer, RNG states, data position). A job
  that died otherwise (node failure, ``scancel``) is resubmitted with ``run.resubmit()``; the
  result is the same weights as an uninterrupted run (``tests/unit/test_cluster.py``).
- **Metrics across ranks**: under DDP, ``fit()`` evaluates on every process over its ``shard``
  of the eval set, and the chapters' metrics reduce across processes exactly
  (``vitseg_lab.metrics``: ``sharded_eval``, ``sum_over_ranks``, ``gather_over_ranks``).

    from vitseg_lab import cluster
    run = cluster.launch("segvit", gpus=8, timeout_min=24 * 60, partition="gpu")
    run.watch()              # state, progress, live plot; Ctrl-C / interrupt stops watching only
    run.resubmit()           # after a failure: continues from the last checkpoint
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import torch

from . import chapters, metrics

__all__ = ["ClusterRun", "TrainTask", "configure", "launch", "progress_line", "read_metrics",
           "render", "shard"]

_DONE_STATES = {"COMPLETED", "FINISHED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                "NODE_FAIL", "PREEMPTED", "INTERRUPTED", "BOOT_FAIL", "DEADLINE"}


# -- configuration ---------------------------------------------------------------------------------

def configure(chapter: str, scale: str = "full", overrides: dict[str, Any] | None = None) -> Any:
    """The chapter's config at ``scale`` with dotted overrides (``{"train.steps": 2000,
    "img_size": 512}``), as ``vitseg-lab train CHAPTER --scale S --train.steps 2000`` would
    build it. Unknown keys are one clear error."""
    cfg = chapters.get(chapter).config_class().for_scale(scale)
    for key, value in (overrides or {}).items():
        cfg = _set(cfg, key.split("."), value, key)
    return cfg


def _set(obj: Any, path: list[str], value: Any, key: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise KeyError(f"{type(obj).__name__} has no field {path[0]!r} (from override {key!r}); "
                       f"fields: {', '.join(sorted(names))}.")
    if len(path) > 1:
        value = _set(getattr(obj, path[0]), path[1:], value, key)
    else:
        value = _tuples(value)
    return dataclasses.replace(obj, **{path[0]: value})


def _tuples(value: Any) -> Any:
    """Lists (JSON, YAML, a notebook's ``[[12], [24]]``) -> tuples, nested ones too: config
    dataclasses hold tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


# -- the task that runs on the cluster -----------------------------------------------------------

@dataclass
class TrainTask(submitit.helpers.Checkpointable):
    """``chapter``'s ``run(cfg)`` at ``scale`` with ``overrides``, writing to ``out_dir`` and
    resuming from ``out_dir/last.pt`` whenever it (re)starts.

    throttle_s: seconds slept per training step, for demos and tests (lets a watcher see a tiny
    run progress, and a test stop it midway); 0 on a real run. The sleep changes no value.
    """

    chapter: str
    scale: str = "full"
    overrides: dict[str, Any] = field(default_factory=dict)
    out_dir: str | None = None
    throttle_s: float = 0.0

    def config(self) -> Any:
        cfg = configure(self.chapter, self.scale, self.overrides)
        out = self.out_dir or cfg.train.out_dir or f"runs/{self.chapter}-{self.scale}"
        # resume=True: a requeued or resubmitted job continues from its last checkpoint;
        # progress=False: the watcher reads metrics.csv, tqdm would only fill the log.
        return dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, out_dir=str(out), resume=True, progress=False))

    @property
    def metrics_csv(self) -> Path:
        return Path(self.config().train.out_dir) / "metrics.csv"

    def __call__(self) -> dict[str, Any]:
        world = _job_world()
        if world > 1:
            from .fastpath import mig_message

            mig = mig_message() if torch.cuda.is_available() else None
            if mig:  # MIG slices cannot form an NCCL group: rank 0 trains alone
                print(mig)
                if submitit.JobEnvironment().global_rank != 0:
                    return {"skipped": mig}
            else:
                submitit.helpers.TorchDistributedEnvironment().export(
                    set_cuda_visible_devices=False)
        mod = chapters.get(self.chapter).load_module()
        if self.throttle_s > 0:
            mod.loss_fn = _throttled(mod.loss_fn, self.throttle_s)
        result = mod.run(self.config())
        if result.skipped:
            print(result.skipped)
        return {"summary": result.summary(), "skipped": result.skipped,
                "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, float)},
                "checkpoint": result.checkpoint}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on pre-emption or time limit: requeue the same task. Nothing to
        save here: ``fit()`` writes ``last.pt`` every ``ckpt_every`` steps and resumes from it."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _throttled(loss_fn, seconds: float):
    def slow(model, batch):
        time.sleep(seconds)
        return loss_fn(model, batch)

    return slow


def _job_world() -> int:
    try:
        return submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job
        return 1


# -- launching ---------------------------------------------------------------------------------------

def launch(chapter: str, scale: str = "full", *, overrides: dict[str, Any] | None = None,
           out_dir: str | None = None, folder: str | os.PathLike | None = None,
           cluster: str | None = None, gpus: int = 1, nodes: int = 1,
           cpus_per_gpu: int = 8, mem_gb: int | None = None, timeout_min: int = 24 * 60,
           partition: str | None = None, account: str | None = None, qos: str | None = None,
           max_requeues: int = 20, throttle_s: float = 0.0, **slurm: Any) -> ClusterRun:
    """Submit ``chapter``'s run -> ``ClusterRun``.

    cluster: None picks SLURM when ``srun`` is on PATH, else ``"local"`` (a subprocess on this
    machine: laptops, CI, a JupyterHub server with its own GPU); ``"slurm"`` or ``"debug"``
    (in-process) force one. gpus: per node, one task each (DDP); nodes: SLURM nodes.
    folder: submitit's logs and pickles (default ``<out_dir>/submitit``). max_requeues: how many
    time-limit requeues SLURM gets (pre-emptions do not count). ``slurm``: any other
    ``slurm_*`` parameter of submitit (``slurm_constraint="h100"``...).
    """
    task = TrainTask(chapter, scale, dict(overrides or {}), out_dir, throttle_s)
    cfg = task.config()  # fails here, in the notebook, on a bad override
    folder = Path(folder or Path(cfg.train.out_dir) / "submitit")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=max_requeues)
    params: dict[str, Any] = {"name": f"vitseg-{chapter}-{scale}", "timeout_min": timeout_min,
                              "nodes": nodes, "tasks_per_node": gpus, "gpus_per_node": gpus,
                              "cpus_per_task": cpus_per_gpu, "mem_gb": mem_gb}
    if executor.cluster == "slurm":
        params.update({"slurm_partition": partition, "slurm_account": account,
                       "slurm_qos": qos,
                       "slurm_signal_delay_s": 180})  # USR2 3 min before the limit
        params.update(slurm)
    elif executor.cluster == "local":
        if nodes > 1:
            raise ValueError("the local executor runs on this machine only: use nodes=1, or "
                             "launch from a SLURM login node.")
        params.pop("cpus_per_task")
        params["gpus_per_node"] = gpus if torch.cuda.is_available() else 0
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ClusterRun(task, executor, [executor.submit(task)], cfg.train.steps)


@dataclass
class ClusterRun:
    """A launched run: the task, its executor and every job submitted for it (latest last)."""

    task: TrainTask
    executor: Any
    jobs: list[Any]
    total_steps: int

    @property
    def job(self) -> Any:
        return self.jobs[-1]

    @property
    def out_dir(self) -> Path:
        return Path(self.task.config().train.out_dir)

    @property
    def state(self) -> str:
        return str(self.job.state)

    def done(self) -> bool:
        return self.job.done() or self.state.split()[0] in _DONE_STATES

    def step(self) -> int:
        """The last step logged to metrics.csv (0 before the first row)."""
        rows = read_metrics(self.out_dir / "metrics.csv")
        return int(max((r.get("step", 0) for r in rows), default=0))

    def result(self) -> dict[str, Any]:
        return self.job.result()

    def cancel(self) -> None:
        self.job.cancel()

    def resubmit(self) -> Any:
        """Submit the task again (after a failure, ``scancel`` or a pre-emption SLURM did not
        requeue); it resumes from ``out_dir/last.pt``. Refused while the latest job runs."""
        if not self.done():
            raise RuntimeError(f"job {self.job.job_id} is still {self.state}; cancel it first "
                               "(run.cancel()) or wait for it.")
        self.jobs.append(self.executor.submit(self.task))
        return self.job

    def status(self) -> str:
        """One line: job id, state, progress."""
        return (f"job {self.job.job_id} ({self.executor.cluster}) {self.state} · "
                + progress_line(self.step(), self.total_steps))

    def watch(self, every: float = 10.0, timeout: float | None = None) -> str:
        """Redraw state, progress and the live metrics plot every ``every`` seconds until the job
        ends (or ``timeout``); interrupting the cell stops watching, not the job. -> final state."""
        from IPython.display import HTML, display

        handle = display(HTML("starting..."), display_id=True)
        t0, last = time.monotonic(), (0, time.monotonic())
        try:
            while True:
                step, now = self.step(), time.monotonic()
                rate = (step - last[0]) / (now - last[1]) if step > last[0] else None
                last = (step, now) if step > last[0] else last
                text = (f"job {self.job.job_id} ({self.executor.cluster}) {self.state} · "
                        + progress_line(step, self.total_steps, rate))
                handle.update(HTML(render_html(self.out_dir / "metrics.csv", text)))
                if self.done() or (timeout is not None and now - t0 > timeout):
                    break
                time.sleep(every)
        except KeyboardInterrupt:
            pass
        return self.state


# -- reading and drawing metrics.csv -------------------------------------------------------------

def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """``fit()``'s metrics.csv -> rows of floats (empty cells left out); [] while absent."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    out = []
    for row in rows:
        clean = {}
        for k, v in row.items():
            if k is None or v in (None, ""):
                continue
            try:
                clean[k] = float(v)
            except ValueError:
                continue
        out.append(clean)
    return out


def progress_line(step: int, total: int, rate: float | None = None, width: int = 24) -> str:
    """tqdm-like: ``'45%|██████████▊             | 450/1000 [2.5 step/s, ~3m40s left]'``."""
    frac = min(1.0, step / total) if total else 0.0
    full, part = divmod(frac * width, 1)
    bar = "█" * int(full) + (" ▏▎▍▌▋▊▉"[int(part * 8)] if int(full) < width else "")
    line = f"{frac:4.0%}|{bar:<{width}}| {step}/{total}"
    if rate:
        left = (total - step) / rate
        line += f" [{rate:.3g} step/s, ~{_duration(left)} left]"
    return line


def _duration(s: float) -> str:
    s = int(s)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


def render(path: str | os.PathLike, title: str = ""):
    """The live plot of metrics.csv (train loss terms left, eval metrics right) -> Figure (not
    pyplot's: drawing it never adds a figure to the notebook by itself)."""
    from matplotlib.figure import Figure

    from .train import History

    fig = Figure(figsize=(10, 3.2), layout="constrained")
    History(rows=read_metrics(path))._draw(*fig.subplots(1, 2))
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def render_html(path: str | os.PathLike, text: str) -> str:
    """``text`` above the plot as a PNG, in one HTML block (one display area, updated in place)."""
    buf = io.BytesIO()
    render(path).savefig(buf, format="png", dpi=80)
    png = base64.b64encode(buf.getvalue()).decode()
    safe = text.replace("&", "&amp;").replace("<", "&lt;")
    return f'<pre>{safe}</pre><img src="data:image/png;base64,{png}"/>'


# -- metrics across ranks ----------------------------------------------------------------------------

# fit() evaluates under DDP on every rank over ``shard(val)``, inside ``metrics.sharded_eval``,
# where the chapters' metrics reduce themselves (see ``vitseg_lab.metrics``). The name stays here
# for notebooks that shard a data set by hand.
shard = metrics.shard
