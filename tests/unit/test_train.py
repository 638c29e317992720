"""Tests for vitseg_lab.train: LR schedule, parameter groups, the loop, checkpoints, resume, DDP.

Everything runs on a ~150-parameter model (tests/unit/_ddp_toy.py) on CPU.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import multiprocessing
import os
import signal
import subprocess
import sys
from collections import OrderedDict, UserDict, namedtuple
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from vitseg_lab.train import (
    CheckpointError,
    History,
    TrainConfig,
    evaluate,
    fit,
    load_checkpoint,
    lr_at,
    num_threads,
    param_groups,
    save_checkpoint,
    to_device,
)

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("_ddp_toy", HERE / "_ddp_toy.py")
toy = importlib.util.module_from_spec(_spec)
sys.modules["_ddp_toy"] = toy  # its dataclass resolves annotations through sys.modules
_spec.loader.exec_module(toy)

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors on 2 shared cores: thread hand-offs cost 40x the maths.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


# -- lr_at ----------------------------------------------------------------------------------------

def test_lr_at_warmup_is_linear_from_one_step():
    cfg = TrainConfig(steps=100, warmup_steps=10)
    ramp = [lr_at(s, cfg) for s in range(10)]
    assert ramp == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(10, cfg) == pytest.approx(1.0)  # decay starts from the peak


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_lr_at_cosine_matches_formula_and_ends_at_min_ratio(min_ratio):
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=min_ratio)
    for s in (10, 33, 55, 99):
        want = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
        assert lr_at(s, cfg) == pytest.approx(want)
    assert lr_at(55, cfg) == pytest.approx(min_ratio + (1 - min_ratio) / 2)
    assert lr_at(100, cfg) == pytest.approx(min_ratio)
    assert lr_at(500, cfg) == pytest.approx(min_ratio)  # clamped past the end
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_lr_at_poly_and_constant():
    cfg = TrainConfig(steps=50, warmup_steps=0, schedule="poly", poly_power=2.0)
    for s in (0, 7, 25, 49, 50):
        assert lr_at(s, cfg) == pytest.approx((1 - s / 50) ** 2)
    const = replace(cfg, schedule="constant", warmup_steps=5)
    assert [lr_at(s, const) for s in (0, 4, 5, 49)] == pytest.approx([0.2, 1.0, 1.0, 1.0])


def test_optimizer_uses_lr_at_in_every_group(monkeypatch):
    seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append({g["name"]: g["lr"] for g in self.param_groups})
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    cfg = toy.toy_cfg(steps=12, warmup_steps=4, head_lr_mult=10.0, min_lr_ratio=0.05)
    fit(toy.toy_model(), toy.ToyData(40), cfg, toy.toy_loss)
    assert len(seen) == 12
    for s, lrs in enumerate(seen):
        assert lrs["decay"] == pytest.approx(cfg.lr * lr_at(s, cfg))
        assert lrs["head_decay"] == pytest.approx(10 * cfg.lr * lr_at(s, cfg))


# -- config, param groups, to_device ----------------------------------------------------------

@pytest.mark.parametrize("bad, words", [
    ({"schedule": "linear"}, "schedule"), ({"steps": 0}, "steps"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio"), ({"head_prefixes": "head"}, "tuple"),
    ({"grad_clip": 0.0}, "grad_clip"),
])
def test_bad_config_is_one_clear_error(bad, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**bad)


class _WithPos(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.proj = nn.Linear(8, 8)

    def no_weight_decay(self):  # timm's convention
        return {"pos_embed"}


def test_param_groups_head_mult_and_no_decay():
    model = nn.Module()
    model.backbone = _WithPos()
    model.norm = nn.LayerNorm(8)
    model.head = nn.Linear(8, 3)
    model.decoder = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    model.frozen = nn.Linear(2, 2).requires_grad_(False)
    cfg = TrainConfig(lr=1e-3, weight_decay=0.05, head_lr_mult=10.0)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert members == {
        "decay": {"backbone.proj.weight"},
        "no_decay": {"backbone.pos_embed", "backbone.proj.bias", "norm.weight", "norm.bias"},
        "head_decay": {"head.weight", "decoder.0.weight"},
        "head_no_decay": {"head.bias", "decoder.0.bias", "decoder.1.weight", "decoder.1.bias"},
    }
    assert [groups[k]["lr"] for k in members] == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])
    assert [groups[k]["weight_decay"] for k in members] == [0.05, 0.0, 0.05, 0.0]

    plain = param_groups(model, replace(cfg, no_decay_norm_bias=False, head_lr_mult=1.0))
    assert [g["name"] for g in plain] == ["decay", "head_decay"]
    assert sum(len(g["params"]) for g in plain) == sum(len(v) for v in members.values())


def test_to_device_recurses_and_keeps_non_tensors():
    Pair = namedtuple("Pair", "a b")
    t = torch.ones(2)
    batch = {"img": t, "meta": [{"name": "x", "box": t}, ("s", 3)], "pair": Pair(t, None)}
    out = to_device(batch, "cpu")
    assert out["img"] is t  # already there: no copy
    assert out["meta"][0]["name"] == "x" and out["meta"][1] == ("s", 3)
    assert isinstance(out["meta"][1], tuple) and isinstance(out["pair"], Pair)
    assert out["pair"].b is None and torch.equal(out["meta"][0]["box"], t)
    class Encoding(UserDict):  # like a tokenizer's BatchEncoding: a Mapping, not a dict
        pass

    assert isinstance(to_device(OrderedDict(a=t), "meta"), OrderedDict)
    enc = to_device(Encoding(ids=t, text="hi"), "meta")
    assert isinstance(enc, Encoding) and enc["ids"].is_meta and enc["text"] == "hi"
    moved = to_device(batch, "meta")
    assert moved["meta"][0]["box"].is_meta and moved["pair"].a.is_meta
    assert moved["meta"][0]["name"] == "x"


# -- the loop -----------------------------------------------------------------------------------

def test_fit_learns_evaluates_and_restores_mode():
    calls = []

    def metric_fn(model, loader):
        assert not torch.is_grad_enabled() and not model.training
        n = correct = 0
        for batch in loader:
            assert batch["x"].device.type == "cpu"
            correct += (model(batch["x"]).argmax(1) == batch["y"]).sum().item()
            n += len(batch["y"])
        return {"acc": correct / n, "n": n, "per_class": torch.tensor([1.0, 2.0])}

    model = toy.toy_model()
    cfg = toy.toy_cfg(steps=60, eval_every=20, lr=3e-2, log_every=5)
    hist = fit(model, toy.ToyData(64), cfg, toy.toy_loss, metric_fn,
               val_data=toy.ToyData(24, seed=1), on_eval=lambda h: calls.append(h.final["acc"]))
    assert model.training
    train_rows = [r for r in hist.rows if "lr" in r]
    eval_rows = [r for r in hist.rows if "lr" not in r]
    assert [r["step"] for r in train_rows] == list(range(5, 61, 5))
    assert [r["step"] for r in eval_rows] == [20, 40, 60] and len(calls) == 3
    assert set(train_rows[0]) == {"step", "lr", "loss", "ce", "acc"}
    assert train_rows[-1]["loss"] < 0.6 * train_rows[0]["loss"]  # it learns
    assert hist.final["acc"] > 0.8 and hist.final["n"] == 24
    assert hist.final["per_class"] == [1.0, 2.0]  # full dict in final, scalars only in rows
    assert "per_class" not in eval_rows[-1]
    fig = hist.plot()
    assert len(fig.axes) == 2 and fig.axes[0].get_lines()


def test_default_eval_is_mean_loss_on_val_data():
    hist = fit(toy.toy_model(), toy.ToyData(40), toy.toy_cfg(steps=6), toy.toy_loss,
               val_data=toy.ToyData(20, seed=1))
    assert set(hist.final) == {"val_loss", "val_ce", "val_acc"}
    hist = fit(toy.toy_model(), toy.ToyData(40), toy.toy_cfg(steps=6), toy.toy_loss)
    assert set(hist.final) == {"train_loss", "train_ce", "train_acc"}


def test_out_dir_gets_checkpoint_csv_and_plot(tmp_path):
    hist = fit(toy.toy_model(), toy.ToyData(40), toy.toy_cfg(out_dir=str(tmp_path)), toy.toy_loss)
    assert sorted(os.listdir(tmp_path)) == ["history.png", "last.pt", "metrics.csv"]
    assert hist.csv_path == str(tmp_path / "metrics.csv")
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,lr,loss,ce,acc,train_loss,train_ce,train_acc"
    assert [int(line.split(",")[0]) for line in lines[1:]] == [3, 6, 9, 12, 15, 18, 20, 20]
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 20 and ck["config"]["out_dir"] == str(tmp_path)
    assert ck["data"] == {"epoch": 4, "batch": 0, "steps_per_epoch": 5, "world_size": 1}


def test_worker_processes_see_the_same_batches():
    def run(workers):
        model = toy.toy_model()
        cfg = toy.toy_cfg(steps=12, num_workers=workers)  # 5 batches per epoch: 3 epochs
        fit(model, toy.ToyData(40, noise=False), cfg, toy.toy_loss)
        return model

    _assert_same_weights(run(0), run(2))


# -- checkpoints and resume -------------------------------------------------------------------

def _uninterrupted(out_dir, **kw):
    model = toy.toy_model()
    hist = fit(model, toy.ToyData(40), toy.toy_cfg(out_dir=str(out_dir), **kw), toy.toy_loss)
    return model, hist


def test_crash_then_resume_gives_the_uninterrupted_weights_and_csv(tmp_path):
    # 5 batches per epoch, checkpoint at 4 and 8: resume lands mid-epoch and between log rows.
    ref, ref_hist = _uninterrupted(tmp_path / "ref", ckpt_every=4)
    calls = []

    def crashing_loss(model, batch):
        calls.append(1)
        if len(calls) == 11:
            raise RuntimeError("boom")
        return toy.toy_loss(model, batch)

    cfg = toy.toy_cfg(out_dir=str(tmp_path / "run"), ckpt_every=4)
    with pytest.raises(RuntimeError, match="boom"):
        fit(toy.toy_model(), toy.ToyData(40), cfg, crashing_loss)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 8
    model = toy.toy_model(seed=99)  # fresh weights: everything must come from the checkpoint
    hist = fit(model, toy.ToyData(40), cfg, toy.toy_loss)
    _assert_same_weights(model, ref)
    assert hist.rows == ref_hist.rows
    assert (tmp_path / "run" / "metrics.csv").read_text() == (
        tmp_path / "ref" / "metrics.csv").read_text()


def test_finished_run_resumed_does_nothing_more(tmp_path):
    ref, ref_hist = _uninterrupted(tmp_path)

    def must_not_run(model, batch):
        raise AssertionError("a finished run trained again")

    model = toy.toy_model(seed=5)
    hist = fit(model, toy.ToyData(40), toy.toy_cfg(out_dir=str(tmp_path)), must_not_run)
    _assert_same_weights(model, ref)
    assert hist.rows == ref_hist.rows and hist.final == ref_hist.final
    with pytest.warns(UserWarning, match=r"other settings \(lr, seed\)"):
        fit(model, toy.ToyData(40), toy.toy_cfg(out_dir=str(tmp_path), lr=0.5, seed=3, log_every=7),
            must_not_run)


def _fit_killed_at(kill_at: int, out_dir) -> None:
    """In a forked child: fit with a loss that SIGKILLs the process at call ``kill_at``."""
    calls = 0

    def killing_loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real crash
        return toy.toy_loss(model, batch)

    fit(toy.toy_model(), toy.ToyData(40), toy.toy_cfg(out_dir=str(out_dir), ckpt_every=5),
        killing_loss)
    os._exit(0)  # not reached when the kill works


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    ref, _ = _uninterrupted(tmp_path / "ref", ckpt_every=5)
    run = tmp_path / "run"
    # forked: the same thread count and imports as this process, no second start-up of torch
    proc = multiprocessing.get_context("fork").Process(target=_fit_killed_at, args=(13, run))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL, proc.exitcode
    assert load_checkpoint(run / "last.pt")["step"] == 10
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]
    model = toy.toy_model(seed=7)
    fit(model, toy.ToyData(40), toy.toy_cfg(out_dir=str(run), ckpt_every=5), toy.toy_loss)
    _assert_same_weights(model, ref)
    assert (run / "metrics.csv").read_text() == (tmp_path / "ref" / "metrics.csv").read_text()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_a_dict"])
def test_corrupt_checkpoint_is_one_clear_error(tmp_path, damage):
    _uninterrupted(tmp_path)
    path = tmp_path / "last.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        torch.save([1, 2], path)
    cfg = toy.toy_cfg(out_dir=str(tmp_path))
    with pytest.raises(CheckpointError) as err:
        fit(toy.toy_model(), toy.ToyData(40), cfg, toy.toy_loss)
    msg = str(err.value)
    assert str(path) in msg and "resume=False" in msg and "\n" not in msg
    fit(toy.toy_model(), toy.ToyData(40), replace(cfg, resume=False), toy.toy_loss)  # way out
    assert load_checkpoint(path)["step"] == 20


def test_checkpoint_of_another_model_is_one_clear_error(tmp_path):
    _uninterrupted(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        fit(nn.Linear(toy.IN, toy.CLASSES), toy.ToyData(40), toy.toy_cfg(out_dir=str(tmp_path)),
            lambda m, b: {"loss": m(b["x"]).logsumexp(1).mean()})


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.arange(3)}, path)
    good = path.read_bytes()

    def dies_midway(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


# -- clear errors -------------------------------------------------------------------------------

def _fit_with(loss_fn=toy.toy_loss, data=None, **kw):
    return fit(toy.toy_model(), toy.ToyData(40) if data is None else data, toy.toy_cfg(**kw),
               loss_fn)


def test_loss_fn_must_return_a_dict_with_loss():
    with pytest.raises(TypeError, match="dict with the total .* under 'loss'"):
        _fit_with(lambda m, b: toy.toy_loss(m, b)["loss"])
    with pytest.raises(TypeError, match=r"returned a dict with keys \['ce'\]"):
        _fit_with(lambda m, b: {"ce": toy.toy_loss(m, b)["loss"]})
    with pytest.raises(ValueError, match="does not require grad"):
        _fit_with(lambda m, b: {"loss": toy.toy_loss(m, b)["loss"].detach()})


def test_non_finite_loss_names_the_step_and_the_lr():
    calls = []

    def blows_up(model, batch):
        calls.append(1)
        out = toy.toy_loss(model, batch)
        return {"loss": out["loss"] * (math.inf if len(calls) == 4 else 1.0)}

    with pytest.raises(FloatingPointError, match=r"loss is inf at step 4: .*lower the learning"):
        _fit_with(blows_up)


def test_data_errors():
    with pytest.raises(ValueError, match="data is empty"):
        _fit_with(data=toy.ToyData(0))
    with pytest.raises(ValueError, match="batch_size=8 is larger than the 5 training samples"):
        _fit_with(data=toy.ToyData(5))
    with pytest.raises(TypeError, match="map-style Dataset"):
        _fit_with(data=iter([1, 2]))


def test_history_without_csv_and_plot_on_given_axes():
    import matplotlib.figure

    h = History()
    h.append({"step": 1, "lr": 0.1, "loss": 2.0})
    h.append({"step": 1, "mIoU": 0.5})
    ax = matplotlib.figure.Figure().subplots()
    assert h.plot(ax) is ax.figure and h.csv_path is None


# -- DDP --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_ddp_toy.py"), str(tmp_path)]
    # Its own session: on a timeout the workers go too, not only torchrun (no orphans left).
    proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun did not end in 300 s:\n" + stdout[-3000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{k} differs between ranks"
    assert not torch.equal(r0["state"]["head.weight"], toy.toy_model(0).head.weight.detach())
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["step"] == 12 and ck["data"]["world_size"] == 2 and len(ck["rng"]) == 2
    assert sorted(os.listdir(tmp_path / "run")) == ["history.png", "last.pt", "metrics.csv"]
    assert torch.equal(ck["model"]["head.weight"], r0["state"]["head.weight"])
    # Evaluation ran on both ranks, each over its shard (8 + 7 of the 15 val samples), and the
    # metric came back reduced: both ranks hold the whole set's, which one process reproduces.
    assert r0["final"] == r1["final"] and r0["final"]["n"] == 15
    assert [r for r in r0["rows"] if "lr" not in r] == [r for r in r1["rows"] if "lr" not in r]
    model = toy.toy_model(unused=True)
    model.load_state_dict(r0["state"])
    with num_threads(1):
        one = evaluate(model, toy.toy_val(), toy.toy_cfg(), toy.toy_loss, toy.toy_metric)
    assert one == r0["final"]
    eval_rows = [r["step"] for r in r0["rows"] if "lr" not in r]
    assert eval_rows == [6, 12] and ck["log"]["final"] == r0["final"]
    # without a metric_fn: the mean loss terms, summed over both ranks' batches
    assert r0["loss_eval"] == r1["loss_eval"] and set(r0["loss_eval"]) == {
        "val_loss", "val_ce", "val_acc"}
    # run_chapter under torchrun: the untrained baseline too is evaluated in the process group,
    # each rank over its shard (8 + 7), and reduced to the whole set's on both ranks.
    c0, c1 = r0["chapter"], r1["chapter"]
    assert c0["counts"][0] + c1["counts"][0] == 15 and c0["counts"][0] in (7, 8)
    assert c0["baseline"] == c1["baseline"] and c0["baseline"]["n"] == 15
    assert c0["final"] == c1["final"] and not c0["group_left"] and not c1["group_left"]
    assert c0["again"] == [c0["baseline"], c0["final"]], "a second run_chapter, a second group"


def test_history_plot_is_a_figure_pyplot_shows_and_fit_adds_none(tmp_path):
    """plt.show() (and a notebook cell's end) draws only figures pyplot knows; fit's own
    history.png must not leave one behind in a notebook cell."""
    import matplotlib.pyplot as plt

    plt.close("all")
    hist = fit(toy.toy_model(), toy.ToyData(40), toy.toy_cfg(steps=4, eval_every=2,
                                                            out_dir=str(tmp_path)), toy.toy_loss)
    assert plt.get_fignums() == [] and (tmp_path / "history.png").exists()
    fig = hist.plot()
    assert plt.get_fignums() == [fig.number]
    plt.close(fig)


def test_seed_everything_and_num_threads_restore():
    from vitseg_lab.train import num_threads, seed_everything

    seed_everything(3)
    a = torch.rand(2)
    seed_everything(3)
    assert torch.equal(a, torch.rand(2))
    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
