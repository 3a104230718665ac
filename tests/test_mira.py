"""MIRA: zero surrogate at z0, its loop against its definition written out, no extra model evaluations, per-step KL
weights."""

from types import SimpleNamespace

import pytest
import torch
from conftest import REBATCHED, REBATCHED_PIXELS
from torch.distributions import Normal, kl_divergence

from framework.config.methods import DNOConfig, MIRAConfig
from framework.config.rewards import RewardConfig
from framework.methods import Item, Problem, build_method
from framework.methods.common import Start
from framework.models.sampling import ddim_coefficients, kl_weights, sampler_steps
from framework.rewards import build_reward

ITEM = Item(0, 0, "a red circle", 77)


@pytest.fixture(scope="module")
def brightness():
    return build_reward(RewardConfig(name="brightness"))


def run(cfg, backbone, reward):
    before = backbone.num_evals
    result = build_method(cfg, reward).run(Problem(backbone, reward, ITEM, cfg))[0]
    return result, backbone.num_evals - before


def test_surrogate_and_its_gradient_are_zero_at_the_initial_noise(tiny_sd, brightness):
    cfg = MIRAConfig(num_steps=4, beta=1.0)
    mira, problem = build_method(cfg, brightness), Problem(tiny_sd, brightness, ITEM, cfg)
    x_T, noises = problem.noise([ITEM.seed])
    x_T.requires_grad_()
    with torch.enable_grad():
        images, traj = problem.render(x_T, noises, checkpoint=True)
        problem.start = Start.of(images, traj)  # as the loop keeps its first pass
        value = mira.regulariser(problem, x_T.flatten(), traj, step=0)
        (grad,) = torch.autograd.grad(value, x_T)
    assert value.item() == 0 and grad.abs().max().item() == 0
    with torch.enable_grad():  # away from z0 it is positive
        _, moved = problem.render(x_T + 0.5, noises, checkpoint=True)
        assert mira.regulariser(problem, x_T.flatten(), moved, step=1).item() > 0


