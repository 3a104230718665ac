"""The analytic Gaussian-mixture backbone: exact ε, and the shared DDIM sampler recovering the mixture."""

import pytest
import torch

from framework.models.gmm import GaussianMixtureBackbone
from framework.models.sampling import sample


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixtureBackbone.random(["left", "right"], dim=3, components=2, spread=3.0, seed=1)


@pytest.mark.parametrize("t", [1, 250, 600, 999])
def test_eps_is_minus_sqrt_one_minus_alpha_times_the_autograd_score(gmm, t):
    alpha = float(gmm.scheduler.alphas_cumprod[t])
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(t), dtype=torch.float32) * 2
    for selector in (gmm.encode(["left"] * 5).embeds, torch.zeros(5, 2)):  # conditional and unconditional
        x_ = x.clone().requires_grad_()
        (score,) = torch.autograd.grad(gmm.log_prob_t(x_, alpha, selector).sum(), x_)
        cond = gmm.encode(["left"] * 5)
        cond.embeds = selector
        torch.testing.assert_close(gmm.predict(x, t, cond, 1.0), -((1 - alpha) ** 0.5) * score, rtol=1e-4, atol=1e-5)


def test_cfg_combines_conditional_and_unconditional(gmm):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    cond = gmm.encode(["right"] * 4)
    conditional, guided = gmm.predict(x, 500, cond, 1.0), gmm.predict(x, 500, cond, 3.0)
    cond.embeds = cond.uncond_embeds
    unconditional = gmm.predict(x, 500, cond, 1.0)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional))


