"""The embedded testbed: shapes world, shipped model and judge, judge reward and ground-truth metrics."""

import json

import pytest
import torch
from conftest import compose, run_cli

from framework.core.errors import FrameworkError
from framework.models import load_backbone
from framework.rewards.judge import JudgeReward
from framework.testbed import JUDGE_FILE, MODEL_DIR, shapes
from framework.testbed.judge import load_judge
from framework.tools.evaluate_testbed import evaluate_adherence, shape_geometry


def test_captions_cover_every_colour_and_shape_and_parse_back():
    captions = shapes.all_captions()
    assert len(captions) == len(set(captions)) == len(shapes.COLORS) * len(shapes.SHAPES) == 12
    assert all(shapes.caption(*shapes.parse_caption(c)) == c for c in captions)
    with pytest.raises(ValueError):
        shapes.parse_caption("a red circle and a blue square")


def test_render_fills_the_shape_with_its_colour_on_the_background():
    image = shapes.render(torch.tensor([2]), torch.tensor([1]), torch.tensor([[16.0, 16.0]]), torch.tensor([8.0]))[0]
    torch.testing.assert_close(image[:, 16, 16], torch.tensor(shapes.COLORS["blue"]))
    torch.testing.assert_close(image[:, 1, 1], torch.tensor(shapes.BACKGROUND))
    centers, area = shape_geometry(image[None])
    assert centers[0].tolist() == pytest.approx([15.5, 15.5], abs=0.6) and 150 < area.item() < 250  # (2·0.85·8)²


def test_samples_vary_in_position_and_size():
    batch = shapes.sample(
        64,
        torch.Generator().manual_seed(0),
        colors=torch.zeros(64, dtype=torch.long),
        shapes=torch.zeros(64, dtype=torch.long),
    )
    centers, areas = shape_geometry(batch.images)
    assert centers.std(0).min() > 3 and areas.std() / areas.mean() > 0.2
    torch.testing.assert_close(centers, batch.centers - 0.5, atol=0.7, rtol=0)


def test_shipped_judge_is_at_least_98_percent_accurate_on_fresh_images():
    judge = load_judge()
    batch = shapes.sample(1000, torch.Generator().manual_seed(2024))
    with torch.no_grad():
        colors, kinds = judge(batch.images)
    accuracy = ((colors.argmax(1) == batch.colors) & (kinds.argmax(1) == batch.shapes)).float().mean().item()
    assert accuracy >= 0.98


def test_shipped_model_loads_through_the_sd_loader_and_adheres_to_its_prompts():
    cfg = compose("model=shapes", "prompts=shapes")
    assert cfg.model.source == str(MODEL_DIR) and cfg.eval.adherence
    backbone = load_backbone(cfg.model)
    assert backbone.latent_shape() == (4, 16, 16) and not backbone.is_sdxl
    report = evaluate_adherence(seeds=8)
    assert report["adherence"] >= 0.90, report["per_caption"]
    assert report["position_std_px"] > 2.0  # one prompt, eight seeds: the shape moves


def test_judge_reward_prefers_the_prompted_attributes_and_is_differentiable():
    reward = JudgeReward(load_judge())
    image = shapes.render(torch.tensor([0]), torch.tensor([0]), torch.tensor([[16.0, 16.0]]), torch.tensor([7.0]))
    image = image.repeat(2, 1, 1, 1).requires_grad_()
    scores = reward(image, ["a red circle", "a blue square"])
    assert scores[0] > scores[1] and scores[0] > -0.1  # log p close to 0 for the right attributes
    (grad,) = torch.autograd.grad(scores.sum(), image)
    assert grad.abs().sum() > 0
    with pytest.raises(FrameworkError, match="only reads shapes-world prompts"):
        reward(image, ["a photo of a cat", "a dog"])


def test_training_command_smoke(tmp_path, monkeypatch):
    from framework.tools import train_testbed as train

    out, judge_out = tmp_path / "model", tmp_path / "judge.safetensors"
    monkeypatch.setattr(
        "sys.argv",
        [
            "train",
            "--out",
            str(out),
            "--judge-out",
            str(judge_out),
            "--vae-steps",
            "2",
            "--judge-steps",
            "2",
            "--unet-steps",
            "2",
            "--batch",
            "4",
            "--eval-seeds",
            "1",
        ],
    )
    train.main()
    report = json.loads((out / "training_report.json").read_text())
    assert 0 <= report["adherence"] <= 1 and 0 <= report["judge_accuracy"] <= 1
    assert set(report["per_caption"]) == set(shapes.all_captions())
    assert load_backbone(compose("model=shapes", f"model.source={out}").model).unet.dtype == torch.float32
    assert load_judge(judge_out) is not None
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) + judge_out.stat().st_size
    assert size < 20 * 2**20  # the shipped testbed must stay under 20 MB


def test_shipped_testbed_is_small_and_documented():
    files = [f for f in MODEL_DIR.rglob("*") if f.is_file()] + [JUDGE_FILE]
    assert sum(f.stat().st_size for f in files) < 20 * 2**20
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]  # safetensors only
    report = json.loads((MODEL_DIR / "training_report.json").read_text())
    assert report["adherence"] >= 0.90 and report["judge_accuracy"] >= 0.98 and report["train_minutes"] < 60


def test_default_run_reports_ground_truth_adherence_drift_and_a_grid(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("method.num_steps=5", "method.opt_steps=2", "prompts.limit=2", "logger=none", run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    assert "model=shapes" in result.stdout and "adherence" in result.stdout and "drift" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_ok"] == 2 and 0 <= summary["base_adherence_mean"] <= 1
    assert summary["final_drift_rmse_mean"] > 0
    record = json.loads((run_dir / "items" / "p0000_s000" / "record.json").read_text())
    assert {"reward", "adherence", "judge_log_prob", "gold", "drift_rmse"} <= set(record["steps"][1])
    assert (run_dir / "grid.png").stat().st_size > 0
    # What experiment specs may name (checked before anything runs) is what runs record.
    from framework.analysis.specs import ITEM_METRICS, SET_METRICS, STEP_KEYS

    assert set(record["metrics"]["final"]) | {"reward"} | set(record["compute"]) - {"peak_memory_kind"} <= set(
        ITEM_METRICS
    )
    assert set(record["steps"][1]) <= set(STEP_KEYS) and set(summary["sets"]) - {"win_rate_vs_base"} <= set(SET_METRICS)
