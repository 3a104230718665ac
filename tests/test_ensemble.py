"""Reward ensembles (framework.rewards.ensemble): members of any kind normalised on the run's base samples,
combined by mean, WCO or UWO, recorded per member; GARDO's gate of the KL term; the monitor reading no truth."""

import json

import numpy as np
import pytest
import torch
from conftest import compose, run_cli

from framework.config.rewards import RewardConfig
from framework.core.errors import FrameworkError
from framework.core.validation import validate
from framework.rewards import build_reward
from framework.rewards.ensemble import disagreement_gate

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def test_the_aggregates_are_the_published_formulas_over_z_scores():
    """mean, WCO (the lowest member) and UWO (mean − λ·variance over members) of each member's z-score on its
    reference statistics, computed here from the members alone."""
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    members = ["brightness", "contrast", "saturation"]
    raw = np.stack([build_reward(RewardConfig(name=m))(images, PROMPTS).numpy() for m in members])
    mean, std = [0.4, 0.1, 0.2], [0.05, 0.02, 0.1]
    z = (raw - np.array(mean)[:, None]) / np.array(std)[:, None]
    expected = {"mean": z.mean(0), "wco": z.min(0), "uwo": z.mean(0) - 0.5 * z.var(0)}
    for aggregate, value in expected.items():
        reward = build_reward(RewardConfig(name="ensemble", members=members, aggregate=aggregate, uwo_lambda=0.5))
        reward.normalise(mean, std)
        np.testing.assert_allclose(reward(images, PROMPTS).numpy(), value, rtol=1e-5, atol=1e-5)
        scores, disagreement = reward.scored(images, PROMPTS)
        np.testing.assert_allclose(disagreement.numpy(), z.std(0), rtol=1e-5, atol=1e-5)
    details = reward.details(images, PROMPTS)
    assert list(details) == [f"member_{m}" for m in members] + ["disagreement"]
    np.testing.assert_allclose(details["member_contrast"].numpy(), z[1], rtol=1e-5, atol=1e-5)


def test_the_gate_keeps_the_top_fraction_by_disagreement():
    spread = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.0, 0.7, 0.4])
    assert disagreement_gate(spread, 0.25).tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
    assert disagreement_gate(spread, 0.1).tolist() == [0, 0, 0, 1, 0, 0, 0, 0]  # at least one sample
    assert disagreement_gate(spread, 1.0).sum() == len(spread)
    # the gated KL of the fine-tuning methods: summed over the gated samples, divided by the whole batch
    from types import SimpleNamespace

    from framework.methods.fine_tune import AdapterTraining

    kl = torch.arange(1.0, 9.0)
    module = SimpleNamespace(cfg=SimpleNamespace(kl_gate=0.25))
    assert AdapterTraining.gated(module, kl, spread).item() == pytest.approx((4 + 7) / 8)
    assert AdapterTraining.gated(module, kl, None).item() == pytest.approx(kl.mean().item())  # not gating


@pytest.mark.parametrize(
    "members,why",
    [
        ("[tiny_hps]", "an ensemble needs two or more members"),
        ("[tiny_hps,no_such_reward]", r"reward.members\[1\]='no_such_reward' is not a valid reward: no reward config"),
        ("[tiny_hps,{name:hps,tiny:true,colour:red}]", r"reward.members\[1\]=.*not a valid reward: .*colour"),
        ("[tiny_hps,{name:remote}]", r"reward.members\[1\]=.* reward.members\[1\].url: reward=remote needs"),
        ("[tiny_hps,{name:jpeg,jpeg_quality:0}]", r"reward.members\[1\].jpeg_quality=0 is not valid"),
        ("[tiny_hps,{name:ensemble,members:[a,b]}]", "an ensemble cannot be a member of an ensemble"),
    ],
)
def test_a_bad_member_is_one_error_naming_it(members, why):
    with pytest.raises(FrameworkError, match=why):
        validate(compose("model=tiny_sd", "reward=ensemble", f"reward.members={members}"))


def test_the_gate_needs_an_ensemble_and_a_kl_term():
    with pytest.raises(FrameworkError, match="method.kl_gate=0.5 is not valid; it gates the KL by the disagreement"):
        validate(compose("model=tiny_sd", "reward=brightness", "method=draft", "method.kl_gate=0.5"))
    ensemble = ["reward=ensemble", "reward.members=[brightness,contrast]"]
    with pytest.raises(FrameworkError, match="there is no KL term to gate"):
        validate(compose("model=tiny_sd", *ensemble, "method=draft", "method.kl_gate=0.5"))
    validate(compose("model=tiny_sd", *ensemble, "method=grpo", "method.kl_gate=0.5"))


def test_a_run_normalises_members_on_its_base_samples_and_records_each(tmp_path):
    """Tiny HPS, PickScore and ImageReward on a tiny SD: the reference is the run's base samples, so over those
    images each member's recorded z-score has mean 0 and standard deviation 1; every record keeps each member and the
    disagreement; the reference file is what a rerun reads."""
    run_dir = tmp_path / "run"
    common = ["model=tiny_sd", "model.resolution=32", "method=base", "method.num_steps=2", "logger=none"]
    prompts = ["prompts=inline", "prompts.prompts=[a cat,a dog]", "samples_per_prompt=3"]
    ensemble = ["reward=ensemble", "reward.members=[tiny_hps,tiny_pickscore,tiny_imagereward]", "reward.aggregate=wco"]
    result = run_cli(*common, *prompts, *ensemble, "reward.reference_images=6", run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    reference = json.loads((run_dir / "reward_reference.json").read_text())
    assert reference["images"] == 6 and list(reference["members"]) == ["tiny_hps", "tiny_pickscore", "tiny_imagereward"]
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "items").glob("*/record.json"))]
    for member in reference["members"]:
        z = np.array([r["metrics"]["base"][f"member_{member}"] for r in records])
        assert abs(z.mean()) < 1e-4 and z.std(ddof=1) == pytest.approx(1, abs=1e-4)
    z = np.array([[r["metrics"]["base"][f"member_{m}"] for m in reference["members"]] for r in records])
    np.testing.assert_allclose([r["base_reward"] for r in records], z.min(1), atol=1e-4)  # WCO of the members
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"final_disagreement_mean", "final_member_tiny_hps_mean"} <= summary.keys()


