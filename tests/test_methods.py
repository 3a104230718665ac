import math

import numpy as np
import pytest
import torch
from conftest import REBATCHED

from framework.config.methods import BaseConfig, BestOfNConfig, DNOConfig
from framework.config.rewards import RewardConfig
from framework.core.errors import FrameworkError, NonFiniteLoss
from framework.methods import Item, Problem, build_method, derive_seed
from framework.methods.best_of_n import num_candidates
from framework.methods.dno import prob_regulariser
from framework.rewards import Reward, build_reward
from framework.runner.alignment import make_items

ITEM = Item(0, 0, "a photo of a cat", 1234)


@pytest.fixture(scope="module")
def brightness():
    return build_reward(RewardConfig(name="brightness"))


def run(method_cfg, backbone, reward, item=ITEM):
    return build_method(method_cfg, reward).run(Problem(backbone, reward, item, method_cfg))[0]


def test_dno_raises_brightness_in_10_steps(tiny_sd, brightness):
    result = run(DNOConfig(num_steps=5, opt_steps=10), tiny_sd, brightness)
    rewards = [s["reward"] for s in result.steps]
    assert len(rewards) == 10 and rewards[0] == pytest.approx(result.base_reward)
    assert result.final_reward > result.base_reward + 1e-4
    assert np.mean(np.diff(rewards + [result.final_reward]) > 0) >= 0.8  # climbs nearly every step
    assert all(s["grad_norm"] > 0 for s in result.steps)


def test_dno_base_image_is_the_plain_sample_of_the_seed(tiny_sd, brightness):
    cfg = DNOConfig(num_steps=4, opt_steps=2)
    dno, base = run(cfg, tiny_sd, brightness), run(BaseConfig(num_steps=4), tiny_sd, brightness)
    # DNO renders its first pass checkpointed and with gradients; the same float32 ops otherwise
    assert dno.base_reward == pytest.approx(base.final_reward, abs=1e-6)
    torch.testing.assert_close(dno.base_image, base.final_image, rtol=0, atol=1e-5)


def test_dno_optimize_x_T_climbs(tiny_sd, brightness):
    cfg = DNOConfig(num_steps=4, opt_steps=4, optimize="x_T", lr=0.05)
    result = run(cfg, tiny_sd, brightness)
    assert result.final_reward > result.base_reward


def test_gradient_method_refuses_a_non_differentiable_reward():
    with pytest.raises(FrameworkError, match="reward jpeg is not differentiable"):
        build_method(DNOConfig(), build_reward(RewardConfig(name="jpeg")))


class NaNReward(Reward):
    def forward(self, images, prompts):
        return images.mean((1, 2, 3)) * float("nan")


def test_a_nan_loss_fails_the_item_with_non_finite_loss(tiny_sd):
    result = run(DNOConfig(num_steps=3, opt_steps=2), tiny_sd, NaNReward())
    assert isinstance(result, NonFiniteLoss) and "non-finite loss (nan) at optimisation step 0" in str(result)


def numpy_block_log_prob(v: np.ndarray, d: int = 4) -> float:
    """DNO's concentration bounds written out in numpy: lp_mean + lp_cov of v cut into rows of d."""
    rows = v[: len(v) // d * d].reshape(-1, d)
    n = len(rows)
    mean, cov = rows.mean(0), rows.T @ rows / n
    lp_mean = min(-n * (mean**2).sum() / (2 * d), -math.log(2))
    delta = max(math.sqrt(1 + np.linalg.norm(cov - np.eye(d), ord=2)) - 1 - math.sqrt(d / n), 0)
    return lp_mean + min(-n * delta**2 / 2, -math.log(2))


def test_prob_regulariser_weights_the_original_order_as_dno_does():
    """R_prob = −(lp(v) + mean_k lp(π_k v)) against numpy with the same permutations. On noise with a lag-1
    correlation of 0.1 only the original order sees the correlation: DNO's weighting then reacts many times more
    than an average over the original order and the K permutations (weight 1/(K+1) each) would."""
    n, seeds = 4 * 16384, list(range(100))  # K = 100 permutations, as in DNO
    white = np.random.default_rng(0).standard_normal(n + 1)
    theta = 0.1  # MA(1): lag-1 correlation θ/(1 + θ²) ≈ 0.1, unit variance
    correlated = (white[1:] + theta * white[:-1]) / (1 + theta**2) ** 0.5
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(s)).numpy() for s in seeds]
    for v in (white[1:], correlated):
        own, permuted = numpy_block_log_prob(v), [numpy_block_log_prob(v[p]) for p in perms]
        ours = prob_regulariser(torch.from_numpy(v), 4, seeds).item()
        assert ours == pytest.approx(-(own + np.mean(permuted)), rel=1e-9)
    flat = prob_regulariser(torch.from_numpy(white[1:]), 4, seeds).item()
    assert flat == pytest.approx(4 * math.log(2), abs=0.5)  # Gaussian noise: (nearly) every bound at its cap
    raised = prob_regulariser(torch.from_numpy(correlated), 4, seeds).item()

    def diluted(v):
        return -np.mean([numpy_block_log_prob(v)] + [numpy_block_log_prob(v[p]) for p in perms])

    assert raised / flat > 5 and diluted(correlated) / diluted(white[1:]) < 1.5


