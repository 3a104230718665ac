"""The hacking monitor (framework.core.hacking, framework.methods.probe): the rule on curves whose answer is known,
the probe set of a DRaFT run (curves, figure, resume, stop at the flag, best-held-out selection) and the rule over a
noise method's records."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from framework.analysis import monitor_study
from framework.analysis.monitor_study import DEFAULT, Trajectory, outcome, summarise
from framework.core.hacking import (
    Signal,
    calibrated_z,
    detect,
    lag_one_correlation,
    null_flag_rate,
    rule_z,
    velocity,
)
from framework.core.records import read_records

STEPS = [0, 5, 10, 15, 20, 25, 30, 35]


def curves(held_out_fall_from: int | None, reward_slope: float = 1.0, seed: int = 0, units: int = 16):
    """Reward rising by `reward_slope` per evaluation; a held-out reward flat, then falling by 0.5 per evaluation from
    evaluation `held_out_fall_from`; unit noise 0.1 on both."""
    rng = np.random.default_rng(seed)
    k = np.arange(len(STEPS))[:, None]
    reward = reward_slope * k + 0.1 * rng.standard_normal((len(STEPS), units))
    fall = 0 if held_out_fall_from is None else 0.5 * np.clip(k - held_out_fall_from + 1, 0, None)
    held_out = 1.0 - fall + 0.1 * rng.standard_normal((len(STEPS), units))
    return reward, Signal("eval_other", held_out)


def test_the_rule_flags_a_held_out_fall_beyond_the_probe_noise_while_the_reward_rises():
    reward, held_out = curves(held_out_fall_from=5)
    flag = detect(STEPS, reward, [held_out], patience=1)
    assert flag is not None and flag.step == STEPS[5] and flag.signal == "eval_other" and flag.best_step < STEPS[5]
    assert detect(STEPS, reward, [held_out]).step == STEPS[6]  # by default, two evaluations in a row
    flat_reward, _ = curves(held_out_fall_from=5, reward_slope=0.0)
    assert detect(STEPS, flat_reward, [held_out]) is None  # held-out falls, but the reward did not gain: no hacking
    one_unit = curves(held_out_fall_from=2, units=1)
    assert detect(STEPS, one_unit[0], [one_unit[1]]) is None  # no spread to measure the noise by


@pytest.mark.parametrize("patience,rate", [(1, 0.068), (2, 0.004)])
def test_on_sampling_noise_alone_the_rule_fires_as_rarely_as_documented(patience, rate):
    """The best earlier evaluation is the largest of several noisy means, so one significant evaluation is not rare
    on noise; two in a row are (the module docstring states these rates)."""
    fired = 0
    for seed in range(500):
        reward, noise_only = curves(held_out_fall_from=None, seed=seed)
        fired += detect(STEPS, reward, [noise_only], patience=patience) is not None
    assert fired / 500 == pytest.approx(rate, abs=0.004)  # a borderline run may round the other way elsewhere


def test_drift_that_accelerates_is_a_turned_signal():
    rng = np.random.default_rng(1)
    increments = np.array([0.0, 0.1, 0.1, 0.1, 0.1, 0.4, 0.4, 0.4])[:, None] + 0.01 * rng.standard_normal((8, 16))
    drift = np.cumsum(increments, axis=0)
    signal = Signal("drift_velocity", velocity(drift), higher_is_better=False)
    assert np.isnan(signal.values[0]).all() and signal.values[1:] == pytest.approx(np.diff(drift, axis=0))
    reward, _ = curves(held_out_fall_from=None)
    flag = detect(STEPS, reward, [signal])
    assert flag is not None and flag.step == STEPS[6] and flag.signal == "drift_velocity"  # 2nd fast evaluation


DRAFT = [
    "method=draft",
    "reward=brightness",
    "eval.rewards=[darkness]",  # brightness's opposite: it falls exactly as far as the reward rises
    "prompts.limit=4",
    "method.num_steps=4",
    "method.train_batch_size=2",
    "method.lr=5e-3",
    "method.sample_every=0",
    "monitor.every=2",
    "monitor.prompts=2",
    "monitor.false_alarms=null",  # z = 3 as set: the calibrated z of 4 probe images is too high to flag in 6 steps
    "logger=none",
]


def probe_rows(run_dir):
    with open(run_dir / "monitor.csv") as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)}


def test_a_draft_run_watches_its_probe_set_and_stops_at_the_flag(tmp_path):
    """The probe curves (CSV, per-unit JSON lines, figure) from step 0, where the adapter is still the identity
    (no drift, no CMMD); a held-out reward that falls as the reward rises is flagged, and `monitor.stop` ends training
    at the flag: the last evaluation, the last trained step and summary.json agree."""
    run_dir = tmp_path / "run"
    result = run_cli(*DRAFT, "method.train_steps=12", "method.save_every=12", "monitor.stop=true", run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    decision = json.loads((run_dir / "monitor.json").read_text())
    rows = probe_rows(run_dir)
    step = decision["hacking_step"]
    assert step is not None and decision["signal"] == "eval_darkness" and step < 12
    assert sorted(rows) == list(range(0, step + 1, 2))  # evaluated every 2 steps, up to the flag
    assert rows[0]["drift_rmse"] == 0 and rows[0]["cmmd"] == 0
    assert rows[step]["reward"] > rows[decision["best_step"]]["reward"]
    # the held-out reward sees the images as saved (clamped to [0, 1]), the optimised one the decoder's output
    assert rows[step]["eval_darkness"] == pytest.approx(-rows[step]["reward"], abs=1e-3)
    assert {"gold", "adherence", "diversity_vendi", "drift_embedding"} <= rows[step].keys()
    assert json.loads((run_dir / "summary.json").read_text())["monitor"] == decision
    assert f"hacking monitor: flagged at step {step} (eval_darkness turned)" in result.stdout
    assert rows[0]["probe_evals"] == 4 * 4  # 4 probe images × 4 sampler steps
    with open(next((run_dir / "train").glob("version_*/metrics.csv"))) as f:
        trained = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert max(trained) == step - 1  # the last optimiser step trained
    assert (run_dir / "monitor.png").stat().st_size > 0
    units = [json.loads(line) for line in (run_dir / "monitor.jsonl").read_text().splitlines()]
    assert [len(u["units"]["reward"]) for u in units] == [4] * len(rows)  # 2 prompts × 2 seeds
    assert [len(u["units"]["diversity_vendi"]) for u in units] == [2] * len(rows)  # one per prompt


def test_best_held_out_selection_keeps_the_adapter_of_the_best_probe_evaluation(tmp_path):
    """Darkness is best before any training (step 0, where the adapter is the identity): selecting by it keeps the
    untrained adapter, so every item's image is its base image."""
    run_dir = tmp_path / "run"
    args = [*DRAFT, "method.train_steps=4", "method.save_every=2", "monitor.select=best_held_out"]
    result = run_cli(*args, run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "monitor.json").read_text())["best_held_out_step"] == 0
    best, adapter = (
        load_file(run_dir / d / "pytorch_lora_weights.safetensors") for d in ("checkpoints/adapter-best", "adapter")
    )
    assert best.keys() == adapter.keys() and all(torch.equal(best[k], adapter[k]) for k in best)
    assert all(adapter[k].abs().max() == 0 for k in adapter if "lora_B" in k)  # the adapter as initialised
    records = read_records(run_dir)
    assert len(records) == 4 and all(r.final_reward == pytest.approx(r.base_reward, abs=1e-6) for r in records)
    # An interrupted run resumes from its step-2 checkpoint and continues the same curves: the evaluation after the
    # checkpoint is redone, and equals the uninterrupted one.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints" / "adapter-best", resumed / "checkpoints" / "adapter-best")
    for name in ("run.json", "monitor.jsonl"):
        shutil.copy(run_dir / name, resumed / name)
    shutil.copy(run_dir / "checkpoints" / "step000002.ckpt", resumed / "checkpoints" / "last.ckpt")
    result = run_cli(*args, run_dir=resumed)
    assert result.returncode == 0, result.stderr
    before, after = probe_rows(run_dir), probe_rows(resumed)
    assert sorted(after) == sorted(before) == [0, 2, 4]
    for step in before:  # every measurement (not the wall time the check took)
        before[step].pop("probe_seconds"), after[step].pop("probe_seconds")
        assert after[step] == pytest.approx(before[step], rel=1e-4, abs=1e-6)


