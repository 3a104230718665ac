"""The differentiable samplers: the one place that knows their updates.

Two families share one loop. ε-prediction models (SD1.x, SDXL) step with DDIM on their training schedule; flow-
matching models (SD3.x, FLUX.1) step with Euler on their velocity, the ODE dx/dσ = v turned into an SDE for
stochastic sampling as Flow-GRPO does (arXiv 2505.05470). Every step is linear in (x_t, prediction, ξ):

    x_next = mean(x_t, p̂) + std·ξ,     mean = a·x_t + c·p̂,

p̂ the model's own prediction (ε̂ or v̂). That makes the per-step Gaussian KL between two predictions at the same x_t
the same closed form for both families, c²‖Δp̂‖²/(2 std²) (`kl_weights`).

Noises are explicit arguments (the initial noise and one ξ per stochastic step) so methods can optimise them and two
trajectories can share them. At η = 0 the samplers reproduce diffusers' pipelines numerically. Memory stays flat in
the number of steps with `checkpoint=True` (only each step's input x_t is kept; the model is re-run during
backward), and `grad_steps=K` backpropagates through the last K steps only (DRaFT-K style truncation).

DDIM (ᾱ_t the cumulative signal rate, ᾱ' that of the next step):
    x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t;  std = η √((1−ᾱ')/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ');  mean = √ᾱ' x̂0 + √(1−ᾱ'−std²) ε̂.

Flow matching (x_σ = (1−σ) x0 + σ ε, v = ε − x0, σ from 1 to 0 with the model's timestep shift, Δ = σ' − σ < 0).
The probability-flow ODE dx = v dσ has the same marginals as the reverse SDE
    dx = [v + s²/(2σ)·(x + (1−σ) v)] dσ + s √(−dσ) ξ,   s = η √(σ/(1−σ))
(the score being −(x + (1−σ) v)/σ); one Euler–Maruyama step gives
    x̂0 = x − σ v̂;  std = s √(−Δ);  mean = x·(1 + s²Δ/(2σ)) + v̂·(1 + s²(1−σ)/(2σ))·Δ,
which is diffusers' Euler step x + Δ·v̂ at η = 0. At σ = 1, where σ/(1−σ) is infinite, s uses the next step's σ in
the denominator (Flow-GRPO's convention), so the first step is stochastic and finite.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as checkpointed

from framework.models import Backbone, Cond


@dataclass
class Trajectory:
    """What one sampler run produced, step by step (noisiest first), for regularisers and metrics to reuse."""

    latents: Tensor  # final x_0
    timesteps: list[float] = field(default_factory=list)
    x: list[Tensor] = field(default_factory=list)  # x_t fed to the model
    predictions: list[Tensor] = field(default_factory=list)  # the (guided) ε̂ or v̂ that drove the update
    cond_predictions: list[Tensor] = field(default_factory=list)  # its conditional branch (same evaluation)
    x0_pred: list[Tensor] = field(default_factory=list)

    def reference(self) -> "Trajectory":
        """What later passes are compared with, cut from the autograd graph: the final latents and the predictions
        (x_t and x̂0 per step are left out, so keeping a reference costs what the predictions cost)."""
        cut = lambda tensors: [t.detach() for t in tensors]  # noqa: E731
        return Trajectory(
            self.latents.detach(),
            list(self.timesteps),
            predictions=cut(self.predictions),
            cond_predictions=cut(self.cond_predictions),
        )


@dataclass(frozen=True)
class Step:
    """One sampler step from x_t: the model's timestep input `t`, the std of the injected ξ and the coefficient c of
    the prediction in the step's mean; `signal` and `noise` give the marginal x_t = signal·x0 + noise·ε."""

    t: float
    std: float
    pred_coef: float

    @property
    def signal(self) -> float:
        raise NotImplementedError

    @property
    def noise(self) -> float:
        raise NotImplementedError

    def update(self, x: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂0, mean of x_next)."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class DDIMStep(Step):
    alpha: float
    alpha_prev: float

    @property
    def signal(self) -> float:
        return self.alpha**0.5

    @property
    def noise(self) -> float:
        return (1 - self.alpha) ** 0.5

    def update(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        x0 = (x - (1 - self.alpha) ** 0.5 * eps) / self.alpha**0.5
        return x0, self.alpha_prev**0.5 * x0 + (1 - self.alpha_prev - self.std**2) ** 0.5 * eps


@dataclass(frozen=True, kw_only=True)
class FlowStep(Step):
    sigma: float
    sigma_next: float
    diffusion: float  # s of the SDE at σ (0: the ODE step)

    @property
    def signal(self) -> float:
        return 1 - self.sigma

    @property
    def noise(self) -> float:
        return self.sigma

    def update(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """At s = 0 the mean is x·1 + v·(σ'−σ): diffusers' Euler step, bit for bit."""
        drift = self.diffusion**2 * (self.sigma_next - self.sigma) / (2 * self.sigma)
        return x - self.sigma * v, x * (1 + drift) + v * self.pred_coef


def ddim_coefficients(alpha: float, alpha_prev: float, eta: float) -> tuple[float, float]:
    """std of a DDIM step and the coefficient of ε̂ in its mean μ = a·x_t + c·ε̂ (with x̂0 substituted):
    c = √(1−ᾱ_prev−std²) − √ᾱ_prev·√(1−ᾱ_t)/√ᾱ_t."""
    sigma = eta * ((1 - alpha_prev) / (1 - alpha)) ** 0.5 * (1 - alpha / alpha_prev) ** 0.5
    return sigma, (1 - alpha_prev - sigma**2) ** 0.5 - (alpha_prev / alpha) ** 0.5 * (1 - alpha) ** 0.5


def flow_coefficients(sigma: float, sigma_next: float, eta: float, sigma_after_first: float) -> tuple[float, ...]:
    """(s, std, c) of one stochastic Euler step of the flow SDE: s = η √(σ/(1−σ)) (1−σ read at the next step's σ when
    σ = 1), std = s √(σ−σ'), c = (1 + s²(1−σ)/(2σ))·(σ'−σ)."""
    dt = sigma_next - sigma
    s = eta * (sigma / (1 - (sigma_after_first if sigma >= 1 else sigma))) ** 0.5 if eta > 0 else 0.0
    return s, s * (-dt) ** 0.5, (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt


def sampler_steps(
    backbone: Backbone,
    num_steps: int,
    eta: float,
    final_step_noise: bool = True,
    sde_window: tuple[int, int] | None = None,
) -> list[Step]:
    """The steps of `num_steps`-step sampling with the backbone's own schedule, noisiest first; η > 0 makes the
    first `num_noises(...)` of them stochastic, or (`sde_window` = (start, stop)) only steps start..stop−1, the others
    deterministic (MixGRPO's mixed ODE–SDE sampling)."""
    stochastic = num_noises(num_steps, eta, final_step_noise)
    start, stop = sde_window or (0, num_steps)
    schedule = backbone.schedule(num_steps)
    steps = []
    for i, (t, a, b) in enumerate(schedule):
        level = eta if i < stochastic and start <= i < stop else 0.0
        if backbone.flow_matching:  # (t, σ, σ')
            s, std, c = flow_coefficients(a, b, level, schedule[1][1] if len(schedule) > 1 else 0.0)
            steps.append(FlowStep(t, std, c, sigma=a, sigma_next=b, diffusion=s))
        else:  # (t, ᾱ, ᾱ')
            std, c = ddim_coefficients(a, b, level)
            steps.append(DDIMStep(t, std, c, alpha=a, alpha_prev=b))
    return steps


def kl_weights(steps: list[Step]) -> list[float]:
    """c²/(2 std²) per step: times ‖p̂ − p̂_ref‖², the exact KL between the Gaussian steps that two predictions at the
    same x_t take (every step must be stochastic)."""
    return [step.pred_coef**2 / (2 * step.std**2) for step in steps]


def _mixed_predict_branches(
    backbone: Backbone, x: Tensor, t: float, cond: Cond, guidance_scale: float, gamma: float
) -> tuple[Tensor, Tensor]:
    """(1 − γ)·p̃_base + γ·p̃_ft, base = the same backbone with its adapters off. At γ = 0 or 1 only one model is
    evaluated, so the endpoints are exactly base or fine-tuned sampling."""
    if gamma == 1:
        return backbone.predict_branches(x, t, cond, guidance_scale)
    with backbone.adapters_disabled():
        base = backbone.predict_branches(x, t, cond, guidance_scale)
    if gamma == 0:
        return base
    tuned = backbone.predict_branches(x, t, cond, guidance_scale)
    return tuple((1 - gamma) * b + gamma * f for b, f in zip(base, tuned))


def num_noises(num_steps: int, eta: float, final_step_noise: bool = True) -> int:
    """How many ξ the sampler injects: one per stochastic step (none at η = 0; the last step is deterministic when
    `final_step_noise` is off, as in DNO's sampler)."""
    return 0 if eta <= 0 else num_steps - (0 if final_step_noise else 1)


def sample(
    backbone: Backbone,
    cond: Cond,
    x_T: Tensor,
    noises: Tensor | None = None,
    *,
    num_steps: int,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    checkpoint: bool = False,
    grad_steps: int | None = None,
    mix: Callable[[int], float] | None = None,
    final_step_noise: bool = True,
    sde_window: tuple[int, int] | None = None,
) -> Trajectory:
    """Run the backbone's sampler from x_T. `noises[i]` is ξ of step i (shape [num_noises(...), *x_T.shape]);
    required when η > 0. `mix(i)` = γ_i mixes the fine-tuned and adapter-free predictions at step i (AIG); None =
    the backbone as is. `final_step_noise=False` makes the last step deterministic (as DNO's sampler; diffusers'
    DDIM adds std·ξ there); `sde_window` keeps η only on its steps (`sampler_steps`; the others' ξ go unused)."""
    expected = num_noises(num_steps, eta, final_step_noise)
    if expected and (noises is None or noises.shape[0] != expected):
        raise ValueError(f"eta > 0 needs one noise per stochastic step: noises of shape [{expected}, ...]")
    first_grad_step = num_steps - grad_steps if grad_steps is not None else 0
    traj = Trajectory(latents=x_T)
    x = x_T
    for i, step in enumerate(sampler_steps(backbone, num_steps, eta, final_step_noise, sde_window)):
        if i == first_grad_step and i > 0:
            x = x.detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_grad_step):
            predict = backbone.predict_branches
            if mix is not None:
                predict = partial(_mixed_predict_branches, backbone, gamma=mix(i))
            if checkpoint and torch.is_grad_enabled():
                pred, pred_cond = checkpointed(predict, x, step.t, cond, guidance_scale, use_reentrant=False)
            else:
                pred, pred_cond = predict(x, step.t, cond, guidance_scale)
            x0, x_next = step.update(x, pred)
            if step.std > 0:
                x_next = x_next + step.std * noises[i]
        traj.timesteps.append(step.t)
        traj.x.append(x)
        traj.predictions.append(pred)
        traj.cond_predictions.append(pred_cond)
        traj.x0_pred.append(x0)
        x = x_next
    traj.latents = x
    return traj


@torch.no_grad()
def path_kl(backbone: Backbone, traj: Trajectory, cond: Cond, guidance_scale: float, steps: list[Step]) -> Tensor:
    """Per image [B]: Σ over the stochastic steps of c²/(2 std²)·‖p̂ − p̂_base‖² (summed over the latent), p̂ the
    prediction that drove `traj` and p̂_base the backbone's with its adapters off at the same x_t. Along a trajectory
    drawn from the adapted sampler this is a one-sample estimate of KL(adapted ‖ base) between the two samplers'
    path measures (each step is Gaussian with the same std), which bounds the KL between their images."""
    total = torch.zeros(len(traj.latents), device=traj.latents.device)
    with backbone.adapters_disabled():
        for x, t, pred, step in zip(traj.x, traj.timesteps, traj.predictions, steps):
            if step.std > 0:
                base, _ = backbone.predict_branches(x, t, cond, guidance_scale)
                weight = step.pred_coef**2 / (2 * step.std**2)
                total += weight * (pred.float() - base.float()).square().flatten(1).sum(1)
    return total


def trajectory_divergence(
    predictions: list[Tensor], reference: list[Tensor], weights: list[float] | None = None
) -> Tensor:
    """Per image [B]: (1/S) Σ_t w_t · mean((p̂_t − p̂_t^ref)²), the mean over that image's entries: the score-based
    surrogate of the KL between the image distributions of two trajectories with the same injected noise (MIRA's
    R_MIRA; w_t = 1 unless given). p̂ is ε̂ or v̂, whichever the backbone predicts."""
    weights = weights or [1.0] * len(predictions)
    terms = [w * (p - ref).square().flatten(1).mean(1) for w, p, ref in zip(weights, predictions, reference)]
    return torch.stack(terms).mean(0)
