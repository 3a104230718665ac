"""Metrics against independent computations: numpy CMMD, closed-form Vendi scores, eigenvalues, bootstrap sanity,
and the per-image metrics against the models they wrap."""

import numpy as np
import pytest
import torch

from framework.config import EvalConfig, ModelConfig
from framework.config.rewards import RewardConfig
from framework.core.errors import FrameworkError
from framework.core.records import ItemRecord
from framework.metrics import ImageMetrics, build_metrics
from framework.metrics.sets import (
    cmmd,
    log_spectral_distance,
    mean_pairwise_distance,
    spectral_distance,
    vendi_score,
    win_rate,
)
from framework.rewards import build_reward, load_named_reward
from framework.testbed.judge import load_judge


def embeddings(n, d=16, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def numpy_cmmd(x, y, sigma=10.0):
    """The CMMD reference's formulas: means of exp(−γ‖a − b‖²) over all pairs, written with explicit loops."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def mean_kernel(a, b):
        return np.mean([[np.exp(-np.sum((u - v) ** 2) / (2 * sigma**2)) for v in b] for u in a])

    return 1000 * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))


def test_cmmd_is_zero_for_identical_sets_and_matches_numpy():
    x, y = embeddings(12), embeddings(9, seed=1) * 3
    assert cmmd(x, x.clone()) == 0
    assert cmmd(x, y) == pytest.approx(numpy_cmmd(x, y), rel=1e-9)
    assert cmmd(x, y) > 0


def test_spectral_distances_are_zero_for_identical_sets_symmetric_and_match_eigenvalues():
    x, y = embeddings(20), embeddings(15, seed=2) * 2
    assert spectral_distance(x, x.clone()) == 0 and log_spectral_distance(x, x.clone()) == 0
    assert spectral_distance(x, y) == pytest.approx(spectral_distance(y, x))
    assert log_spectral_distance(x, y) == pytest.approx(log_spectral_distance(y, x))
    spectra = [np.sort(np.linalg.eigvalsh(np.cov(np.asarray(s, np.float64).T)))[::-1].clip(0) for s in (x, y)]
    assert spectral_distance(x, y) == pytest.approx(np.linalg.norm(spectra[0] - spectra[1]), rel=1e-9)
    # a set scaled by 2 has every covariance eigenvalue ×4: log-spectral distance √rank · log 4 (rank = D = 16)
    assert log_spectral_distance(x, 2 * x) == pytest.approx(np.sqrt(16) * np.log(4), rel=1e-6)


def test_vendi_score_counts_distinct_items():
    assert vendi_score(embeddings(1).repeat(7, 1)) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(torch.eye(5) * 3) == pytest.approx(5.0, rel=1e-9)
    assert vendi_score(torch.cat([torch.eye(3), torch.eye(3)])) == pytest.approx(3.0, rel=1e-9)  # 3 pairs


def test_mean_pairwise_distance():
    assert mean_pairwise_distance(torch.eye(4)) == pytest.approx(1.0)
    assert mean_pairwise_distance(embeddings(1).repeat(3, 1)) == pytest.approx(0.0, abs=1e-12)


def test_win_rate_against_itself_is_one_half_and_the_interval_covers_the_rate():
    rng = np.random.default_rng(0)
    scores, prompts = rng.normal(size=60), np.repeat(np.arange(20), 3)
    assert win_rate(scores, scores, prompts) == (0.5, 0.5, 0.5)
    better = scores + rng.normal(0.3, 1.0, size=60)
    rate, low, high = win_rate(better, scores, prompts)
    assert rate == pytest.approx(np.mean(better > scores)) and low < rate < high
    assert win_rate(scores + 1, scores, prompts) == (1.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def testbed_images():
    from framework.testbed.shapes import parse_caption, sample

    colors, shapes = zip(*(parse_caption(c) for c in ("a red circle", "a blue square")))
    return sample(2, torch.Generator().manual_seed(0), torch.tensor(colors), torch.tensor(shapes)).images


def test_image_metrics_with_judge_features_and_held_out_rewards(testbed_images):
    import io

    from PIL import Image

    metrics = ImageMetrics(load_judge(), "judge", eval_rewards={"jpeg": build_reward(RewardConfig(name="jpeg"))})
    images = testbed_images[:1]
    (same,) = metrics(images, ["a red circle"], images.clone())
    assert same["drift_rmse"] == 0 and same["drift_embedding"] == pytest.approx(0, abs=1e-6)
    assert same["adherence"] == 1.0
    buffer = io.BytesIO()  # independent: PIL's own JPEG size of the 8-bit image, in kB
    Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buffer, "JPEG", quality=95
    )
    assert same["eval_jpeg"] == pytest.approx(-buffer.tell() / 1000)
    (other,) = metrics(testbed_images[1:], ["a red circle"], images)
    assert other["drift_embedding"] > 0.01 and other["adherence"] == 0.0
    rmse = ((testbed_images[1] - images[0]) ** 2).mean().sqrt().item()
    assert other["drift_rmse"] == pytest.approx(rmse, rel=1e-6)


def test_clip_features_and_clipscore_from_a_local_clip_directory(clip_dir):
    from transformers import CLIPModel

    from framework.core.tokenizer import build_clip_tokenizer
    from framework.rewards import clip_preprocess

    metrics = build_metrics(EvalConfig(features="clip", clip=str(clip_dir), cmmd_clip="none"), ModelConfig(kind="sd"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    records = metrics(images, ["a cat"] * 2, images.flip(0))
    values = {key: np.mean([r[key] for r in records]) for key in records[0]}
    # Independent: CLIPModel's own forward (projected embeddings, logits = logit_scale·cos) and its image features.
    clip = CLIPModel.from_pretrained(clip_dir)
    tokens = build_clip_tokenizer()(["a cat"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = clip(**tokens, pixel_values=clip_preprocess(images, 32))
    cos = out.logits_per_image[:, 0] / clip.logit_scale.exp()
    assert values["clipscore"] == pytest.approx((100 * cos).clamp_min(0).mean().item(), rel=1e-4)
    embeds = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    assert embeds.shape[-1] == 24  # the projection, not the width
    expected = (1 - (embeds * embeds.flip(0)).sum(-1)).mean().item()
    assert values["drift_embedding"] == pytest.approx(expected, rel=1e-4) and values["drift_embedding"] > 0


def test_feature_choice_follows_the_model_and_missing_clip_is_one_clear_error():
    assert build_metrics(EvalConfig(adherence=True), ModelConfig(kind="sd")).features == "judge"
    assert build_metrics(EvalConfig(), ModelConfig(kind="sd", tiny=True)).features is None
    with pytest.raises(FrameworkError, match="eval.clip: weights for .openai/clip-vit-large-patch14. are not in"):
        build_metrics(EvalConfig(), ModelConfig(kind="sd"))
    with pytest.raises(FrameworkError, match="no reward config 'hpsv9'; choose from: aesthetic"):
        load_named_reward("hpsv9")


def test_set_metrics_of_a_run(testbed_images):
    metrics = ImageMetrics(load_judge(), "judge")
    images = {"base": testbed_images[[0, 0, 1, 1]], "final": testbed_images[[0, 1, 1, 1]]}
    records = [
        ItemRecord(str(i), i // 2, i % 2, "p", i, "ok", base_reward=0.0, final_reward=f)
        for i, f in enumerate([1, 0, -1, 1])
    ]
    out = metrics.set_metrics(records, lambda record, kind: images[kind][int(record.id)])
    assert out["win_rate_vs_base"]["rate"] == pytest.approx(0.625)
    assert out["cmmd_judge"] > 0 and "cmmd" not in out and out["spectral_distance"] > 0
    assert out["base_diversity_vendi"] == pytest.approx(1.0, abs=1e-6)  # two identical seeds per prompt
    assert out["final_diversity_vendi"] > 1.2 and out["final_diversity_pairwise"] > 0


def test_cmmd_uses_its_own_clip_when_features_are_clip(clip_dir, tmp_path):
    """CMMD as published reads ViT-L/14-336 embeddings, not the drift features' CLIP: with two different CLIPs the
    set's CMMD equals numpy CMMD of the second one's image embeddings (from CLIPModel's own forward)."""
    from transformers import CLIPModel

    from framework.rewards import clip_preprocess
    from framework.rewards.clip import tiny_clip_config

    torch.manual_seed(9)
    CLIPModel(tiny_clip_config()).save_pretrained(tmp_path / "cmmd_clip")
    metrics = build_metrics(
        EvalConfig(features="clip", clip=str(clip_dir), cmmd_clip=str(tmp_path / "cmmd_clip")), ModelConfig(kind="sd")
    )
    images = {
        "base": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
        "final": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
    }
    records = [ItemRecord(str(i), i, 0, "p", i, "ok", base_reward=0.0, final_reward=1.0) for i in range(4)]
    out = metrics.set_metrics(records, lambda record, kind: images[kind][int(record.id)])
    reference = CLIPModel.from_pretrained(tmp_path / "cmmd_clip")
    with torch.no_grad():
        embeds = {
            k: torch.nn.functional.normalize(
                reference.get_image_features(pixel_values=clip_preprocess(v, 32)).pooler_output, dim=-1
            )
            for k, v in images.items()
        }
    assert out["cmmd"] == pytest.approx(numpy_cmmd(embeds["final"], embeds["base"]), rel=1e-4)
    with pytest.raises(FrameworkError, match=r"eval\.cmmd_clip: weights for 'openai/clip-vit-large-patch14-336'"):
        build_metrics(EvalConfig(features="clip", clip=str(clip_dir)), ModelConfig(kind="sd"))
