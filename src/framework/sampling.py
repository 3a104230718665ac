"""The differentiable DDIM sampler: the one place that knows DDIM's update.

Noises are explicit arguments (x_T and one ξ per step, used when η > 0) so methods can optimise them and two
trajectories can share them. At η = 0 it reproduces diffusers' DDIMScheduler/pipeline numerically. Memory stays
flat in the number of steps with `checkpoint=True` (only each step's input x_t is kept; the model is re-run during
backward), and `grad_steps=K` backpropagates through the last K steps only (DRaFT-K style truncation).
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
    timesteps: list[int] = field(default_factory=list)
    x: list[Tensor] = field(default_factory=list)  # x_t fed to the model
    eps: list[Tensor] = field(default_factory=list)  # ε̂ that drove the update
    eps_cond: list[Tensor] = field(default_factory=list)  # its conditional branch ε_c (same evaluation)
    x0_pred: list[Tensor] = field(default_factory=list)


def ddim_coefficients(alpha: float, alpha_prev: float, eta: float) -> tuple[float, float]:
    """σ_t of a DDIM step and the coefficient of ε̂ in its mean μ = a·x_t + c·ε̂ (with x̂0 substituted), which
    MIRA's eps_kl weighting needs: c = √(1−ᾱ_prev−σ²) − √ᾱ_prev·√(1−ᾱ_t)/√ᾱ_t."""
    sigma = eta * ((1 - alpha_prev) / (1 - alpha)) ** 0.5 * (1 - alpha / alpha_prev) ** 0.5
    return sigma, (1 - alpha_prev - sigma**2) ** 0.5 - (alpha_prev / alpha) ** 0.5 * (1 - alpha) ** 0.5


def _mixed_eps_branches(
    backbone: Backbone, x: Tensor, t: int, cond: Cond, guidance_scale: float, gamma: float
) -> tuple[Tensor, Tensor]:
    """(1 − γ)·ε̃_base + γ·ε̃_ft, base = the same backbone with its adapters off. At γ = 0 or 1 only one model is
    evaluated, so the endpoints are exactly base or fine-tuned sampling."""
    if gamma == 1:
        return backbone.eps_branches(x, t, cond, guidance_scale)
    with backbone.adapters_disabled():
        base = backbone.eps_branches(x, t, cond, guidance_scale)
    if gamma == 0:
        return base
    tuned = backbone.eps_branches(x, t, cond, guidance_scale)
    return tuple((1 - gamma) * b + gamma * f for b, f in zip(base, tuned))


def num_noises(num_steps: int, eta: float, final_step_noise: bool = True) -> int:
    """How many ξ the sampler injects: one per stochastic step (none at η = 0; the last step is deterministic when
    `final_step_noise` is off, as in DNO's sampler)."""
    return 0 if eta <= 0 else num_steps - (0 if final_step_noise else 1)


def ddim_sample(
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
) -> Trajectory:
    """Run DDIM from x_T. `noises[i]` is ξ of step i (shape [num_noises(...), *x_T.shape]); required when η > 0.
    `mix(i)` = γ_i mixes the fine-tuned and adapter-free predictions at step i (AIG); None = the backbone as is.
    `final_step_noise=False` makes the last step deterministic (σ = 0, as DNO's sampler; diffusers adds σ·ξ there).

    x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t;  σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_prev);
    x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ_t²) ε̂ + σ_t ξ_t.
    """
    expected = num_noises(num_steps, eta, final_step_noise)
    if expected and (noises is None or noises.shape[0] != expected):
        raise ValueError(f"eta > 0 needs one noise per stochastic step: noises of shape [{expected}, ...]")
    first_grad_step = num_steps - grad_steps if grad_steps is not None else 0
    traj = Trajectory(latents=x_T)
    x = x_T
    for i, (t, alpha, alpha_prev) in enumerate(backbone.schedule(num_steps)):
        if i == first_grad_step and i > 0:
            x = x.detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_grad_step):
            predict = backbone.eps_branches if mix is None else partial(_mixed_eps_branches, backbone, gamma=mix(i))
            if checkpoint and torch.is_grad_enabled():
                eps, eps_cond = checkpointed(predict, x, t, cond, guidance_scale, use_reentrant=False)
            else:
                eps, eps_cond = predict(x, t, cond, guidance_scale)
            x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5
            sigma, _ = ddim_coefficients(alpha, alpha_prev, eta if i < expected else 0.0)
            x_prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - sigma**2) ** 0.5 * eps
            if sigma > 0:
                x_prev = x_prev + sigma * noises[i]
        traj.timesteps.append(t)
        traj.x.append(x)
        traj.eps.append(eps)
        traj.eps_cond.append(eps_cond)
        traj.x0_pred.append(x0)
        x = x_prev
    traj.latents = x
    return traj


def trajectory_divergence(
    predictions: list[Tensor], reference: list[Tensor], weights: list[float] | None = None
) -> Tensor:
    """Per image [B]: (1/S) Σ_t w_t · mean((ε_t − ε_t^ref)²), the mean over that image's entries: the score-based
    surrogate of the KL between the image distributions of two trajectories with the same injected noise (MIRA's
    R_MIRA; w_t = 1 unless given)."""
    weights = weights or [1.0] * len(predictions)
    terms = [w * (eps - ref).square().flatten(1).mean(1) for w, eps, ref in zip(weights, predictions, reference)]
    return torch.stack(terms).mean(0)
