"""MIRA (arXiv 2510.01549): noise optimisation regularised in image space, not noise space.

loss(z) = −r(M(z)) + β·R_MIRA(z),  R_MIRA(z) = (1/S) Σ_t w_t · mean((ε̂(x_t^(z)) − sg[ε̂(x_t^(z0))])²),

a score-based surrogate of KL[p(x0 | z, c) ‖ p(x0 | z0, c)]. The reference ε̂(x_t^(z0)) is what the first
optimisation step's forward pass computes (z = z0, same injected ξ), so it is cached from there: no extra model
evaluation, ever. At z = z0 the surrogate and its gradient are 0. Weights w_t: 1 (`uniform`) or `eps_kl`: the weight
c_t²/(2σ_t²) that turns the ε̂ difference into the exact Gaussian KL of one DDIM transition, c_t being the
coefficient of ε̂ in the step's mean. It is the KL between the two steps taken from the same x_t; the two
trajectories' means also differ by a_t·(x_t − x_t^(z0)), which this weighting (like the surrogate) leaves out.
The compared prediction is the CFG-guided ε̂ that drives the sampler (`surrogate_guidance=cfg`) or its conditional
branch ε_c (`cond`), which the same model evaluation returns.
"""

from torch import Tensor

from framework.methods.common import Problem
from framework.methods.dno import DNO
from framework.sampling import Trajectory, ddim_coefficients, trajectory_divergence


def eps_kl_weights(schedule: list[tuple[int, float, float]], eta: float) -> list[float]:
    weights = []
    for _, alpha, alpha_prev in schedule:
        sigma, eps_coef = ddim_coefficients(alpha, alpha_prev, eta)
        weights.append(eps_coef**2 / (2 * sigma**2))
    return weights


class MIRA(DNO):
    @property
    def weight(self) -> float:
        return self.cfg.beta

    def regulariser(self, problem: Problem, flat_noises: list[Tensor], traj: Trajectory, step: int) -> Tensor:
        """Each item's R_MIRA to its own reference trajectory, [B]."""
        predictions = traj.eps if self.cfg.surrogate_guidance == "cfg" else traj.eps_cond
        if step == 0:  # z = z0: this forward pass is the reference trajectory
            self._reference = [eps.detach() for eps in predictions]
            self._weights = (
                eps_kl_weights(problem.backbone.schedule(self.cfg.num_steps), self.cfg.eta)
                if self.cfg.weighting == "eps_kl"
                else [1.0] * len(predictions)
            )
        return trajectory_divergence(predictions, self._reference, self._weights)
