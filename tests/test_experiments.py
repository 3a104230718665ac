"""Experiments: declared grids run (and resume) through the CLI, then aggregate into CSV/Markdown/LaTeX and figures;
Hydra multirun sweeps with their aggregated table; the paper scale's weight check."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, call_main, launch_in_process, run_cli, wait_for

from framework.analysis.experiments import Run, prepare, reproduce, reproduce_all, slug
from framework.analysis.launch import run_missing
from framework.analysis.report import step_curve
from framework.analysis.specs import EXPERIMENTS_DIR, load_experiment
from framework.analysis.statistics import mean_ci
from framework.core.errors import STOPPED, FrameworkError, Interrupted
from framework.core.records import read_records


def read_csv(path):
    with open(path) as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def record_mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.glob("runs/**/record.json")}


def test_mean_ci_brackets_the_mean_and_collapses_for_constant_values():
    values = np.random.default_rng(0).normal(1.0, 0.5, size=40)
    mean, low, high = mean_ci(values)
    assert mean == pytest.approx(values.mean()) and low < mean < high
    assert mean_ci(np.full(5, 2.0)) == (2.0, 2.0, 2.0)


def test_shipped_experiments_are_valid(tmp_path):
    names = {p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")}
    assert {"mechanism", "compute_matched", "win_rate", "pareto", "overoptimisation", "monitor"} <= names
    claimed = {}
    for name in names:
        spec = load_experiment(EXPERIMENTS_DIR / f"{name}.yaml")
        # every experiment at both scales, but over-optimisation and the monitor's: gold exists on the testbed only
        expected = {"testbed"} if spec["kind"] in ("overoptimisation", "monitor") else {"testbed", "paper"}
        assert expected <= set(spec["scales"]) and spec["runs"]
        assert prepare(name, "testbed", tmp_path, EXPERIMENTS_DIR, claimed)[1]  # every run composes and is valid


def test_reproduce_runs_missing_runs_aggregates_and_reuses_finished_ones(tmp_path):
    spec = {
        "title": "smoke",
        "kind": "curve",
        "metrics": ["reward", "drift_rmse"],
        "scales": {
            "tiny": [
                "model=tiny_sd",
                "model.resolution=32",
                "method.num_steps=3",
                "prompts=inline",
                "prompts.prompts=[a cat,a dog]",
                "logger=none",
            ]
        },
        "runs": {"Base": ["method=base"], "DNO γ=0": ["method=dno", "method.opt_steps=2"]},
    }
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    out = tmp_path / "out"
    written = reproduce("smoke", "tiny", out, experiments_dir=tmp_path, launch=launch_in_process)
    assert [p.name for p in written] == ["smoke.csv", "smoke.md", "smoke.tex", "smoke_curves.csv", "smoke.png"]
    assert all(p.stat().st_size for p in written)
    rows = read_csv(written[0])
    [dno_dir] = (out / "runs" / "tiny").glob("DNO_gamma_0-*")
    finals = [json.loads(p.read_text())["final_reward"] for p in dno_dir.glob("items/*/record.json")]
    # Tables write numbers that read back as the same floats (repr): the mean of the same float64 values, summed in
    # another order at most.
    assert float(rows["DNO γ=0"]["reward_mean"]) == pytest.approx(np.mean(finals), rel=1e-12)
    dno = rows["DNO γ=0"]
    assert float(dno["reward_low"]) <= float(dno["reward_mean"]) <= float(dno["reward_high"])
    assert float(rows["Base"]["drift_rmse_mean"]) == 0
    assert "| DNO γ=0 | 2 |" in written[1].read_text() and r"$\pm$" in written[2].read_text()

    with open(written[3]) as f:  # the figure's data: the mean per optimisation step of each run
        curve = [r for r in csv.DictReader(f) if r["run"] == "DNO γ=0"]
    expected = step_curve(dno_dir, [0, 1, 2], ["reward"])
    assert [float(r["reward"]) for r in curve] == [e["reward"] for e in expected]  # the same floats, read back

    mtimes = record_mtimes(out)
    reproduce("smoke", "tiny", out, experiments_dir=tmp_path, launch=launch_in_process)
    assert record_mtimes(out) == mtimes  # finished runs are reused, not rerun
    # The same runs as a trade-off figure: reward against drift along DNO's trajectory; Base is one point.
    trade = spec | {"kind": "tradeoff", "tradeoff": {"y": "reward", "x": ["drift_rmse"]}}
    (tmp_path / "trade.yaml").write_text(yaml.safe_dump(trade, allow_unicode=True))
    written = reproduce("trade", "tiny", out, experiments_dir=tmp_path, launch=launch_in_process)
    assert [p.name for p in written][-2:] == ["trade_trajectories.csv", "trade.png"] and record_mtimes(out) == mtimes
    with open(written[-2]) as f:
        trajectory = list(csv.DictReader(f))
    assert {r["run"] for r in trajectory} == {"DNO γ=0"} and [int(r["step"]) for r in trajectory] == [0, 1]
    expected = step_curve(dno_dir, [0, 1], ["reward", "drift_rmse"])
    assert [float(r["drift_rmse"]) for r in trajectory] == [e["drift_rmse"] for e in expected]
    # Killed mid-run: one item and the summary never written. The rerun finishes that item only, none duplicated.
    (dno_dir / "items" / "p0001_s000" / "record.json").unlink()
    (dno_dir / "summary.json").unlink()
    reproduce("smoke", "tiny", out, experiments_dir=tmp_path, launch=launch_in_process)
    after = record_mtimes(out)
    assert {p: t for p, t in after.items() if "p0001_s000" not in str(p) or "DNO" not in str(p)} == {
        p: t for p, t in mtimes.items() if "p0001_s000" not in str(p) or "DNO" not in str(p)
    }
    assert json.loads((dno_dir / "summary.json").read_text())["num_ok"] == 2 and len(list(dno_dir.glob("items/*"))) == 2
    with pytest.raises(FrameworkError, match="has no scale 'paper'"):
        reproduce("smoke", "paper", out, experiments_dir=tmp_path, launch=launch_in_process)


def test_win_rate_run_level_metrics_and_runs_that_use_an_earlier_run(tmp_path):
    """A pareto experiment: a DRaFT run, then LoRA scaling on its adapter ({run:...}); win rate against a run."""
    spec = {
        "title": "pareto smoke",
        "kind": "pareto",
        "versus": "DRaFT",
        "metrics": ["reward", "win_rate", "sets.final_diversity_vendi"],
        "pareto": {"x": "sets.final_diversity_vendi", "y": "reward"},
        "scales": {
            "tiny": [
                "model=tiny_sd",
                "model.resolution=32",
                "method.num_steps=3",
                "prompts=inline",
                "prompts.prompts=[a cat]",
                "samples_per_prompt=2",
                "eval.features=clip",
                "eval.clip=tiny",
                "eval.cmmd_clip=tiny",
                "logger=none",
            ]
        },
        "runs": {
            "DRaFT": [
                "method=draft",
                "method.train_steps=2",
                "method.save_every=2",
                "method.sample_every=0",
                "method.train_batch_size=1",
                "method.lora_rank=4",
                "method.lr=0.05",
            ],
            "LoRA half": ["method=lora_scale", "method.adapter={run:DRaFT}/adapter", "method.alpha=0.5"],
        },
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    written = reproduce("p", "tiny", tmp_path / "out", experiments_dir=tmp_path, launch=launch_in_process)
    assert written[-1].suffix == ".png" and written[-1].stat().st_size > 0
    rows = read_csv(written[0])
    assert float(rows["DRaFT"]["win_rate:reward_mean"]) == 0.5  # against itself
    assert 0 <= float(rows["LoRA half"]["win_rate:reward_low"]) <= float(rows["LoRA half"]["win_rate:reward_high"]) <= 1
    [lora_dir] = (tmp_path / "out" / "runs" / "tiny").glob("LoRA_half-*")
    summary = json.loads((lora_dir / "summary.json").read_text())
    assert float(rows["LoRA half"]["sets.final_diversity_vendi_mean"]) == summary["sets"]["final_diversity_vendi"]
    assert rows["LoRA half"]["sets.final_diversity_vendi_low"] == "nan"


TESTBED = [
    "model=shapes",
    "prompts=shapes",
    "prompts.limit=2",
    "method.num_steps=3",
    "method.opt_steps=2",
    "method.lr=0.05",
    "logger=none",
]


def test_grid_experiment_cells_equal_the_run_summaries_and_identical_runs_are_shared(tmp_path):
    """2 methods × 2 β on the testbed: every cell equals its run's summary.json. A second experiment in the same call
    declaring one identical run (same composed config, other override order) shares its directory: it runs once."""
    spec = {
        "title": "grid",
        "kind": "table",
        "metrics": ["reward", "adherence", "drift_rmse", "win_rate"],
        "versus": "MIRA",
        "judges": ["reward", "judge_log_prob", "eval_hps"],
        "scales": {"testbed": TESTBED},
        "grid": {"testbed": {"beta": {"β=0.01": ["method.beta=0.01"], "β=1": ["method.beta=1"]}}},
        "runs": {"MIRA": ["method=mira"], "MIRA-DPO": ["method=mira_dpo", "reward=jpeg"]},
    }
    other = {
        "title": "other",
        "kind": "table",
        "metrics": ["reward"],
        "scales": {"testbed": ["method.beta=1", *TESTBED]},
        "runs": {"MIRA again": ["method=mira"]},
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other, allow_unicode=True))
    out = tmp_path / "out"
    written = reproduce_all(["grid", "other"], "testbed", out, experiments_dir=tmp_path, launch=launch_in_process)
    rows = read_csv(written[0])
    assert set(rows) == {"MIRA · β=0.01", "MIRA · β=1", "MIRA-DPO · β=0.01", "MIRA-DPO · β=1"}
    assert len(list((out / "runs" / "testbed").iterdir())) == 4  # "MIRA again" is "MIRA · β=1"
    for name, row in rows.items():
        [run_dir] = (out / "runs" / "testbed").glob(f"{slug(name)}-*")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert row["beta"] == name.split(" · ")[1] and int(row["items"]) == summary["num_ok"] == 2
        for metric in ("reward", "adherence", "drift_rmse"):
            # the mean of the same float64 values, summed in another order at most
            assert float(row[f"{metric}_mean"]) == pytest.approx(summary[f"final_{metric}_mean"], rel=1e-12)
    for judge in ("reward", "judge_log_prob"):  # one column per judge; eval_hps was recorded by no run: left out
        assert float(rows["MIRA · β=1"][f"win_rate:{judge}_mean"]) == 0.5  # versus the MIRA run of its own cell
    assert "win_rate:eval_hps_mean" not in rows["MIRA · β=1"]
    [mira_dir] = (out / "runs" / "testbed").glob("MIRA_beta_0.01-*")
    [dpo_dir] = (out / "runs" / "testbed").glob("MIRA-DPO_beta_0.01-*")
    mira, dpo = ({r.id: r.final("judge_log_prob") for r in read_records(d)} for d in (mira_dir, dpo_dir))
    wins = np.mean([(mira[i] > dpo[i]) + 0.5 * (mira[i] == dpo[i]) for i in mira])  # MIRA's image beats the row's
    assert float(rows["MIRA-DPO · β=0.01"]["win_rate:judge_log_prob_mean"]) == pytest.approx(wins, rel=1e-12)
    assert read_csv(written[3])["MIRA again"]["reward_mean"] == rows["MIRA · β=1"]["reward_mean"]
    # The figures draw one row of panels per cell (the cells' rewards need not share a scale), from the same runs.
    trade = spec | {
        "kind": "tradeoff",
        "metrics": ["reward", "drift_rmse"],
        "tradeoff": {"y": "reward", "x": ["drift_rmse"]},
    }
    (tmp_path / "trade.yaml").write_text(yaml.safe_dump(trade, allow_unicode=True))
    written = reproduce("trade", "testbed", out, experiments_dir=tmp_path, launch=launch_in_process)
    with open(written[-2]) as f:
        assert {r["run"] for r in csv.DictReader(f)} == {
            "MIRA · β=0.01",
            "MIRA · β=1",
            "MIRA-DPO · β=0.01",
            "MIRA-DPO · β=1",
        }
    assert len(list((out / "runs" / "testbed").iterdir())) == 4


def test_runs_given_per_scale_exist_only_at_the_scales_they_name(tmp_path):
    from framework.analysis.experiments import plan

    spec = {
        "title": "s",
        "kind": "table",
        "metrics": ["reward"],
        "scales": {"testbed": TESTBED, "other": TESTBED},
        "runs": {"MIRA": ["method=mira"], "DNO": {"testbed": ["method=dno", "method.opt_steps=3"]}},
    }
    testbed = plan(spec, "testbed", tmp_path, "s", {})
    assert [r.label for r in testbed] == ["MIRA", "DNO"] and testbed[1].cfg.method.opt_steps == 3
    assert [r.label for r in plan(spec, "other", tmp_path, "s", {})] == ["MIRA"]
    # `cells:` keeps a run to the grid cells with one of those options (a λ grid per reward)
    spec["grid"] = {"testbed": {"cfg": {"CFG 3": ["method.guidance_scale=3"], "CFG 5": ["method.guidance_scale=5"]}}}
    spec["runs"]["DNO"]["cells"] = ["CFG 5"]
    (tmp_path / "cells.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    load_experiment(tmp_path / "cells.yaml")
    runs = plan(spec, "testbed", tmp_path, "s", {})
    assert [(r.label, r.cell["cfg"]) for r in runs] == [("MIRA", "CFG 3"), ("MIRA", "CFG 5"), ("DNO", "CFG 5")]
    assert runs[2].cfg.method.guidance_scale == 5
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({**spec, "judge": "reward"}))
    with pytest.raises(FrameworkError, match="`judge` is now `judges`, a list"):
        load_experiment(tmp_path / "old.yaml")


def test_a_run_directory_named_by_the_legacy_hash_is_renamed_once_with_its_items(tmp_path):
    from framework.analysis.experiments import legacy_hash, plan

    spec = {"title": "s", "kind": "table", "metrics": ["reward"], "scales": {"testbed": TESTBED}, "runs": {"M": []}}
    [run] = plan(spec, "testbed", tmp_path, "s", {})
    old = tmp_path / f"M-{legacy_hash(run.cfg)}"
    (old / "items" / "p0000_s000").mkdir(parents=True)
    [again] = plan(spec, "testbed", tmp_path, "s", {})
    assert again.dir == run.dir == tmp_path / f"M-{run.ident}" and run.ident != legacy_hash(run.cfg)
    assert (again.dir / "items" / "p0000_s000").is_dir() and not old.exists()


def test_bad_override_fails_before_any_run(tmp_path):
    spec = {
        "title": "bad",
        "kind": "table",
        "metrics": ["reward"],
        "scales": {"testbed": TESTBED},
        "runs": {"MIRA": ["method=mira"], "Typo": ["method=mira", "method.betta=1"]},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(FrameworkError, match="experiment bad, run 'Typo': .*betta"):
        reproduce("bad", "testbed", tmp_path / "out", experiments_dir=tmp_path, launch=launch_in_process)
    assert not (tmp_path / "out" / "runs").exists()  # MIRA was not run either


SPEC_ERRORS = {
    "unknown metric 'rewrad'": {"metrics": ["rewrad"]},
    "unknown metric 'sets.cmd'": {"metrics": ["reward", "sets.cmd"]},
    "unknown metric 'last.r_mria'": {"metrics": ["last.r_mria"]},
    "judges: 'adherance' is not an item metric": {"metrics": ["win_rate"], "versus": "MIRA", "judges": ["adherance"]},
    "metric win_rate needs `versus:` naming one of the runs": {"metrics": ["win_rate"]},
    "kind pareto needs `pareto: {x: <metric>, y: <metric>}`": {"kind": "pareto"},
    "pareto.y: 'adherence' must be one of the metrics": {"kind": "pareto", "pareto": {"x": "reward", "y": "adherence"}},
    "curves: 'r_mria' is not a per-step key": {"kind": "curve", "curves": ["r_mria"]},
    "kind tradeoff needs `tradeoff: {y: <metric>, x: [<metric>, ...]}`": {"kind": "tradeoff", "tradeoff": {"y": "x"}},
    "tradeoff: 'evals' must be one of the metrics and a per-step key": {
        "kind": "tradeoff",
        "metrics": ["reward", "evals"],
        "tradeoff": {"y": "reward", "x": ["evals"]},
    },
    "unknown key 'versos'": {"versos": "MIRA"},
    "run 'DNO': cells must list grid options (no grid)": {"runs": {"DNO": {"testbed": [], "cells": ["Proxy"]}}},
}


@pytest.mark.parametrize("message", list(SPEC_ERRORS))
def test_experiment_specs_are_checked_before_anything_runs_naming_the_file_and_key(message, tmp_path):
    spec = {
        "title": "t",
        "kind": "table",
        "metrics": ["reward"],
        "scales": {"testbed": TESTBED},
        "runs": {"MIRA": ["method=mira"]},
    } | SPEC_ERRORS[message]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(FrameworkError, match=f"^{tmp_path / 't.yaml'}: .*{re.escape(message)}"):
        reproduce("t", "testbed", tmp_path / "out", experiments_dir=tmp_path, launch=launch_in_process)
    assert not (tmp_path / "out").exists()


def test_a_failing_run_is_marked_in_its_table_and_the_others_still_run(tmp_path, monkeypatch):
    from framework.analysis.experiments import RunsFailed

    (tmp_path / "buggy.py").write_text("def score(images, prompts):\n    return 1 / 0\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # this test runs each run in its own process, as by default
    tiny = [
        "model=tiny_sd",
        "model.resolution=32",
        "method.num_steps=2",
        "method=base",
        "prompts=inline",
        "prompts.prompts=[a cat]",
        "logger=none",
    ]
    spec = {
        "title": "f",
        "kind": "table",
        "metrics": ["reward"],
        "scales": {"tiny": tiny},
        "runs": {"Broken": ["reward=callable", "reward.target=buggy:score"], "Base": []},
    }
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(spec))
    failed_item = "1 of 1 items failed: p0000_s000 (reward callable raised ZeroDivisionError: division by zero)"
    with pytest.raises(
        RunsFailed, match=rf"1 run\(s\) did not finish.*\n  - .*Broken.*: {re.escape(failed_item)}"
    ) as failure:
        reproduce("f", "tiny", tmp_path / "out", experiments_dir=tmp_path)
    rows = read_csv(failure.value.written[0])
    assert rows["Base"]["status"] == "ok" and rows["Base"]["items"] == "1"
    assert rows["Broken"]["status"].startswith(failed_item) and rows["Broken"]["items"] == "0"


def test_paper_scale_without_weights_fails_fast_with_one_message(tmp_path):
    from framework.analysis.experiments import main

    result = call_main(main, "--scale", "paper", "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: scale paper:") and "nothing was run" in message
    for weight in (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "stabilityai/stable-diffusion-xl-base-1.0",
        "stabilityai/stable-diffusion-3.5-medium",
        "Qwen/Qwen-Image",
        "black-forest-labs/FLUX.2-dev",
        "xswu/HPSv2/HPS_v2.1_compressed.pt",
        "yuvalkirstain/PickScore_v1",
        "weights/hpdv2/photo.json",
        "weights/sac+logos+ava1-l14-linearMSE.pth",
        "THUDM/ImageReward/ImageReward.pt",
    ):
        assert f"'{weight}'" in message
    assert "hf download" in message and "HF_HOME" in message
    assert not (tmp_path / "runs").exists()


def test_weight_check_finds_local_paths_and_hub_cache_entries(tmp_path):
    """`unavailable` against an independent layout: a Hugging Face cache entry written by hand, local paths."""
    from huggingface_hub import constants

    from framework.core.weights import unavailable

    repo = tmp_path / "absent"
    assert unavailable("pretrained", str(repo)) == "not found"
    assert unavailable("file", str(repo / "w.pt")) == "not found"
    repo.mkdir()
    (repo / "w.pt").write_bytes(b"x")
    assert unavailable("pretrained", str(repo)) is None and unavailable("file", str(repo / "w.pt")) is None

    cached = Path(constants.HF_HUB_CACHE) / "models--framework-test--cached"
    assert unavailable("pretrained", "framework-test/cached") == "not in the Hugging Face cache"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("a" * 40)
    (cached / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (cached / "snapshots" / ("a" * 40) / "model.pt").write_bytes(b"x")
    assert unavailable("pretrained", "framework-test/cached") is None
    assert unavailable("file", "framework-test/cached/model.pt") is None
    assert unavailable("file", "framework-test/cached/other.pt") == "not in the Hugging Face cache"

    spec = {
        "title": "local",
        "kind": "table",
        "metrics": ["reward"],
        "runs": {"Base": ["method=base"]},
        "scales": {
            "paper": [
                "model=sd15",
                f"model.source={tmp_path}/sd15",
                "reward=brightness",
                "logger=none",
                "eval.features=none",
            ]
        },
    }
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(FrameworkError, match=f"'{tmp_path}/sd15' \\(model.source\\): not found; needed by local"):
        reproduce_all(["local"], "paper", tmp_path / "out", experiments_dir=tmp_path, launch=launch_in_process)


def test_multirun_sweep_gives_one_run_per_value_and_one_table(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("--multirun", "method=mira", "method.beta=0.01,0.1,1", *TESTBED, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    jobs = sorted(d for d in sweep.iterdir() if (d / "summary.json").exists())
    assert [d.name for d in jobs] == ["0", "1", "2"]
    rows = read_csv(sweep / "table.csv")
    assert list(rows) == ["method.beta=0.01", "method.beta=0.1", "method.beta=1"]
    for job, row in zip(jobs, rows.values()):
        summary = json.loads((job / "summary.json").read_text())
        assert float(row["reward_mean"]) == pytest.approx(summary["final_reward_mean"], rel=1e-12)
        assert float(row["evals_mean"]) == summary["evals_mean"]
    assert "| method.beta=1 | 2 |" in (sweep / "table.md").read_text() and f"sweep table: {sweep}" in result.stdout


def test_slurm_launcher_config_and_the_submitit_job_path(tmp_path):
    """hydra/launcher=slurm composes with its documented fields; the same submitit launcher with its local executor
    runs a sweep end to end (pickled jobs in other processes) and writes the sweep table."""
    shown = run_cli("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert shown.returncode == 0, shown.stderr
    launcher = yaml.safe_load(shown.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["max_num_timeout"] > 0 and launcher["gpus_per_node"] == 1

    sweep = tmp_path / "sweep"
    result = run_cli(
        "--multirun",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "method=base",
        "model=tiny_sd",
        "model.resolution=32",
        "method.num_steps=2",
        "prompts=inline",
        "prompts.prompts=[a cat]",
        "logger=none",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr
    rows = read_csv(sweep / "table.csv")
    assert list(rows) == ["seed=0", "seed=1"] and rows["seed=0"]["reward_mean"] != rows["seed=1"]["reward_mean"]


def test_multirun_jobs_are_one_wandb_group():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from framework.runner.tracking import wandb_group

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config", ["hydra.sweep.dir=/tmp/sweeps/beta_grid", "hydra.mode=MULTIRUN"], return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)
    try:
        assert wandb_group(cfg) == "beta_grid"
        cfg.logger.group = "mine"
        assert wandb_group(cfg) == "mine"
    finally:
        HydraConfig.instance().cfg = None


def test_runs_go_in_parallel_after_the_runs_they_read(tmp_path):
    """`--jobs 2`: each distinct directory runs once, two at a time; a run reading another's directory ({run:X},
    recorded by the plan) starts after that one ended; a failure is that run's one-line error; a stopped run stops
    the whole call, and what waited on it never starts."""
    spec = {
        "title": "t",
        "kind": "table",
        "metrics": ["reward"],
        "scales": {"testbed": ["model=shapes", "prompts=shapes", "logger=none"]},
        "runs": {"DRaFT": ["method=draft"], "AIG": ["method=aig", "method.adapter={run:DRaFT}/adapter"]},
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    _, (draft, aig) = prepare("t", "testbed", tmp_path / "out", tmp_path, {})
    assert draft.needs == [] and aig.needs == [draft.dir]

    events, lock = [], threading.Lock()
    together = threading.Barrier(2, timeout=30)  # broken (an error) unless a and b run at the same time

    def launch(overrides, outcome):
        name = Path(overrides[-1].removeprefix("hydra.run.dir=")).name
        with lock:
            events.append(("start", name))
        if name in ("a", "b"):
            together.wait()
        with lock:
            events.append(("end", name))
        return outcome.get(name, (0, ""))

    a, b = (Run(n, {}, [], n, tmp_path / n) for n in "ab")
    c = Run("c", {}, [], "c", tmp_path / "c", needs=[a.dir])
    runs = [(a, "g"), (b, "g"), (c, "g"), (a, "other experiment")]
    failed = run_missing(runs, lambda o: launch(o, {"b": (1, "error: boom\n")}), jobs=2)
    assert failed == {b.dir: "boom"}
    assert sorted(e for e in events if e[0] == "start") == [("start", n) for n in "abc"]  # a once
    assert events.index(("end", "a")) < events.index(("start", "c"))

    events.clear()
    together.reset()
    with pytest.raises(Interrupted):
        run_missing(runs, lambda o: launch(o, {"a": (STOPPED["SIGINT"], "")}), jobs=2)
    assert ("start", "c") not in events and ("end", "b") in events


def test_bad_arguments_are_one_error_line(tmp_path):
    from framework.analysis.experiments import main

    for args, line in [
        (
            ["--scale", "nope"],
            f"error: --scale nope: no experiment in {EXPERIMENTS_DIR} has it; scales: paper, testbed",
        ),
        (["--jobs", "-1"], "error: --jobs -1: runs at a time must be at least 1 (see --help)"),
        (["--jobs", "two"], "error: argument --jobs: invalid int value: 'two' (see --help)"),
        (
            ["--specs", str(tmp_path / "none")],
            f"error: --specs {tmp_path / 'none'}: not a directory of experiment specs",
        ),
    ]:
        result = call_main(main, *args, "--out", str(tmp_path / "out"))
        assert (result.returncode, result.stderr) == (2, line + "\n")
    assert not (tmp_path / "out" / "runs").exists()
    (tmp_path / "a file").write_text("")
    result = call_main(main, "--out", str(tmp_path / "a file" / "out"))
    assert (result.returncode, result.stderr) == (
        2, f"error: --out {tmp_path / 'a file' / 'out'}: cannot create or write it (Not a directory); give a writable "
        "directory\n",
    )  # fmt: skip


QUICK_SPEC = {
    "title": "quick",
    "kind": "table",
    "metrics": ["reward"],
    "scales": {"testbed": ["model=shapes", "prompts=shapes", "prompts.limit=2", "method.num_steps=3", "logger=none"]},
}


def start_experiments(specs: Path, out: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m framework.analysis.experiments` on the specs of `specs`, one run at a time, in its own session (as a
    terminal's foreground job: Ctrl-C reaches its whole group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "framework.analysis.experiments", "--specs", str(specs), "--out", str(out)]
        + ["--jobs", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


SLOW_REWARD = """
import time
from pathlib import Path