def hand_written_mira(backbone, cfg, beta: float) -> tuple[list[float], list[float], torch.Tensor]:
    """MIRA on x_T written out from its definition, sharing only the sampler and the decoder: AdamW on
    −mean pixel + β·(1/S)·Σ_t mean((ε̂_t − ε̂_t^(z0))²), gradient-norm clipping. Per step its reward and regulariser,
    and the final image."""
    from framework.models.sampling import sample

    problem = Problem(backbone, None, ITEM, cfg)
    x_T, noises = problem.noise()
    x = x_T.clone().requires_grad_()
    optimizer = torch.optim.AdamW([x], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = dict(num_steps=cfg.num_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale)
    rewards, regularisers, reference = [], [], None
    for _ in range(cfg.opt_steps):
        traj = sample(backbone, problem.cond, x, noises, **sampler)
        reference = reference or [p.detach() for p in traj.predictions]
        reward = backbone.decode(traj.latents).mean()  # brightness of the raw decoder output
        regulariser = torch.stack([(p - q).square().mean() for p, q in zip(traj.predictions, reference)]).mean()
        optimizer.zero_grad()
        (-reward + beta * regulariser).backward()
        torch.nn.utils.clip_grad_norm_([x], cfg.grad_clip)
        optimizer.step()
        rewards.append(reward.item())
        regularisers.append(regulariser.item())
    with torch.no_grad():
        return rewards, regularisers, backbone.decode(sample(backbone, problem.cond, x, noises, **sampler).latents)[0]


def test_mira_takes_the_steps_of_its_definition_written_out(tiny_sd, brightness):
    """The method's loop (its items' noise and optimiser, the reference kept from the first pass, the loss, clipping,
    checkpointing) against a loop written from the formula. Checkpointing recomputes the same float operations, so
    the two agree to float rounding; β matters here (the regulariser changes the third step)."""
    cfg = MIRAConfig(num_steps=4, opt_steps=3, beta=50.0, lr=0.05, optimize="x_T")
    mira, _ = run(cfg, tiny_sd, brightness)
    rewards, regularisers, final = hand_written_mira(tiny_sd, cfg, cfg.beta)
    assert [s["reward"] for s in mira.steps] == pytest.approx(rewards, abs=REBATCHED)
    assert [s["regulariser"] for s in mira.steps] == pytest.approx(regularisers, abs=REBATCHED)
    torch.testing.assert_close(mira.final_image, final, rtol=0, atol=REBATCHED_PIXELS)
    unregularised, _, _ = hand_written_mira(tiny_sd, cfg, 0.0)
    assert abs(unregularised[2] - rewards[2]) > 100 * REBATCHED and regularisers[2] > 0


def test_mira_costs_no_model_evaluation_more_than_dno(tiny_sd, brightness):
    common = dict(num_steps=4, opt_steps=3, optimize="x_T")
    mira, mira_evals = run(MIRAConfig(beta=1.0, **common), tiny_sd, brightness)
    _, dno_evals = run(DNOConfig(gamma=0.0, **common), tiny_sd, brightness)
    assert mira_evals == dno_evals
    assert mira.steps[0]["regulariser"] == 0 and mira.steps[-1]["regulariser"] > 0


def test_cond_surrogate_compares_the_conditional_branch_of_the_same_evaluation(tiny_sd, brightness):
    cfg = MIRAConfig(num_steps=3, beta=1.0, surrogate_guidance="cond")
    mira, problem = build_method(cfg, brightness), Problem(tiny_sd, brightness, ITEM, cfg)
    x_T, noises = problem.noise([ITEM.seed])
    images, reference = problem.render(x_T, noises)
    problem.start = Start.of(images, reference)
    _, moved = problem.render(x_T + 0.5, noises)
    assert mira.regulariser(problem, x_T.flatten(), reference, step=0).item() == 0
    value = mira.regulariser(problem, x_T.flatten(), moved, step=1).item()
    cond = problem.cond
    expected = (
        torch.stack(
            [
                (tiny_sd.predict(x, t, cond, 1.0) - tiny_sd.predict(r, t, cond, 1.0)).square().mean()
                for x, r, t in zip(moved.x, reference.x, moved.timesteps)
            ]
        )
        .mean()
        .item()
    )
    assert value == pytest.approx(expected, rel=1e-4)
    guided_value = build_method(MIRAConfig(num_steps=3, beta=1.0), brightness)
    assert guided_value.regulariser(problem, x_T.flatten(), moved, step=1).item() != pytest.approx(value, rel=1e-2)


def test_girsanov_weight_is_the_closed_form_kl_of_one_ddim_step():
    """Two ε̂ at the same x_t: the DDIM transitions N(μ_i, σ²I) differ by c·Δε, so KL = c²‖Δε‖²/(2σ²)."""
    alpha, alpha_prev, eta = 0.3, 0.5, 0.8
    x = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps1, eps2 = (torch.randn(16, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (1, 2))
    sigma, _ = ddim_coefficients(alpha, alpha_prev, eta)

    def mean(eps):  # the DDIM update without its noise term, written out independently
        x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        return alpha_prev**0.5 * x0 + (1 - alpha_prev - sigma**2) ** 0.5 * eps

    backbone = SimpleNamespace(flow_matching=False, schedule=lambda n: [(0, alpha, alpha_prev)])
    (step,) = sampler_steps(backbone, 1, eta)
    torch.testing.assert_close(step.update(x, eps1)[1], mean(eps1))
    kl = kl_divergence(Normal(mean(eps1), sigma), Normal(mean(eps2), sigma)).sum()
    (weight,) = kl_weights([step])
    assert (weight * (eps1 - eps2).square().sum()).item() == pytest.approx(kl.item(), rel=1e-9)


def test_mira_on_the_testbed_raises_reward_and_drifts_less_than_dno():
    """Same budget, same seed: the image-space surrogate keeps the image closer to the base sample."""
    from framework.config import ModelConfig
    from framework.models import load_backbone
    from framework.testbed import MODEL_DIR

    backbone = load_backbone(ModelConfig(kind="sd", source=str(MODEL_DIR), resolution=32))
    reward = build_reward(RewardConfig(name="brightness"))
    common = dict(num_steps=6, opt_steps=15, lr=0.05, optimize="x_T")
    mira, _ = run(MIRAConfig(beta=50.0, weighting="girsanov", **common), backbone, reward)
    dno, _ = run(DNOConfig(**common), backbone, reward)
    assert mira.final_reward > mira.base_reward
    assert mira.steps[-1]["drift_rmse"] < dno.steps[-1]["drift_rmse"]
