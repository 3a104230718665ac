"""The proxy rewards and the over-optimisation analysis: the Best-of-n estimator against enumeration, Gao's fits on
curves of known coefficients, the peak's bootstrap, and a proxy rebuilt from scratch on a tiny budget."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import REBATCHED
from safetensors.torch import load_file

from framework.analysis.overoptimisation import RunPath, best_of_n_d, best_of_n_weights, fit, fit_path, peak


def test_best_of_n_estimator_equals_enumerating_every_subset():
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=7), rng.normal(size=7)
    order = np.argsort(proxy)
    for n in (1, 2, 3, 7):
        subsets = list(itertools.combinations(range(7), n))
        expected = np.mean([gold[max(s, key=lambda i: proxy[i])] for s in subsets])
        assert best_of_n_weights(7, n) @ gold[order] == pytest.approx(expected, rel=1e-12)
    assert best_of_n_d(1) == 0 and best_of_n_d(256) == pytest.approx(math.sqrt(math.log(256) - 255 / 256))


def test_gao_forms_are_fitted_exactly_on_curves_they_generate():
    d = np.linspace(0.1, 2.5, 9)
    *bon, bon_residual = fit(d, d * (0.4 - 0.15 * d), "bon")
    *rl, rl_residual = fit(d, d * (0.3 - 0.1 * np.log(d)), "rl")
    assert bon == pytest.approx((0.4, 0.15), rel=1e-9) and bon_residual < 1e-12
    assert rl == pytest.approx((0.3, 0.1), rel=1e-9) and rl_residual < 1e-12


def test_the_rl_fit_along_a_policy_recomputes_d_from_its_units_and_covers_the_truth():
    """A policy's path: per unit and checkpoint a KL and a gold that follows Gao's RL form in d = √(mean KL) plus
    noise. The bootstrap resamples units, so d moves with them; the intervals must cover the generating (α, β), and
    an optimum beyond the path's d is not reported."""
    rng = np.random.default_rng(0)
    kl = np.linspace(0, 3, 10)[None] * rng.uniform(0.5, 1.5, size=(40, 1))  # [units, checkpoints], kl[:, 0] = 0
    d = np.sqrt(kl.mean(0))
    gold = 0.5 + np.where(d > 0, d * (0.3 - 0.2 * np.log(np.maximum(d, 1e-12))), 0) + rng.normal(0, 0.02, kl.shape)
    units = [str(i) for i in range(40)]
    path = RunPath("GRPO", "GRPO", "step", list(range(10)), d, {"gold": gold}, units, kl)
    f = fit_path(path, "rl")
    assert f["points"] == 9 and f["d_max"] == pytest.approx(d.max())
    assert f["alpha_ci"][0] < 0.3 < f["alpha_ci"][1] and f["beta_ci"][0] < 0.2 < f["beta_ci"][1]
    assert f["alpha_ci"][1] - f["alpha_ci"][0] < 0.1  # 40 units pin it down
    assert f["d_optimum"] == pytest.approx(np.exp(f["alpha"] / f["beta"] - 1))  # e^0.5 = 1.65 < d_max = 1.73
    rising = RunPath("GRPO", "GRPO", "step", list(range(10)), d, {"gold": 0.5 + 0.1 * d + 0 * kl}, units, kl)
    assert math.isnan(fit_path(rising, "rl")["d_optimum"])  # no optimum within the data


def test_peak_finds_the_top_of_the_mean_curve_with_an_interval():
    steps = np.arange(30)
    curve = -((steps - 8) ** 2) / 100.0
    values = curve + np.random.default_rng(1).normal(scale=0.05, size=(24, 30))
    top = peak(values)
    assert top["at"] == int(np.nanmean(values, 0).argmax()) and abs(top["at"] - 8) <= 2
    assert top["value_ci"][0] <= top["value"] <= top["value_ci"][1]
    assert top["at_ci"][0] <= top["at"] <= top["at_ci"][1]


