"""benchmarks/bench_train_step.py and benchmarks/run_all.py at the smallest size on CPU.

No timing is asserted (timings belong in benchmarks/): these tests check that the scripts run,
that every ratio they report is a finite positive number, that the FLOP counter sees the
attention matmuls, and that absent chapters are skipped with a message.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bts = _load("bench_train_step")


def test_flop_count_sees_every_attention_matmul():
    from vitseg_lab.backbone import quick_vit

    torch.manual_seed(0)
    # N = 5*7 patches + CLS = 36 tokens, C = 24, 2 blocks, B = 3
    vit = quick_vit(img_size=40, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=4)
    bts.fastpath.set_sdpa(vit, False)
    x = torch.rand(3, 3, 40, 56)

    def step(backward=True):
        y = vit(x).sum()
        if backward:
            y.backward()

    fl = bts.count_flops(step, vit)
    assert fl["attention"] == 3 * 4 * 3 * 36 * 36 * 24 * 2  # fwd QKᵀ, PV; bwd twice each
    assert bts.expected_attention_flops(vit, x) == fl["attention"]
    assert fl["total"] > fl["attention"] > 0


def test_bench_train_step_smallest_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = bts.main(["--device", "cpu", "--size", "tiny", "--chapters", "segvit,not_a_chapter",
                    "--steps", "1", "--warmup", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["device"].startswith("CPU")
    rows = {r["chapter"]: r for r in res["rows"]}
    assert "not in the registry" in rows["not_a_chapter"]["skipped"]
    seg = rows["segvit"]
    for key in ("fast_vs_eager", "flops_per_s_vs_timm", "timm_fast_vs_eager", "loader_vs_step",
                "e2e_vs_model_only", "gflops_per_step", "attention_share"):
        assert math.isfinite(seg[key]) and seg[key] > 0, key
    assert seg["threads"] == 1                     # the chapter's quick-scale thread count
    assert "mfu_model_only" not in seg and res["peak_flops"] is None
    assert "MFU: n/a" in printed and "not_a_chapter: skipped" in printed


@pytest.mark.parametrize("name", ["H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])
def test_mfu_uses_the_named_peak(name):
    label, peak = bts.fastpath.device_peak(name)
    assert label.startswith("NVIDIA") and peak > 1e14


ra = _load("run_all")


def test_ratios_are_found_anywhere_with_their_case():
    doc = {"device": "cpu", "ratio_per_class_head": 24.2, "vectorised_ms": 6.4,
           "rows": [{"chapter": "segvit", "fast_vs_eager": 1.3, "eager_img_s": 15.0},
                    {"chapter": "afa", "skipped": "absent"},
                    {"config": "quick", "nested": {"speedup": 3.0, "bad_vs_x": float("nan")}}]}
    assert ra.ratios(doc) == [("", "ratio_per_class_head", 24.2),
                              ("segvit", "fast_vs_eager", 1.3),
                              ("quick", "speedup", 3.0)]
    assert ra.goal("ratio_per_class_head") == ">= 20"
    assert ra.goal("flops_per_s_vs_timm").startswith(">= 0.9") and ra.goal("fast_vs_eager") == ""


def test_run_all_collects_json_and_reports_failures(tmp_path, capsys):
    bench, results = tmp_path / "benchmarks", tmp_path / "results"
    bench.mkdir()
    (bench / "good.py").write_text(
        "import argparse, json\n"
        "ap = argparse.ArgumentParser(); ap.add_argument(\"--json\")\n"
        "a = ap.parse_args()\n"
        "open(a.json, 'w').write(json.dumps({'rows': [{'case': 'x', 'ratio_loop': 25.0}]}))\n")
    (bench / "bad.py").write_text("raise SystemExit('broken on purpose')\n")
    (bench / "run_all.py").write_text("raise SystemExit('never run')\n")
    summary = ra.main(["--bench-dir", str(bench), "--results", str(results), "--no-course"])
    out = capsys.readouterr().out
    assert summary["failed"] == ["bad"]
    assert summary["ratios"] == [{"benchmark": "good", "case": "x", "ratio": "ratio_loop",
                                  "value": 25.0, "goal": ">= 20"}]
    assert "good x" in out and "failed: bad" in out
    assert (results / "summary.json").exists() and (results / "summary.png").exists()
    with pytest.raises(SystemExit, match="no benchmark called nope"):
        ra.main(["--bench-dir", str(bench), "--results", str(results), "--only", "nope"])


def test_paper_size_setup_without_data_falls_back_to_shapes_at_the_crop():
    s = bts.chapter_setup("segvit", "paper", batch=2)
    cfg = s["cfg"]
    # the paper's ViT-B row: crop 512 (METHODS §1.6)
    assert (cfg.embed_dim, cfg.depth, cfg.img_size, cfg.pretrained) == (768, 12, 512, False)
    assert s["num_classes"] == 150 and s["B"] == 2
    if "absent" in s["note"]:                       # no ADE20K on this machine
        assert s["data"][0][0]["image"].shape == (3, 512, 512)


def test_a_failing_chapter_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def bench_chapter(slug, a, device, peak):
        if slug == "segvit":
            raise RuntimeError("CUDA out of memory (pretend)")
        return {"chapter": slug, "skipped": "pretend"}

    monkeypatch.setattr(bts, "bench_chapter", bench_chapter)
    res = bts.main(["--device", "cpu", "--chapters", "segvit,attention", "--json",
                    str(tmp_path / "b.json")])
    rows = {r["chapter"]: r for r in res["rows"]}
    assert rows["segvit"]["error"].startswith("RuntimeError: CUDA out of memory")
    assert rows["attention"]["skipped"] == "pretend"
    assert "segvit: FAILED" in capsys.readouterr().out