def test_the_rule_runs_over_a_noise_methods_step_records(tmp_path):
    """DNO raising brightness with darkness held out: summary.json's `monitor` flags the step where darkness has
    fallen beyond its spread over the items while the reward rose, as the records themselves show, by the z calibrated
    to 5 % false alarms under this run's conditions."""
    run_dir = tmp_path / "run"
    args = ["method=dno", "reward=brightness", "eval.rewards=[darkness]", "prompts.limit=3", "samples_per_prompt=2"]
    args += ["method.num_steps=4", "method.opt_steps=6", "method.lr=0.05", "logger=none"]
    result = run_cli(*args, run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    decision = json.loads((run_dir / "summary.json").read_text())["monitor"]
    assert decision["signal"] == "eval_darkness"
    k, b = decision["hacking_step"], decision["best_step"]
    records = read_records(run_dir)
    fall = np.array([r.after(b, "eval_darkness") - r.after(k, "eval_darkness") for r in records])
    gain = np.array([r.after(k, "reward") - r.after(b, "reward") for r in records])
    for d in (fall, gain):
        assert d.mean() > decision["z"] * d.std(ddof=1) / np.sqrt(len(d))


def trajectory_of(gold_curve, signal_fall_from, cell="c", units=16, seed=0):
    """A Trajectory whose mean gold follows `gold_curve`, the reward rises throughout, and the held-out reward falls
    from evaluation `signal_fall_from` (None: never), with small unit noise."""
    reward, held_out = curves(signal_fall_from, seed=seed, units=units)
    rng = np.random.default_rng(seed + 1)
    gold = np.asarray(gold_curve, float)[:, None] + 0.01 * rng.standard_normal((len(STEPS), units))
    return Trajectory("run", cell, STEPS, reward, [held_out], gold, held_out.values)


def test_the_study_scores_the_rule_against_gold():
    """Gold peaking at evaluation 3 then falling: flagged at evaluation 6 (the held-out reward falls from 5, two
    evaluations in a row) is detected with lag 15 steps and keeps gold of evaluation 6; a held-out signal that never
    falls misses it; a run whose gold never falls but whose held-out reward does is a false alarm."""
    hacked = [0.5, 0.55, 0.6, 0.65, 0.6, 0.5, 0.4, 0.3]
    row = outcome(trajectory_of(hacked, 5), *DEFAULT)
    assert row["hacks"] and row["outcome"] == "detected" and row["gold_peak_step"] == STEPS[3]
    assert row["flag_step"] == STEPS[6] and row["lag"] == STEPS[6] - STEPS[3]
    assert row["gold_at_flag"] == pytest.approx(0.4, abs=0.01) and row["gold_final"] == pytest.approx(0.3, abs=0.01)
    assert row["gold_best_held_out"] == pytest.approx(hacked[int(np.argmax(curves(5)[1].values.mean(1)))], abs=0.01)
    assert outcome(trajectory_of(hacked, None), *DEFAULT)["outcome"] == "missed"
    rising = [0.5, 0.52, 0.54, 0.56, 0.58, 0.6, 0.62, 0.64]
    assert outcome(trajectory_of(rising, 5), *DEFAULT)["outcome"] == "false alarm"
    assert outcome(trajectory_of(rising, None), *DEFAULT)["outcome"] == "quiet"
    counts = summarise([outcome(trajectory_of(g, f), *DEFAULT) for g, f in ((hacked, 5), (hacked, None), (rising, 5))])
    expected = {"runs": 3, "hacking": 2, "detected": 1, "missed": 1, "false alarm": 1}
    assert {key: counts[key] for key in expected} == expected
    assert counts["median_lag"] == STEPS[6] - STEPS[3]
    assert counts["precision"] == 0.5 and counts["recall"] == 0.5


def ar1(rng, runs: int, signals: int, evaluations: int, units: int, rho: float) -> np.ndarray:
    noise = rng.standard_normal((runs, signals, evaluations, units))
    for k in range(1, evaluations):
        noise[:, :, k] = rho * noise[:, :, k - 1] + np.sqrt(1 - rho**2) * noise[:, :, k]
    return noise


def test_the_simulated_false_alarm_rate_is_the_rules_own_on_correlated_noise():
    """`null_flag_rate` (vectorised) against `detect` itself on pure noise drawn here: 3 signals of 12 units at 12
    evaluations, correlated 0.5 between evaluations, the reward rising; the two rates agree within Monte-Carlo
    error, and watching more signals fires more often."""
    runs, steps = 600, list(range(12))
    noise = ar1(np.random.default_rng(7), runs, 3, 12, 12, 0.5)
    reward = np.arange(12.0)[:, None] + 0.01 * np.random.default_rng(8).standard_normal((12, 12))
    fired = [detect(steps, reward, [Signal(f"s{j}", run[j]) for j in range(3)], z=2.0, patience=2) for run in noise]
    observed = np.mean([flag is not None for flag in fired])
    simulated = null_flag_rate(12, 12, 3, 2.0, 2, rho=0.5, runs=4000)
    assert abs(observed - simulated) < 4 * np.sqrt(simulated * (1 - simulated) / runs) + 0.01
    assert null_flag_rate(12, 12, 1, 2.0, 2, rho=0.5) < simulated


def test_the_calibrated_z_is_the_smallest_that_holds_the_rate():
    z = calibrated_z(20, 12, 3, 2, 0.05, rho=0.5)
    assert null_flag_rate(20, 12, 3, z, 2, rho=0.5) <= 0.05 < null_flag_rate(20, 12, 3, z - 0.25, 2, rho=0.5)
    assert calibrated_z(20, 12, 3, 2, 0.01, rho=0.5) > z  # a lower rate needs a larger z
    # signals whose noise never changes (correlation 1) are simulated at 0.9: at 1 the simulation could never fire
    persistent = [Signal("a", np.tile(np.random.default_rng(0).standard_normal(24), (31, 1)))]
    assert rule_z(3.0, 0.05, 2, 31, persistent) == calibrated_z(31, 24, 1, 2, 0.05, rho=0.9) > 1
    assert rule_z(3.0, None, 2, 31, persistent) == 3.0  # false_alarms=null: z as set


def test_the_noise_correlation_between_evaluations_is_recovered():
    noise = ar1(np.random.default_rng(3), 1, 2, 40, 24, 0.8)[0]
    assert lag_one_correlation([Signal("a", noise[0]), Signal("b", noise[1])]) == pytest.approx(0.8, abs=0.06)
    assert lag_one_correlation([Signal("a", np.random.default_rng(4).standard_normal((40, 24)))]) < 0.06


def test_the_study_tunes_on_one_cell_reports_on_the_other_and_beats_a_fixed_stop(monkeypatch):
    """Four runs per cell (two hack, two do not): the rule is tuned on cell T and reported on cell R at the tuned,
    default and calibrated settings; the fixed-step stop is tuned on T too, and every row carries the simulated
    false-alarm rate at the z it used."""

    class Run:
        def __init__(self, name, cell, t):
            self.name, self.cell, self.t = name, {"reward": cell}, t

    hacked, rising = [0.5, 0.55, 0.6, 0.65, 0.6, 0.5, 0.4, 0.3], [0.5, 0.52, 0.54, 0.56, 0.58, 0.6, 0.62, 0.64]
    runs = [
        Run(f"{cell}{i}", cell, trajectory_of(gold, fall, cell=cell, seed=i))
        for cell in ("T", "R")
        for i, (gold, fall) in enumerate(((hacked, 4), (hacked, 5), (rising, None), (rising, None)))
    ]
    monkeypatch.setattr(monitor_study, "trajectory", lambda run, axis: run.t)
    tuned, rows, summaries = monitor_study.analyse(runs, "T", "R")
    assert tuned["tuned_on"] == "T" and tuned["fixed_stop_fraction"] == pytest.approx(3 / 7, abs=0.05)
    assert [(s["cell"], s["setting"].split(" ")[0]) for s in summaries] == [
        (cell, name) for cell in ("T", "R") for name in ("tuned", "default", "calibrated")
    ]
    report = next(s for s in summaries if s["cell"] == "R" and s["setting"].startswith("calibrated"))
    assert report["detected"] == 2 and report["false alarm"] <= 1 and report["recall"] == 1.0
    assert report["gold_at_flag"] > report["gold_final"]
    assert all(0 <= row["simulated_false_alarms"] <= 1 for row in rows)
    calibrated = [row for row in rows if row["setting"].startswith("calibrated")]
    assert all(row["simulated_false_alarms"] <= 0.05 for row in calibrated)


def test_at_real_scale_composed_on_tiny_models(tmp_path):
    """HPS optimised with PickScore and aesthetic held out (tiny random stand-ins, as the real ones compose): the
    probe records both held-out rewards and the rule reads them (random-weight models have no image features, so no
    embedding drift; the detector's diversity reads pixels)."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "model=tiny_sd",
        "model.resolution=32",
        "reward=tiny_hps",
        "eval.rewards=[tiny_pickscore,tiny_aesthetic,tiny_imagereward,tiny_hpsv3]",
        "method=draft",
        "method.num_steps=3",
        "method.train_steps=2",
        "method.save_every=2",
        "method.sample_every=0",
        "method.train_batch_size=2",
        "method.lora_rank=4",
        "prompts=inline",
        "prompts.prompts=[a cat,a dog]",
        "monitor.every=1",
        "monitor.select=best_held_out",
        "logger=none",
        run_dir=run_dir,
    )
    assert result.returncode == 0, result.stderr
    rows = probe_rows(run_dir)
    assert (
        sorted(rows) == [0, 1, 2]
        and {"eval_tiny_pickscore", "eval_tiny_aesthetic", "eval_tiny_imagereward", "eval_tiny_hpsv3", "drift_rmse"}
        <= rows[0].keys()
    )
    assert "drift_embedding" not in rows[0] and "diversity_vendi" in rows[0]
    best = max(rows, key=lambda step: rows[step]["eval_tiny_pickscore"])  # the first held-out reward selects
    assert json.loads((run_dir / "monitor.json").read_text())["best_held_out_step"] == best
