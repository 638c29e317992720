"""The pins in environment.yml are the pins in pyproject.toml; the notebooks are built from src."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_environment_yml_mirrors_pyproject_pins():
    pp = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(pp["dependencies"]) | set(pp["optional-dependencies"]["dev"])
    env = set(re.findall(r"^\s+- ([A-Za-z0-9_.\-]+==[^\s]+)$", (ROOT / "environment.yml").read_text(), re.MULTILINE))
    assert env == pins


def test_notebooks_are_up_to_date_with_sources():
    from tools import nbbuild

    assert nbbuild.main(["--check"]) == 0


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_cli_maps_flags_onto_config():
    from vitseg_lab import cli

    args = cli.build_parser(["train", "attention", "--scale", "smoke", "--embed_dim", "48",
                             "--train.steps", "3", "--colors", "red,blue"]).parse_args(
        ["train", "attention", "--scale", "smoke", "--embed_dim", "48", "--train.steps", "3",
         "--colors", "red,blue"])
    _, cfg = cli._config(args)
    assert cfg.embed_dim == 48 and cfg.train.steps == 3 and cfg.colors == ("red", "blue")
    assert cfg.train.batch_size == 16          # untouched fields keep the smoke preset


def test_every_solution_cell_closes_its_region():
    import nbformat

    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("solution"):
                assert cell.source.count("### BEGIN SOLUTION") == 1, (nb_path.name, meta)
                assert cell.source.count("### END SOLUTION") == 1, (nb_path.name, meta)
                assert cell.source.rstrip().endswith("### END SOLUTION"), (nb_path.name, meta)
