"""Every chapter's own metric, reduced across 2 gloo processes, equals the one-process metric.

Under DDP, ``train.evaluate`` (what ``fit`` calls) gives each rank its shard of the eval set
(``metrics.shard``: items rank, rank + 2, ...; an odd split, so the shards are uneven) and runs
the chapter's ``metric_fn`` inside ``metrics.sharded_eval``. One spawned pair of processes
evaluates all six chapters' smoke models (untrained, seeded) on their smoke eval sets; this
process evaluates the same models on the whole sets, and on one shard alone (which must differ:
otherwise the comparison could not fail). Equality is exact: the chapters reduce sufficient
statistics (integer confusion matrices and counts) or gather per-item results back into the
data set's order.

The two workers are forked from this process after it has imported every chapter (no second
start-up of torch and timm): the whole test costs about two evaluations of each smoke set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch

from vitseg_lab import chapters, metrics
from vitseg_lab.train import evaluate, num_threads

CHAPTERS = ("attention", "tokens", "segvit", "afa", "restr", "zeroshot")


def _chapter(slug: str):
    """(module, model, val set, collate, TrainConfig) of ``slug``'s smoke run, one eval image
    fewer (an odd count: uneven shards)."""
    mod = chapters.get(slug).load_module()
    cfg = chapters.get(slug).config_class().smoke()
    cfg = dataclasses.replace(cfg, num_val=cfg.num_val - 1)
    train_ds, val = mod.quick_data(cfg)
    torch.manual_seed(0)
    if slug == "zeroshot":
        model = mod.build(cfg, train_ds.num_classes, train_ds.class_vectors(),
                          train_ds.seen_class_ids)
    else:
        model = mod.build(cfg, 1 if slug == "restr" else train_ds.num_classes)
    return mod, model, val, train_ds.collate, cfg.train


def _eval(slug: str, dataset=None) -> dict:
    mod, model, val, collate, tcfg = _chapter(slug)
    return evaluate(model, val if dataset is None else dataset(val), tcfg, mod.loss_fn,
                    mod.metric_fn, collate, torch.device("cpu"))


def _worker(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: every chapter's sharded evaluation -> ``out/rank{rank}.json``."""
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2, timeout=timedelta(seconds=120))
        res = {}
        for slug in CHAPTERS:
            _, _, val, _, _ = _chapter(slug)
            res[slug] = {"n": len(metrics.shard(val)), "total": len(val), "metrics": _eval(slug)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, then exit
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)  # a forked pytest: skip its atexit handlers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b) -> bool:
    """Equal, with NaN == NaN (a class absent from the split has no IoU)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.mark.slow
def test_every_chapters_metric_reduced_over_two_gloo_ranks_equals_one_process(tmp_path):
    # the one-process references first, on 1 thread as the workers (the same kernels); this
    # also imports every chapter, so the forked workers start without importing anything
    with num_threads(1):
        full = {slug: _eval(slug) for slug in CHAPTERS}
        alone = {slug: _eval(slug, lambda v: metrics.shard(v, 0, 2)) for slug in CHAPTERS}
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, str(tmp_path))) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for k, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        err = tmp_path / f"rank{k}.err"
        assert p.exitcode == 0, err.read_text() if err.exists() else f"rank {k}: {p.exitcode}"
    r = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    wrong = []
    for slug in CHAPTERS:
        total = r[0][slug]["total"]
        assert total % 2 == 1 and (r[0][slug]["n"], r[1][slug]["n"]) == (total // 2 + 1,
                                                                           total // 2), slug
        # JSON turns tuples into lists: compare both sides after the same round trip
        want = json.loads(json.dumps(full[slug]))
        assert not _same(json.loads(json.dumps(alone[slug])), want), \
            f"{slug}: one shard alone scores like the whole set; the test could not fail"
        for k in (0, 1):
            got = r[k][slug]["metrics"]
            bad = [m for m in want if not _same(got.get(m), want[m])]
            if bad:
                wrong.append(f"{slug} rank {k}: {[(m, got.get(m), want[m]) for m in bad][:3]}")
    assert not wrong, "\n".join(wrong)


def test_shard_gather_and_sum_are_no_ops_in_one_process():
    sub = metrics.shard(list(range(7)), rank=1, world=3)
    assert list(sub) == [1, 4] and len(sub) == 2
    t = torch.arange(3)
    assert metrics.gather_over_ranks(t) is t and metrics.sum_over_ranks(t) is t
    assert metrics.sum_over_ranks((2, 3)) == (2, 3) and metrics.eval_world() == (0, 1)

    class Data(list):
        collate = staticmethod(list)
        unseen_class_ids = (4, 5)

    s = metrics.shard(Data(range(5)), 0, 2)
    assert s.unseen_class_ids == (4, 5) and s.collate is Data.collate and list(s) == [0, 2, 4]
    with pytest.raises(RuntimeError, match="initialised torch.distributed"), \
            metrics.sharded_eval(0, 2):
        pass