def test_prob_regulariser_pushes_shifted_noise_back():
    gaussian = torch.randn(4 * 4096, generator=torch.Generator().manual_seed(1))
    shifted = (gaussian + 0.3).requires_grad_()
    pushed = prob_regulariser(shifted, 4, list(range(5)))
    assert pushed.item() > 10 * 4 * math.log(2)
    pushed.backward()
    assert (shifted.grad.mean() > 0).item()  # descending the gradient pulls the mean back towards 0


def test_r_prob_computed_in_chunks_of_permutations_equals_one_batch(monkeypatch):
    import framework.methods.dno as dno

    v = (torch.randn(4 * 256, generator=torch.Generator().manual_seed(3)) + 0.1).requires_grad_()
    whole = prob_regulariser(v, 4, list(range(7)))
    (whole_grad,) = torch.autograd.grad(whole, v)
    monkeypatch.setattr(dno, "PERMUTED_ENTRIES", 2 * v.numel())  # 2 permutations per call: 4 calls
    chunked = prob_regulariser(v, 4, list(range(7)))
    (chunked_grad,) = torch.autograd.grad(chunked, v)
    # other batch shapes of the same float32 maths (REBATCHED): the mean over 7 permutations summed in 4 chunks
    assert chunked.item() == pytest.approx(whole.item(), rel=REBATCHED) and whole.item() > 4 * math.log(2)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=REBATCHED, atol=REBATCHED * whole_grad.abs().max())


def test_dno_draws_fresh_permutations_per_step_unless_told_not_to(tiny_sd, brightness):
    method = build_method(DNOConfig(num_steps=3, gamma=1.0, num_permutations=3), brightness)
    shifted = torch.randn(4 * 256, generator=torch.Generator().manual_seed(2)) + 0.05
    fresh = [method.prob_regulariser(ITEM, shifted, step).item() for step in (0, 1, 0)]
    assert fresh[0] == fresh[2] != fresh[1]  # seeded from (item, step): reproducible, new at each step
    fixed = build_method(DNOConfig(num_steps=3, gamma=1.0, num_permutations=3, fresh_permutations=False), brightness)
    assert fixed.prob_regulariser(ITEM, shifted, 0).item() == fixed.prob_regulariser(ITEM, shifted, 1).item()


def test_dno_with_gamma_records_the_regulariser(tiny_sd, brightness):
    result = run(DNOConfig(num_steps=3, opt_steps=2, gamma=1.0, num_permutations=5), tiny_sd, brightness)
    assert all(s["regulariser"] >= 4 * math.log(2) - 1e-6 for s in result.steps)


def test_best_of_n_returns_the_best_of_its_candidates(tiny_sd):
    reward = build_reward(RewardConfig(name="aesthetic", tiny=True))
    cfg = BestOfNConfig(num_steps=3, n=5, batch_size=2)
    result = run(cfg, tiny_sd, reward)
    rewards = [s["reward"] for s in result.steps]
    assert len(rewards) == 5 and result.final_reward == max(rewards) and result.base_reward == rewards[0]
    assert len(set(result.info["candidate_seeds"])) == 5
    # Independently re-render the winner from its seed: same image, same reward.
    problem = Problem(tiny_sd, reward, ITEM, cfg)
    with torch.no_grad():
        images, _ = problem.render(*problem.noise([result.info["candidate_seeds"][result.info["best_index"]]]))
    torch.testing.assert_close(images[0], result.final_image, rtol=0, atol=1e-5)
    base = run(BaseConfig(num_steps=3), tiny_sd, reward)
    assert base.final_reward == pytest.approx(result.base_reward, abs=1e-5)


