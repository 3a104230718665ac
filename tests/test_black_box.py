"""Black-box methods (MIRA-DPO, DNO zeroth-order): the reward is never differentiated, gradients still reach the
noise through the backbone, and the estimators point where their closed forms say."""

import pytest
import torch

from framework.config import ModelConfig
from framework.config.methods import DNOZeroOrderConfig, MIRAConfig, MIRADPOConfig
from framework.config.rewards import RewardConfig
from framework.core.errors import FrameworkError
from framework.methods import Item, Problem, build_method
from framework.methods.common import Start
from framework.methods.dno_zo import perturbed_candidates
from framework.rewards import Reward, build_reward

ITEM = Item(0, 0, "a red circle", 5)


class Spy(Reward):
    """A non-differentiable reward that records, on every call, whether autograd could reach it."""

    differentiable = False

    def __init__(self, inner: Reward):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, images, prompts):
        self.calls.append(torch.is_grad_enabled() or images.requires_grad)
        return self.inner(images.detach(), prompts)


class Linear(Reward):
    """r(x) = ⟨a, x⟩: its true image gradient is `a`, the reference for the estimators."""

    differentiable = False

    def __init__(self, shape):
        super().__init__()
        self.a = torch.randn(shape, generator=torch.Generator().manual_seed(3))

    def forward(self, images, prompts):
        return (images * self.a).flatten(1).sum(1)


def run(cfg, backbone, reward):
    with torch.enable_grad():
        return build_method(cfg, reward).run(Problem(backbone, reward, ITEM, cfg))[0]


@pytest.mark.parametrize(
    "cfg",
    [MIRADPOConfig(num_steps=3, opt_steps=2, mu=0.5), DNOZeroOrderConfig(num_steps=3, opt_steps=2, mu=0.5)],
    ids=["mira_dpo", "dno_zo"],
)
def test_reward_is_never_differentiated_but_the_noise_moves(tiny_sd, cfg):
    spy = Spy(build_reward(RewardConfig(name="jpeg")))
    result = run(cfg, tiny_sd, spy)
    assert spy.calls and not any(spy.calls)
    assert any(s["grad_norm"] > 0 for s in result.steps)
    assert (result.final_image - result.base_image).abs().max() > 0


def test_gradient_methods_still_refuse_black_box_rewards_but_these_accept_them():
    jpeg = build_reward(RewardConfig(name="jpeg"))
    for cfg in (MIRADPOConfig(), DNOZeroOrderConfig()):
        assert not cfg.follows_reward_gradients
    with pytest.raises(FrameworkError, match="method=mira_dpo, dno_zo or best_of_n"):
        build_method(MIRAConfig(), jpeg)


def image_gradient(cfg, backbone, reward):
    """d(reward term)/d(image) at the initial noise, and the candidates the method drew."""
    method, problem = build_method(cfg, reward), Problem(backbone, reward, ITEM, cfg)
    x_T, noises = problem.noise([ITEM.seed])
    images, traj = problem.render(x_T, noises)
    problem.start = Start.of(images, traj)  # z = z0, as the loop keeps its first pass
    images.requires_grad_()
    term, _, _ = method.reward_term(problem, images, traj, x_T, noises, step=0)
    (grad,) = torch.autograd.grad(term, images)
    candidates = tuple(t[0] for t in perturbed_candidates(problem, cfg, x_T, noises, step=0))  # the one item's
    return grad, candidates, images.detach()


def test_zeroth_order_estimate_descends_a_linear_reward(tiny_sd):
    reward = Linear((3, 64, 64))
    grad, (candidates, _, _), image = image_gradient(
        DNOZeroOrderConfig(num_steps=3, num_candidates=8, mu=0.5), tiny_sd, reward
    )
    # DNO's estimate from its definition: Σ_k (ℓ_k − ℓ_0)(x_k − x_0), ℓ = −⟨a, x⟩, normalised to unit length
    losses = -(candidates * reward.a).flatten(1).sum(1)
    direction = ((losses + (image[0] * reward.a).sum())[:, None, None, None] * (candidates - image[0])).sum(0)
    torch.testing.assert_close(grad[0], direction / direction.norm(), rtol=1e-4, atol=1e-6)
    assert (grad * reward.a).sum() < 0  # a loss gradient: against the reward's own gradient


def test_preference_gradient_at_z0_is_the_closed_form(tiny_sd):
    """At z = z0 the margin is 0, so d/dM(z) of −log σ(β_dpo·(Δ(x_w) − Δ(x_l))) = −½·β_dpo·(x_w − x_l)/(τ²·N)."""
    cfg = MIRADPOConfig(num_steps=3, num_candidates=6, mu=0.5, beta_dpo=2.0, tau=0.1)
    reward = Linear((3, 64, 64))
    grad, (candidates, _, rewards), image = image_gradient(cfg, tiny_sd, reward)
    winner, loser = candidates[rewards.argmax()], candidates[rewards.argmin()]
    expected = -0.5 * cfg.beta_dpo * (winner - loser) / (cfg.tau**2 * winner.numel())
    torch.testing.assert_close(grad[0], expected, rtol=1e-4, atol=1e-9)


def test_mira_dpo_raises_jpeg_compressibility_on_the_testbed():
    from framework.models import load_backbone
    from framework.testbed import MODEL_DIR

    backbone = load_backbone(ModelConfig(kind="sd", source=str(MODEL_DIR), resolution=32))
    spy = Spy(build_reward(RewardConfig(name="jpeg")))
    result = run(MIRADPOConfig(num_steps=6, opt_steps=12, lr=0.05, mu=0.1, num_candidates=4), backbone, spy)
    assert not any(spy.calls)
    assert result.final_reward > result.base_reward