def test_ddim_reproduces_the_mixture_weights_and_moments(gmm):
    """4000 DDIM samples (η = 1, 200 steps) of one class against its closed-form mixture; tolerances cover the
    Monte-Carlo error (~0.01 on weights). η = 1 because SD's schedule ends at ᾱ_T ≈ 0.005, not 0: from x_T ~ N(0, I)
    the deterministic η = 0 sampler keeps that mismatch and misplaces ~5 % of the mass between modes (measured: 0.468
    vs 0.522 at 500 steps), while η = 1's injected noise washes it out."""
    n, c = 4000, gmm.classes.index("right")
    x_T = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    noises = torch.randn(200, n, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x0 = sample(gmm, gmm.encode(["right"] * n), x_T, noises, num_steps=200, eta=1.0).latents
    nearest = (x0[:, None, :] - gmm.means[c][None]).square().sum(-1).argmin(1)
    for k in range(2):
        members = x0[nearest == k]
        assert len(members) / n == pytest.approx(gmm.weights[c, k].item(), abs=0.03)
        torch.testing.assert_close(members.mean(0), gmm.means[c, k], atol=0.1, rtol=0)
        assert members.std(0).mean().item() == pytest.approx(gmm.stds[c, k].item(), rel=0.1)
    assert gmm.log_prob(x0[:100], ["right"] * 100).mean() > gmm.log_prob(x0[:100], ["left"] * 100).mean() + 5


def test_unknown_class_is_refused(gmm):
    with pytest.raises(ValueError, match="unknown class 'up'"):
        gmm.encode(["up"])


def test_dno_runs_on_the_mixture_and_its_drift_has_an_exact_likelihood(gmm):
    """Pushing the mean coordinate up (toy 'brightness') moves samples off the class: exact log p falls."""
    from framework.config.methods import DNOConfig
    from framework.config.rewards import RewardConfig
    from framework.methods import Item, Problem, build_method
    from framework.rewards import build_reward

    reward, cfg = build_reward(RewardConfig(name="brightness")), DNOConfig(num_steps=20, opt_steps=30, lr=0.1)
    result = build_method(cfg, reward).run(Problem(gmm, reward, Item(0, 0, "left", 3), cfg))[0]
    assert result.final_reward > result.base_reward + 0.3
    assert result.steps[-1]["drift_rmse"] > 0.1
    log_p = gmm.log_prob(torch.stack([result.base_image, result.final_image]), ["left", "left"])
    assert log_p[1] < log_p[0]


# Every per-item method on the mixture, against closed forms. With one Gaussian component per class, N(μ, s²I), no
# CFG and η = 0, ε is linear in x, each DDIM step maps x_t − √ᾱ_t μ to g_t·(x_t − √ᾱ_t μ) one step later, and the
# whole sampler is affine in x_T (the gains below are written from the Gaussian's exact ε, not from the sampler's
# code). AIG and LoRA scaling need adapters: not here.

S, MU, STD = 10, torch.tensor([[[1.5, -0.5, 0.25]], [[-2.0, 1.0, 0.5]]]), 0.6
COMMON = dict(num_steps=S, eta=0.0, guidance_scale=1.0)


@pytest.fixture(scope="module")
def gaussian():
    return GaussianMixtureBackbone(["left", "right"], MU, torch.full((2, 1), STD), torch.ones(2, 1))


def step_gains(backbone):
    """[(a_t, k_t)] per step with x_t − √ᾱ_t μ = a_t (x_T − √ᾱ_T μ) and ε̂_t = k_t (x_t − √ᾱ_t μ), k_t = √(1−ᾱ_t)/var_t;
    and the sampler as a function of x_T."""
    schedule = backbone.schedule(S)
    a, gains = 1.0, []
    for _, alpha, alpha_prev in schedule:
        var = alpha * STD**2 + 1 - alpha
        gains.append((a, (1 - alpha) ** 0.5 / var))
        a *= alpha_prev**0.5 * (1 - (1 - alpha) / var) / alpha**0.5 + ((1 - alpha_prev) * (1 - alpha)) ** 0.5 / var
    first, last = schedule[0][1], schedule[-1][2]
    return gains, lambda x_T: last**0.5 * MU[0, 0] + a * (x_T - first**0.5 * MU[0, 0])


def solve(gaussian, cfg, reward, seed=3):
    from framework.methods import Item, Problem, build_method

    problem = Problem(gaussian, reward, Item(0, 0, "left", seed), cfg)
    return build_method(cfg, reward).run(problem)[0], problem


@pytest.fixture(scope="module")
def brightness():
    from framework.config.rewards import RewardConfig
    from framework.rewards import build_reward

    return build_reward(RewardConfig(name="brightness"))


def test_base_and_best_of_n_sample_the_closed_form(gaussian, brightness):
    from framework.config.methods import BaseConfig, BestOfNConfig

    _, sampler = step_gains(gaussian)
    result, problem = solve(gaussian, BaseConfig(**COMMON), brightness)
    x_T, _ = problem.noise([problem.items[0].seed])
    torch.testing.assert_close(result.final_image, sampler(x_T[0]), rtol=1e-5, atol=1e-5)
    best, problem = solve(gaussian, BestOfNConfig(n=6, batch_size=4, **COMMON), brightness)
    outputs = [sampler(problem.noise([s])[0][0]) for s in best.info["candidate_seeds"]]
    expected = max(range(6), key=lambda k: outputs[k].mean().item())
    assert best.info["best_index"] == expected
    torch.testing.assert_close(best.final_image, outputs[expected], rtol=1e-5, atol=1e-5)


def test_dno_and_mira_steps_follow_adam_through_the_linear_sampler(gaussian, brightness):
    """Step 0's gradient of −mean(x_0) is the same negative number on every coordinate, so AdamW's first step is
    z·(1 − lr·wd) + lr. MIRA's surrogate has zero gradient at z0, so its first step is the same; after it, R_MIRA has
    the closed form (1/S) Σ_t (a_t k_t)² · mean((z1 − z0)²)."""
    from framework.config.methods import DNOConfig, MIRAConfig

    gains, sampler = step_gains(gaussian)
    lr, wd = 0.1, 0.01
    dno, problem = solve(gaussian, DNOConfig(opt_steps=1, lr=lr, weight_decay=wd, optimize="x_T", **COMMON), brightness)
    z0 = problem.noise([problem.items[0].seed])[0][0]
    z1 = z0 * (1 - lr * wd) + lr
    torch.testing.assert_close(dno.final_image, sampler(z1), rtol=1e-5, atol=1e-5)
    assert dno.final_reward == pytest.approx(sampler(z1).mean().item(), rel=1e-5)
    mira, _ = solve(gaussian, MIRAConfig(opt_steps=2, lr=lr, weight_decay=wd, beta=1.0, **COMMON), brightness)
    expected = sum((a * k) ** 2 for a, k in gains) / S * (z1 - z0).square().mean().item()
    assert mira.steps[0]["regulariser"] == 0
    assert mira.steps[1]["regulariser"] == pytest.approx(expected, rel=1e-4)


def reward_term_gradient(gaussian, cfg, reward):
    """d(reward term)/d(sample) at the initial noise, and the candidates the method drew."""
    from framework.methods import Item, Problem, build_method
    from framework.methods.common import Start
    from framework.methods.dno_zo import perturbed_candidates

    method, problem = build_method(cfg, reward), Problem(gaussian, reward, Item(0, 0, "left", 3), cfg)
    x_T, noises = problem.noise([problem.items[0].seed])
    samples, traj = problem.render(x_T, noises)
    problem.start = Start.of(samples, traj)  # z = z0, as the loop keeps its first pass
    samples.requires_grad_()
    with torch.enable_grad():
        term, _, _ = method.reward_term(problem, samples, traj, x_T, noises, step=0)
        (grad,) = torch.autograd.grad(term, samples)
    candidates, _, rewards = (t[0] for t in perturbed_candidates(problem, cfg, x_T, noises, step=0))
    return grad[0], samples.detach()[0], candidates, rewards


def test_zeroth_order_direction_on_vectors(gaussian, brightness):
    """ĝ = Σ_k (r_0 − r_k)(x_k − x_0), normalised, on [K, d] samples (the per-candidate weight must not broadcast
    across coordinates)."""
    from framework.config.methods import DNOZeroOrderConfig

    grad, x0, candidates, rewards = reward_term_gradient(
        gaussian, DNOZeroOrderConfig(num_candidates=5, mu=0.3, **COMMON), brightness
    )
    r0 = x0.mean()
    direction = sum((r0 - r) * (x - x0) for r, x in zip(rewards, candidates))
    torch.testing.assert_close(grad, direction / direction.norm(), rtol=1e-5, atol=1e-6)


def test_preference_gradient_on_vectors(gaussian, brightness):
    """MIRA-DPO at z0: −½·β_dpo·(x_w − x_l)/(τ²·d) on vector samples."""
    from framework.config.methods import MIRADPOConfig

    cfg = MIRADPOConfig(num_candidates=5, mu=0.3, beta_dpo=2.0, tau=0.1, **COMMON)
    grad, _, candidates, rewards = reward_term_gradient(gaussian, cfg, brightness)
    winner, loser = candidates[rewards.argmax()], candidates[rewards.argmin()]
    torch.testing.assert_close(grad, -0.5 * cfg.beta_dpo * (winner - loser) / (cfg.tau**2 * 3), rtol=1e-4, atol=1e-7)
