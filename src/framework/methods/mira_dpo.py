"""MIRA-DPO: MIRA for non-differentiable rewards, as preference optimisation at inference time (frozen backbone).

Each step draws K candidates around the current noise (no grad), ranks them with the black-box reward and keeps the
best x_w and worst x_l (a tied pair gives no preference and no reward gradient that step). With the Gaussian
surrogate of the log-likelihood ratio of a sample under z versus the initial z0,

    Δ_z(x) = (‖x − M(z0)‖² − ‖x − M(z)‖²) / (2τ²),      ‖·‖² = mean of squares (τ is a per-element scale),

the loss is −log σ(β_dpo·[Δ_z(x_w) − Δ_z(x_l)]) + β·R_MIRA(z). Its gradient pulls M(z) towards x_w and away from
x_l until the preference is expressed (the sigmoid saturates), through one differentiable pass M(z). `space`
compares decoded images (default) or final latents. β = 0 drops the MIRA term.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from framework.methods.common import Problem
from framework.methods.dno_zo import perturbed_candidates
from framework.methods.mira import MIRA
from framework.models.sampling import Trajectory


class MIRADPO(MIRA):
    def reward_term(
        self, problem: Problem, images: Tensor, traj: Trajectory, x_T: Tensor, noises: Tensor | None, step: int
    ) -> tuple[Tensor, list[float], list[dict]]:
        cfg = self.cfg
        candidate_images, candidate_latents, rewards = perturbed_candidates(problem, cfg, x_T, noises, step)
        image_space = cfg.space == "image"
        current, candidates = (images, candidate_images) if image_space else (traj.latents, candidate_latents)
        start = problem.start.images if image_space else problem.start.traj.latents  # M(z0) of every item
        with torch.no_grad():
            reward = problem.score(images.detach())
        rows = torch.arange(len(rewards))
        winners, losers = rewards.argmax(1), rewards.argmin(1)
        gaps = rewards[rows, winners] - rewards[rows, losers]  # 0: a tie, no preference and no reward gradient

        def log_ratio(x: Tensor) -> Tensor:
            squared = lambda d: d.square().flatten(1).mean(1)  # noqa: E731
            return (squared(x - start) - squared(x - current)) / (2 * cfg.tau**2)

        margin = cfg.beta_dpo * (log_ratio(candidates[rows, winners]) - log_ratio(candidates[rows, losers]))
        tied = gaps == 0
        terms = torch.where(tied, current.flatten(1).sum(1) * 0.0, -F.logsigmoid(margin))
        preference = torch.where(tied, 0.5, torch.sigmoid(margin)).tolist()
        extras = [{"pair_gap": gap, "preference": p} for gap, p in zip(gaps.tolist(), preference)]
        return terms, reward.tolist(), extras