def test_compute_matched_best_of_n_spends_the_evaluations_of_the_gradient_steps(tiny_sd, brightness):
    """Counted by the backbone: N = 2K + 1 samples cost what K checkpointed DNO steps and their final sample cost."""
    assert num_candidates(BestOfNConfig(n=7)) == 7
    before = tiny_sd.num_evals
    run(DNOConfig(num_steps=3, opt_steps=4), tiny_sd, brightness)
    dno = tiny_sd.num_evals - before
    run(BestOfNConfig(num_steps=3, match_opt_steps=4), tiny_sd, brightness)
    assert tiny_sd.num_evals - before - dno == dno == 3 * num_candidates(BestOfNConfig(match_opt_steps=4))


def test_item_seeds_depend_only_on_global_seed_prompt_and_sample():
    items = make_items(["a", "b", "c"], seed=7, samples_per_prompt=2)
    assert [i.id for i in items] == ["p0000_s000", "p0000_s001", "p0001_s000", "p0001_s001", "p0002_s000", "p0002_s001"]
    assert all(i.seed == derive_seed(7, i.prompt_index, i.sample_index) for i in items)
    assert len({i.seed for i in items}) == 6
    assert make_items(["a", "b", "c", "d"], seed=7, samples_per_prompt=2)[:6] == items


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_steps_get_non_zero_finite_gradients(dtype):
    """A small reward (scale 1e-3) through a half-precision UNet and VAE: in float16 its input gradients underflow
    to exactly zero without loss scaling (checked below), so DNO scales the loss; bfloat16 has float32's range."""
    from framework.config import ModelConfig
    from framework.models import load_backbone

    backbone = load_backbone(ModelConfig(kind="sd", tiny=True, resolution=32, dtype=dtype))
    reward = build_reward(RewardConfig(name="brightness", scale=1e-3))
    result = run(DNOConfig(num_steps=3, opt_steps=2, optimize="x_T"), backbone, reward)
    assert all(math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0 for s in result.steps)
    assert not torch.equal(result.final_image, result.base_image)
    if dtype == "float16":  # the same backward without the scaler: nothing reaches the noise
        problem = Problem(backbone, reward, ITEM, DNOConfig(num_steps=3))
        x_T, noises = problem.noise([ITEM.seed])
        with torch.enable_grad():
            images, _ = problem.render(x_T.requires_grad_(), noises, checkpoint=True)
            problem.score(images).sum().backward()
        assert x_T.grad.abs().max() == 0


def test_the_held_out_stopping_rule_picks_the_step_its_reward_scores_best(tiny_sd, brightness):
    """Brightness optimised, darkness held out: `held_out_step` is the argmax of the recorded held-out values (the
    final noise counting as step opt_steps, measured here independently); best_held_out returns that step's image
    and reward instead of the last ones."""
    from framework.metrics import ImageMetrics

    darkness = build_reward(RewardConfig(name="darkness"))
    metrics = ImageMetrics(eval_rewards={"darkness": darkness})
    results = {}
    for select in ("last", "best_held_out"):
        cfg = DNOConfig(num_steps=3, opt_steps=4, lr=0.2, select=select)
        problem = Problem(tiny_sd, brightness, ITEM, cfg, metrics, held_out="darkness")
        (results[select],) = build_method(cfg, brightness).run(problem)
    last, chosen = results["last"], results["best_held_out"]
    score = lambda image: darkness(image.clamp(0, 1)[None], [ITEM.prompt]).item()  # noqa: E731
    values = [s["eval_darkness"] for s in last.steps] + [score(last.final_image)]
    step = int(np.argmax(values))
    assert last.info["held_out_step"] == chosen.info["held_out_step"] == step < cfg.opt_steps
    assert chosen.final_reward == pytest.approx(last.steps[step]["reward"]) != last.final_reward
    assert score(chosen.final_image) == pytest.approx(values[step], abs=1e-5) and values[step] > values[-1]
