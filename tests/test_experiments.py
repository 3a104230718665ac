"""Experiments: declared grids run (and resume) through the CLI, then aggregate into CSV/Markdown/LaTeX and figures."""

import csv
import json

import numpy as np
import pytest
import yaml

from framework.errors import FrameworkError
from framework.experiments import EXPERIMENTS_DIR, load_experiment, mean_ci, reproduce


def test_mean_ci_brackets_the_mean_and_collapses_for_constant_values():
    values = np.random.default_rng(0).normal(1.0, 0.5, size=40)
    mean, low, high = mean_ci(values)
    assert mean == pytest.approx(values.mean()) and low < mean < high
    assert mean_ci(np.full(5, 2.0)) == (2.0, 2.0, 2.0)


def test_shipped_experiments_are_valid():
    names = {p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")}
    assert {"mechanism", "compute_matched", "win_rate", "pareto"} <= names
    for name in names:
        spec = load_experiment(EXPERIMENTS_DIR / f"{name}.yaml")
        assert {"testbed", "paper"} <= set(spec["scales"]) and spec["runs"]


def test_reproduce_runs_missing_runs_aggregates_and_reuses_finished_ones(tmp_path):
    spec = {"title": "smoke", "kind": "curve", "metrics": ["reward", "drift_rmse"],
            "scales": {"tiny": ["model=tiny_sd", "model.resolution=32", "method.num_steps=3", "prompts=inline",
                                "prompts.prompts=[a cat,a dog]", "logger=none"]},
            "runs": {"Base": ["method=base"], "DNO γ=0": ["method=dno", "method.opt_steps=2"]}}
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    out = tmp_path / "out"
    written = reproduce("smoke", "tiny", out, experiments_dir=tmp_path)
    assert [p.suffix for p in written] == [".csv", ".md", ".tex", ".png"] and all(p.stat().st_size for p in written)
    with open(written[0]) as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    dno_dir = out / "runs" / "tiny" / "smoke" / "DNO_gamma_0"
    finals = [json.loads(p.read_text())["final_reward"] for p in dno_dir.glob("items/*/record.json")]
    assert float(rows["DNO γ=0"]["reward_mean"]) == pytest.approx(np.mean(finals), rel=1e-5)
    assert float(rows["DNO γ=0"]["reward_low"]) <= float(rows["DNO γ=0"]["reward_mean"]) <= float(rows["DNO γ=0"]["reward_high"])
    assert float(rows["Base"]["drift_rmse_mean"]) == 0
    assert "| DNO γ=0 | 2 |" in written[1].read_text() and r"$\pm$" in written[2].read_text()

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/record.json")}
    reproduce("smoke", "tiny", out, experiments_dir=tmp_path)  # finished runs are reused, not rerun
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/**/record.json")} == mtimes
    with pytest.raises(FrameworkError, match="has no scale 'paper'"):
        reproduce("smoke", "paper", out, experiments_dir=tmp_path)


def test_win_rate_run_level_metrics_and_runs_that_use_an_earlier_run(tmp_path):
    """A pareto experiment: a DRaFT run, then LoRA scaling on its adapter ({run:...}); win rate against a run."""
    spec = {"title": "pareto smoke", "kind": "pareto", "versus": "DRaFT",
            "metrics": ["reward", "win_rate", "sets.final_diversity_vendi"],
            "pareto": {"x": "sets.final_diversity_vendi", "y": "reward"},
            "scales": {"tiny": ["model=tiny_sd", "model.resolution=32", "method.num_steps=3", "prompts=inline",
                                "prompts.prompts=[a cat]", "samples_per_prompt=2", "eval.features=clip",
                                "eval.clip=tiny", "logger=none"]},
            "runs": {"DRaFT": ["method=draft", "method.train_steps=2", "method.save_every=2", "method.sample_every=0",
                               "method.train_batch_size=1", "method.lora_rank=4", "method.lr=0.05"],
                     "LoRA half": ["method=lora_scale", "method.adapter={run:DRaFT}/adapter", "method.alpha=0.5"]}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    written = reproduce("p", "tiny", tmp_path / "out", experiments_dir=tmp_path)
    assert written[-1].suffix == ".png" and written[-1].stat().st_size > 0
    with open(written[0]) as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert float(rows["DRaFT"]["win_rate_mean"]) == 0.5  # against itself
    assert 0 <= float(rows["LoRA half"]["win_rate_low"]) <= float(rows["LoRA half"]["win_rate_high"]) <= 1
    summary = json.loads((tmp_path / "out" / "runs" / "tiny" / "p" / "LoRA_half" / "summary.json").read_text())
    assert float(rows["LoRA half"]["sets.final_diversity_vendi_mean"]) == pytest.approx(
        summary["sets"]["final_diversity_vendi"], rel=1e-5)
    assert rows["LoRA half"]["sets.final_diversity_vendi_low"] == "nan"
