"""vitseg_lab.cli: chapters from the registry, `train` exits non-zero with every missing piece,
`eval --ckpt` rebuilds a trained model and prints its metric, config flags reach the config."""

from __future__ import annotations

import argparse

import pytest
import torch

from vitseg_lab import chapters, cli


def test_cli_chapters_are_the_registry():
    assert cli.CHAPTERS is chapters.CHAPTERS
    train = cli.build_parser(["train", "segvit"])
    for slug in chapters.CHAPTERS:
        assert train.parse_args(["train", slug]).chapter == slug


def test_config_flags_reach_the_config():
    args = cli.build_parser(["train", "segvit"]).parse_args(
        ["train", "segvit", "--train.lr", "1e-3", "--out_layers", "1,3", "--scale", "smoke"])
    _, cfg = cli._config(args)
    assert cfg.train.lr == 1e-3 and cfg.out_layers == (1, 3) and cfg.train.steps <= 5


@pytest.mark.parametrize("slug", ["attention", "segvit"])
def test_train_full_without_its_pieces_exits_2_listing_every_one(slug, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mod = chapters.get(slug).load_module()
    monkeypatch.setattr(mod, "run", lambda cfg: pytest.fail("run() must not start"))
    assert cli.main(["train", slug, "--scale", "full"]) == cli.EXIT_MISSING
    err = capsys.readouterr().err
    assert err.strip() == mod.full_scale_check(mod.AttentionConfig.full() if slug == "attention"
                                               else mod.SegViTConfig.full())
    assert "- a CUDA GPU" in err and "Traceback" not in err


def test_train_then_eval_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "segvit", "--scale", "smoke", "--train.out_dir", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "mIoU = " in printed and str(out / "last.pt") in printed
    assert cli.main(["eval", "segvit", "--ckpt", str(out / "last.pt")]) == 0
    metrics = eval(capsys.readouterr().out.strip().splitlines()[-1])   # the printed dict
    assert set(metrics) >= {"mIoU", "pixel_acc"} and 0.0 <= metrics["mIoU"] <= 1.0
    ck = torch.load(out / "last.pt", weights_only=True)
    assert metrics["mIoU"] == pytest.approx(ck["log"]["final"]["mIoU"], abs=1e-4)


def test_eval_takes_how_to_evaluate_flags_only(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(["train", "segvit", "--scale", "smoke", "--train.out_dir", str(out)]) == 0
    seg = chapters.get("segvit").load_module()
    seen = []
    real = seg.metric_fn
    monkeypatch.setattr(seg, "metric_fn",
                        lambda m, loader: (seen.append(m.cfg), real(m, loader))[1])
    capsys.readouterr()
    assert cli.main(["eval", "segvit", "--ckpt", str(out / "last.pt"), "--test_ratios", "0.5,1",
                     "--test_flip", "true", "--train.batch_size", "3"]) == 0
    cfg = seen[0]
    assert (cfg.test_ratios, cfg.test_flip, cfg.train.batch_size) == ((0.5, 1.0), True, 3)
    assert "mIoU" in capsys.readouterr().out
    for flag in ("--train.lr", "--embed_dim", "--train.steps"):  # what the model is: refused
        with pytest.raises(SystemExit):
            cli.main(["eval", "segvit", "--ckpt", str(out / "last.pt"), flag, "1"])
    assert cli.eval_field("test_flip") and cli.eval_field("train.device")
    assert not cli.eval_field("train.eval_every") and not cli.eval_field("embed_dim")


def test_eval_names_a_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        cli.main(["eval", "segvit", "--ckpt", str(tmp_path / "nope.pt")])
    out = tmp_path / "att"
    assert cli.main(["train", "attention", "--scale", "smoke", "--train.out_dir", str(out)]) == 0
    with pytest.raises(SystemExit, match="chapter 'attention'"):
        cli.main(["eval", "segvit", "--ckpt", str(out / "last.pt")])


def test_field_types_nested_fixed_and_union():
    nested = cli._field_type(tuple[tuple[int, ...], ...])
    assert nested("12,16;24;40") == ((12, 16), (24,), (40,))
    assert nested("((12, 16), (24,), (40,))") == ((12, 16), (24,), (40,))
    fixed = cli._field_type(tuple[float, float, float])
    assert fixed("0.5, 0.25,1") == (0.5, 0.25, 1.0)
    with pytest.raises(argparse.ArgumentTypeError, match="takes 3 values, got 2"):
        fixed("0.5,0.25")
    assert cli._field_type(tuple[int, ...] | None)("5,7,11") == (5, 7, 11)
    assert cli._field_type(tuple[str, ...])("") == ()
    either = cli._field_type(bool | str)
    assert either("false") is False and either("norm") == "norm"
    assert cli._field_type(dict) is None


def test_nested_tuple_flag_reaches_the_config():
    p = cli.build_parser(["train", "zeroshot"])
    args = p.parse_args(["train", "zeroshot", "--anchor_sizes", "12,16;24;40", "--scale", "smoke"])
    _, cfg = cli._config(args)
    assert cfg.anchor_sizes == ((12, 16), (24,), (40,))
    with pytest.raises(SystemExit):  # argparse: "invalid tuple[...] value", exit 2
        p.parse_args(["train", "zeroshot", "--anchor_sizes", "12,x"])
    from vitseg_lab import cluster

    cfg = cluster.configure("zeroshot", "smoke", {"anchor_sizes": [[12, 16], [24]]})
    assert cfg.anchor_sizes == ((12, 16), (24,))


def test_train_reports_on_rank_0_only(monkeypatch, capsys):
    from types import SimpleNamespace

    mod = chapters.get("segvit").load_module()
    done = SimpleNamespace(skipped=None, summary=lambda: "SUMMARY", metrics={"mIoU": 0.5},
                           checkpoint=None)
    monkeypatch.setattr(mod, "run", lambda cfg: done)
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "segvit", "--scale", "smoke"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "segvit", "--scale", "smoke"]) == 0
    assert "SUMMARY" in capsys.readouterr().out
