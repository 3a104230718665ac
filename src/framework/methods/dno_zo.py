"""DNO's zeroth-order variant for non-differentiable rewards (arXiv 2405.18881): the reward's gradient with respect
to the image is estimated from K perturbed samples, then back-propagated through the sampler as usual.

Candidates x_k = M(z + μ·u_k) (no grad, u_k seeded per item and step), losses ℓ_k = −r(x_k), ℓ_0 = −r(M(z));
ĝ = Σ_k (ℓ_k − ℓ_0)(x_k − x_0), normalised to unit length, enters the loss as ⟨sg(ĝ), M(z)⟩ so that backward
carries exactly ĝ into the noise. The reward is only ever called without gradients.
"""

import torch
from torch import Tensor

from framework.items import derive_seed
from framework.methods.common import Problem
from framework.methods.dno import DNO
from framework.sampling import Trajectory


@torch.no_grad()
def perturbed_candidates(
    problem: Problem, cfg, x_T: Tensor, noises: Tensor | None, step: int
) -> tuple[Tensor, Tensor, Tensor]:
    """K samples around the current noise (x_T, and every ξ_t when `optimize=all`): images, final latents and their
    black-box rewards. The perturbations depend only on the item's seed and the step."""
    generator = torch.Generator().manual_seed(derive_seed(problem.item.seed, 2 << 20, step))
    k = cfg.num_candidates
    draw = lambda like: torch.randn((k, *like.shape[1:]), generator=generator).to(like.device)  # noqa: E731
    x_Ts = x_T.detach() + cfg.mu * draw(x_T)
    if noises is not None:
        noises = noises.detach().expand(-1, k, *noises.shape[2:])
        if cfg.optimize == "all":
            noises = noises + cfg.mu * draw(noises.transpose(0, 1)).transpose(0, 1)
    images, latents = [], []
    for start in range(0, k, cfg.batch_size):
        chunk = slice(start, start + cfg.batch_size)
        batch_images, traj = problem.render(x_Ts[chunk], None if noises is None else noises[:, chunk])
        images.append(batch_images)
        latents.append(traj.latents)
    images = torch.cat(images)
    return images, torch.cat(latents), problem.score(images)


class DNOZeroOrder(DNO):
    def reward_term(
        self, problem: Problem, images: Tensor, traj: Trajectory, x_T: Tensor, noises: Tensor | None, step: int
    ) -> tuple[Tensor, float, dict]:
        candidates, _, rewards = perturbed_candidates(problem, self.cfg, x_T, noises, step)
        with torch.no_grad():
            current = images.detach()
            reward = problem.score(current)[0]
            weights = (reward - rewards).view(-1, *[1] * (candidates.dim() - 1))  # ℓ_k − ℓ_0 = r_0 − r_k
            direction = (weights * (candidates - current)).sum(0)  # any sample shape: images or vectors
            direction = direction / direction.norm().clamp_min(1e-12)
        return (direction * images[0]).sum(), reward.item(), {"candidate_reward_max": rewards.max().item()}