def test_a_proxy_rebuilt_on_a_tiny_budget_is_a_differentiable_reward_and_deterministic(tmp_path):
    from framework.rewards.proxy import load_proxy
    from framework.tools.train_proxy import main

    args = ["--images", "48", "--eval-images", "24", "--eval-pairs", "50", "--steps", "3"]
    main(["--comparisons", "40", "60", "--members", "2", *args, "--out", str(tmp_path / "a")])
    main(["--comparisons", "40", *args, "--out", str(tmp_path / "b")])  # rebuilding one proxy alone reproduces it
    first, second = (load_file(tmp_path / out / "proxy_40.safetensors") for out in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    report, alone = (json.loads((tmp_path / out / "proxy_report.json").read_text()) for out in ("a", "b"))
    assert {k: v for k, v in report["40"].items() if k != "train_minutes"} == {
        k: v for k, v in alone["40"].items() if k != "train_minutes"
    }
    assert 0 <= report["40"]["accuracy_vs_gold"] <= 1 and 0.5 <= report["40"]["noise_ceiling"] <= 1
    assert alone["data"]["command"].startswith("python -m framework.tools.train_proxy --comparisons 40 --members 0")
    assert len(report["ensemble"]["members"]) == 2 and len(report["ensemble"]["pair_midpoints"]) == 1
    assert all((tmp_path / "a" / f"proxy_1000_member{k}.safetensors").is_file() for k in range(2))
    reward = load_proxy(tmp_path / "a" / "proxy_40.safetensors")
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    scores = reward(images, ["a red circle", "a blue square"])
    assert scores.shape == (2,) and torch.autograd.grad(scores.sum(), images)[0].abs().sum() > 0


def test_the_shipped_proxies_are_small_and_better_with_more_data():
    from framework.testbed import PROXY_SIZES, TESTBED_DIR, proxy_file

    report = json.loads((TESTBED_DIR / "proxy_report.json").read_text())
    accuracies = [report[str(n)]["accuracy_vs_gold"] for n in PROXY_SIZES]
    assert all(proxy_file(n).stat().st_size < 1 << 20 for n in PROXY_SIZES)
    assert accuracies == sorted(accuracies) and accuracies[0] > 0.6  # the data set is the knob


def test_the_shipped_proxy_ensemble_has_five_members_and_its_report():
    """Five members of the smallest proxy's size, small, each about as accurate as that proxy; the report says
    whether they are linearly connected by the accuracy of their pairwise midpoints (WARM's premise), and
    reward=proxy_ensemble builds them as one differentiable reward."""
    from framework.config.rewards import preset
    from framework.rewards import build_reward
    from framework.testbed import ENSEMBLE_SIZE, PROXY_SIZES, TESTBED_DIR, proxy_file

    report = json.loads((TESTBED_DIR / "proxy_report.json").read_text())["ensemble"]
    members = [proxy_file(PROXY_SIZES[0], k) for k in range(ENSEMBLE_SIZE)]
    assert all(path.stat().st_size < 1 << 20 for path in members) and len(report["members"]) == ENSEMBLE_SIZE
    assert all(abs(m["accuracy_vs_gold"] - report["members"][0]["accuracy_vs_gold"]) < 0.05 for m in report["members"])
    worst = min(m["accuracy_vs_gold"] for m in report["pair_midpoints"])
    mean = sum(m["accuracy_vs_gold"] for m in report["members"]) / ENSEMBLE_SIZE
    assert report["largest_barrier"] == pytest.approx(mean - worst, abs=1e-3)
    assert report["linearly_connected"] == (report["largest_barrier"] <= 0.01)
    reward = build_reward(preset("proxy_ensemble"))
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    scores = reward(images, ["a red circle", "a blue square"])
    assert list(reward.members) == [f"proxy{k}" for k in range(ENSEMBLE_SIZE)]
    assert torch.autograd.grad(scores.sum(), images)[0].abs().sum() > 0


def test_an_overoptimisation_experiment_writes_its_paths_peaks_and_both_fits(tmp_path):
    """Tiny runs on the proxy: Best-of-n's points equal the estimator computed here from the candidates' records
    (n = 1: the mean candidate; n = N: the proxy's best), DNO's path starts at the base images, GRPO watched along
    training (η > 0) is a path of its probe evaluations from d = 0 with the RL fit, and the adapted samplers (LoRA
    scaling, AIG at η = 1) carry d = √KL; Best-of-n gets the Best-of-N fit."""
    import csv

    import yaml
    from conftest import launch_in_process

    from framework.analysis.experiments import reproduce
    from framework.core.records import read_records

    adapter = "method.adapter={run:GRPO}/adapter"
    spec = {
        "title": "over",
        "kind": "overoptimisation",
        "metrics": ["reward", "gold", "kl"],
        "scales": {
            "testbed": ["model=shapes", "reward=proxy", "prompts=shapes", "prompts.limit=2", "method.num_steps=3"]
            + ["method.batch_size=4", "logger=none"]
        },
        "runs": {
            "Base": ["method=base"],
            "Best-of-N": ["method=best_of_n", "method.n=4"],
            "DNO": ["method=dno", "method.opt_steps=2", "method.lr=0.05"],
            "GRPO": ["method=grpo", "method.eta=0.7", "method.train_steps=2", "method.save_every=2"]
            + ["method.group_size=2", "method.prompts_per_epoch=1", "method.rollout_steps=3", "method.lora_rank=4"]
            + ["method.lr=0.05", "monitor.every=1", "monitor.prompts=2", "monitor.seeds=1"],
            "LoRA α=0.5": ["method=lora_scale", adapter, "method.alpha=0.5"],
            "AIG p=2": ["method=aig", adapter, "method.p=2"],
        },
    }
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    out = tmp_path / "out"
    written = reproduce("over", "testbed", out, experiments_dir=tmp_path, launch=launch_in_process)
    names = [p.name for p in written]
    assert {"over_peaks.csv", "over_fits.csv", "over_curves.csv", "over.png"} <= set(names)
    with open(out / "tables" / "testbed" / "over_curves.csv") as f:
        curves = list(csv.DictReader(f))
    with open(out / "tables" / "testbed" / "over_fits.csv") as f:
        fits = {r["form"]: r for r in csv.DictReader(f)}
    low, high = (float(v) for v in fits["rl"]["alpha_ci"].split("–"))  # plain numbers that a reader can parse
    assert low <= high

    [bon_dir] = (out / "runs" / "testbed").glob("Best-of-N-*")
    records = read_records(bon_dir)
    bon = {int(r["x"]): r for r in curves if r["run"] == "Best-of-N"}
    assert sorted(bon) == [1, 2, 4] and float(bon[1]["d"]) == 0
    mean_candidate = np.mean([np.mean([c["gold"] for c in r.steps]) for r in records])
    best = np.mean([max(r.steps, key=lambda c: c["reward"])["gold"] for r in records])
    assert float(bon[1]["gold"]) == pytest.approx(mean_candidate, rel=1e-9)
    assert float(bon[4]["gold"]) == pytest.approx(best, rel=1e-9)
    assert fits["bon"]["points"] == "2" and fits["rl"]["points"] == "2" and fits["rl"]["row"] == "GRPO"
    [grpo_dir] = (out / "runs" / "testbed").glob("GRPO-*")
    probe = [json.loads(line) for line in (grpo_dir / "monitor.jsonl").read_text().splitlines()]
    grpo = [r for r in curves if r["run"] == "GRPO"]
    assert [int(r["x"]) for r in grpo] == [row["step"] for row in probe] == [0, 1, 2]
    for row, point in zip(probe, grpo):  # d = √(mean over the probe units of their path KL), 0 before training
        assert float(point["d"]) == pytest.approx(math.sqrt(np.mean(row["units"]["kl"])), rel=1e-12)
        assert float(point["gold"]) == pytest.approx(np.mean(row["units"]["gold"]), rel=1e-12)
    assert float(grpo[0]["d"]) == 0 and float(grpo[-1]["d"]) > 0

    dno = [r for r in curves if r["run"] == "DNO"]
    [dno_dir] = (out / "runs" / "testbed").glob("DNO-*")
    # step 0 renders the base image, with gradients on and in another batch layout than the base's own render
    base = np.mean([r.metrics["base"]["gold"] for r in read_records(dno_dir)])
    assert [int(r["x"]) for r in dno] == [0, 1, 2] and float(dno[0]["gold"]) == pytest.approx(base, abs=REBATCHED)
    for run in ("LoRA α=0.5", "AIG p=2"):  # sampled at η = 1 (the default): the path KL is defined
        [row] = [r for r in curves if r["run"] == run]
        assert float(row["d"]) > 0 and math.isfinite(float(row["d"]))
