"""DNO's zeroth-order variant for non-differentiable rewards (arXiv 2405.18881): the reward's gradient with respect
to the image is estimated from K perturbed samples, then back-propagated through the sampler as usual.

Candidates x_k = M(z + μ·u_k) (no grad, u_k seeded per item and step), losses ℓ_k = −r(x_k), ℓ_0 = −r(M(z));
ĝ = Σ_k (ℓ_k − ℓ_0)(x_k − x_0), normalised to unit length, enters the loss as ⟨sg(ĝ), M(z)⟩ so that backward
carries exactly ĝ into the noise. The reward is only ever called without gradients.
"""

import torch
from torch import Tensor

from framework.core.items import derive_seed
from framework.methods.common import Problem
from framework.methods.dno import DNO
from framework.models.sampling import Trajectory


@torch.no_grad()
def perturbed_candidates(
    problem: Problem, cfg, x_T: Tensor, noises: Tensor | None, step: int
) -> tuple[Tensor, Tensor, Tensor]:
    """K samples around each item's current noise (x_T, and every ξ_t when `optimize=all`): images [B, K, ...],
    final latents [B, K, ...] and their black-box rewards [B, K]. The perturbations depend only on the item's seed
    and the step."""
    k, n = cfg.num_candidates, len(problem.items)
    x_Ts, xis = [], []
    for i, item in enumerate(problem.items):
        generator = torch.Generator().manual_seed(derive_seed(item.seed, 2 << 20, step))
        draw = lambda like: torch.randn((k, *like.shape[1:]), generator=generator).to(like.device)  # noqa: E731
        x_Ts.append(x_T[i : i + 1].detach() + cfg.mu * draw(x_T))
        if noises is not None:
            xi = noises[:, i : i + 1].detach().expand(-1, k, *noises.shape[2:])
            if cfg.optimize == "all":
                xi = xi + cfg.mu * draw(xi.transpose(0, 1)).transpose(0, 1)
            xis.append(xi)
    rows = [i for i in range(n) for _ in range(k)]
    images, latents, rewards = problem.sample_and_score(torch.cat(x_Ts), torch.cat(xis, dim=1) if xis else None, rows)
    return images.unflatten(0, (n, k)), latents.unflatten(0, (n, k)), rewards.view(n, k)


class DNOZeroOrder(DNO):
    def reward_term(
        self, problem: Problem, images: Tensor, traj: Trajectory, x_T: Tensor, noises: Tensor | None, step: int
    ) -> tuple[Tensor, list[float], list[dict]]:
        candidates, _, rewards = perturbed_candidates(problem, self.cfg, x_T, noises, step)
        with torch.no_grad():
            current = images.detach()
            reward = problem.score(current)
            weights = (reward[:, None] - rewards).view(*rewards.shape, *[1] * (candidates.dim() - 2))  # r_0 − r_k
            direction = (weights * (candidates - current[:, None])).sum(1)  # any sample shape: images or vectors
            direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(
                -1, *[1] * (current.dim() - 1)
            )
        extras = [{"candidate_reward_max": best} for best in rewards.max(1).values.tolist()]
        return (direction * images).flatten(1).sum(1), reward.tolist(), extras