HERE = Path(__file__).parent


def score(images, prompts):
    \"\"\"Brightness, slowly while the file 'slow' exists; the file 'computing' says a run reached its reward.\"\"\"
    (HERE / "computing").touch()
    if (HERE / "slow").exists():
        time.sleep(2)
    return images.mean(dim=(1, 2, 3))
"""


def test_ctrl_c_stops_the_experiments_marks_nothing_failed_and_a_rerun_finishes_what_is_missing(tmp_path, monkeypatch):
    """Ctrl-C while the second of three runs computes (the first finished earlier): it stops after its finished
    items, the third never starts, nothing is marked failed or half-written, exit 130 within seconds; the rerun
    finishes the second and third run and leaves the first as it was. The second run's reward takes 2 s a call, so
    that the stop reaches it long before it could finish (its 4 calls of 3 steps and the final images)."""
    (tmp_path / "slow_reward.py").write_text(SLOW_REWARD)
    (tmp_path / "slow").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    slow = ["reward=callable", "reward.target=slow_reward:score", "reward.differentiable=true"]
    spec = QUICK_SPEC | {
        "runs": {
            "A": ["method=base"],
            "B": ["method=dno", "method.opt_steps=3", *slow],
            "C": ["method=base", "seed=1"],
        },
    }
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    _, (a, _, _) = prepare("quick", "testbed", out, tmp_path, {})
    assert run_missing([(a, "quick-testbed")], launch_in_process) == {}
    process = start_experiments(tmp_path, out, env={"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    wait_for(lambda: (tmp_path / "computing").exists(), process, timeout=120)  # B reached its reward
    stopped_at = time.monotonic()
    os.kill(process.pid, signal.SIGINT)  # as `kill -INT`; a terminal's Ctrl-C reaches the same process (its runs
    # have sessions of their own, so that they get the stop once, from it)
    assert process.wait(timeout=60) == 130
    assert time.monotonic() - stopped_at < 30
    lines = process.stdout.read().splitlines(keepends=True)
    assert "  stopped B\n" in lines and not any(
        line.startswith(("running A", "running C", "  failed")) for line in lines
    )
    assert process.stderr.read().startswith("stopped: SIGINT during experiments: the runs in progress stopped")
    run_dirs = {path.name.split("-")[0]: path for path in (out / "runs" / "testbed").iterdir()}
    first = run_dirs["A"] / "summary.json"
    assert json.loads((run_dirs["A"] / "status.json").read_text())["exit_code"] == 0
    assert json.loads((run_dirs["B"] / "status.json").read_text())["exit_code"] == 130
    assert not (run_dirs["B"] / "summary.json").exists() and "C" not in run_dirs
    assert not (out / "tables").exists() and not list(out.rglob("*.tmp"))
    before = first.stat().st_mtime_ns

    (tmp_path / "slow").unlink()
    written = reproduce_all(["quick"], "testbed", out, experiments_dir=tmp_path, launch=launch_in_process)
    rows = read_csv(written[0])
    assert set(rows) == {"A", "B", "C"} and all(row.get("status", "ok") == "ok" for row in rows.values())
    assert first.stat().st_mtime_ns == before  # A was not run again


def test_two_experiments_processes_on_the_same_outputs_compute_each_run_once(tmp_path):
    spec = QUICK_SPEC | {"runs": {"A": ["method=base"], "B": ["method=base", "seed=1"]}}
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    processes = [start_experiments(tmp_path, out) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    started = [
        line.split(" in ")[0] for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("running")
    ]
    assert sorted(started) == ["running A", "running B"]  # each run by one of the two
    for stdout, _ in outputs:
        assert f"{out / 'tables' / 'testbed' / 'quick.md'}" in stdout
    assert set(read_csv(out / "tables" / "testbed" / "quick.csv")) == {"A", "B"}


def test_a_table_is_replaced_whole_or_not_at_all(tmp_path):
    from framework.core.atomic import atomic_open, write_text

    table = tmp_path / "t.csv"
    write_text(table, "old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(table) as f:
            f.write("half of a new ")
            raise KeyboardInterrupt  # Ctrl-C while writing
    assert table.read_text() == "old\n" and list(tmp_path.iterdir()) == [table]
    write_text(table, "new\n")
    assert table.read_text() == "new\n"