def test_a_fine_tuning_run_gates_its_kl_by_the_ensembles_disagreement(tmp_path):
    """GRPO and DRaFT with the KL on a quarter of the samples: they train, and the probe records the members and the
    disagreement the monitor reads."""
    common = ["model=tiny_sd", "model.resolution=32", "logger=none", "method.train_steps=2", "method.save_every=2"]
    common += ["method.sample_every=0", "method.num_steps=2", "method.lora_rank=2", "method.kl_gate=0.25"]
    common += ["reward=ensemble", "reward.members=[brightness,contrast]", "reward.reference_images=4"]
    common += ["prompts=inline", "prompts.prompts=[a cat,a dog]", "monitor.every=1", "monitor.prompts=2"]
    runs = {
        "grpo": ["method=grpo", "method.rollout_steps=2", "method.group_size=4", "method.kl_weight=0.1"],
        "draft": ["method=draft", "method.kl_weight=0.1", "method.train_batch_size=2", "method.eta=1"],
    }
    for name, overrides in runs.items():
        result = run_cli(*common, *overrides, run_dir=tmp_path / name)
        assert result.returncode == 0, result.stderr
        rows = [json.loads(line) for line in (tmp_path / name / "monitor.jsonl").read_text().splitlines()]
        assert {"member_brightness", "member_contrast", "disagreement"} <= rows[-1]["units"].keys()


def _garbled(*args, **kwargs):
    """What a sabotaged judge or gold returns: values unrelated to the images."""
    images = args[-2] if len(args) >= 2 and isinstance(args[-2], torch.Tensor) else args[-1]
    return torch.randn(len(images), generator=torch.Generator().manual_seed(len(images)))


def test_no_detector_input_reads_the_judge_or_gold(tmp_path, monkeypatch):
    """A DRaFT run watched by its probe set and a DNO run watched through its records, on the testbed, each run
    twice: the second time the judge's features, its log-probabilities and gold return noise. Every signal the rule
    reads is the same both times (and the measurements of the truth differ, so the sabotage took effect)."""
    from framework.core.hacking import probe_signals, read_probe_rows, record_signals
    from framework.core.records import read_records
    from framework.testbed.judge import Judge

    testbed = ["model=shapes", "prompts=shapes", "prompts.limit=2", "samples_per_prompt=2", "logger=none"]
    testbed += ["reward=ensemble", "reward.members=[brightness,contrast]", "reward.reference_images=4"]
    testbed += ["eval.rewards=[saturation]", "method.num_steps=3"]
    draft = ["method=draft", "method.train_steps=2", "method.save_every=2", "method.sample_every=0", "method.eta=1"]
    draft += ["method.lora_rank=2", "method.train_batch_size=2", "monitor.every=1", "monitor.prompts=2"]
    dno = ["method=dno", "method.opt_steps=3"]

    def signals(run_dir, probe):
        if probe:
            steps, reward, found = probe_signals(read_probe_rows(run_dir), ["saturation"])
        else:
            steps, reward, found = record_signals(read_records(run_dir), ["saturation"])
        return {"reward": reward} | {s.name: s.values for s in found}

    for name, overrides in {"draft": draft, "dno": dno}.items():
        assert run_cli(*testbed, *overrides, run_dir=tmp_path / name).returncode == 0
    with monkeypatch.context() as patch:
        patch.setattr(Judge, "features", lambda self, images: torch.randn(len(images), 32))
        patch.setattr(
            "framework.metrics.judge_log_prob", lambda judge, images, named: (_garbled(images), _garbled(images) > 0)
        )
        patch.setattr(  # gold and each of its factors
            "framework.metrics.parts",
            lambda scene, named: {k: _garbled(scene.radii) for k in ("gold", "match", "quality", "clean", "residual")},
        )
        for name, overrides in {"draft": draft, "dno": dno}.items():
            assert run_cli(*testbed, *overrides, run_dir=tmp_path / f"{name}_sabotaged").returncode == 0
    for name in ("draft", "dno"):
        honest, sabotaged = (signals(tmp_path / run, name == "draft") for run in (name, f"{name}_sabotaged"))
        assert {"reward", "eval_saturation", "drift_velocity", "disagreement"} <= honest.keys()
        assert ("diversity_vendi" in honest) == (name == "draft")
        assert honest.keys() == sabotaged.keys()
        for key in honest:
            np.testing.assert_array_equal(honest[key], sabotaged[key], err_msg=f"{name}: {key}")
    gold = [
        json.loads(p.read_text())["metrics"]["final"]["gold"] for p in (tmp_path / "dno").glob("items/*/record.json")
    ]
    garbled = [
        json.loads(p.read_text())["metrics"]["final"]["gold"]
        for p in (tmp_path / "dno_sabotaged").glob("items/*/record.json")
    ]
    assert gold != garbled
