"""MIRA (arXiv 2510.01549): noise optimisation regularised in image space, not noise space.

loss(z) = −r(M(z)) + β·R_MIRA(z),  R_MIRA(z) = (1/S) Σ_t w_t · mean((p̂(x_t^(z)) − sg[p̂(x_t^(z0))])²),

a score-based surrogate of KL[p(x0 | z, c) ‖ p(x0 | z0, c)], written in the backbone's own prediction p̂: ε̂ on
ε-prediction models, the velocity v̂ on flow-matching ones. Both are affine in the score at a given x_t (ε̂ = −σ_t·∇log p,
v̂ = −(x_t + σ_t ∇log p)/(1 − σ_t)), so a difference of predictions at the same x_t is a rescaled score difference.
The reference p̂(x_t^(z0)) is what the first optimisation step's forward pass computes (z = z0, same injected ξ), which
the problem keeps (`problem.start`): no extra model evaluation, ever. At z = z0 the surrogate and its gradient are 0.

Weights w_t: 1 (`uniform`) or `girsanov`: c_t²/(2 std_t²), which turns the prediction difference into the exact
Gaussian KL of one sampler step (DDIM, or the stochastic Euler step of a flow model; framework.models.sampling), c_t
being the coefficient of the prediction in the step's mean. Summed over steps it is the discrete Girsanov KL of the two
trajectories' steps taken from the same x_t; their means also differ by a_t·(x_t − x_t^(z0)), which this weighting
(like the surrogate) leaves out. The compared prediction is the CFG-guided one that drives the sampler
(`surrogate_guidance=cfg`) or its conditional branch (`cond`), which the same model evaluation returns.
"""

from torch import Tensor

from framework.methods.common import Problem
from framework.methods.dno import DNO
from framework.models.sampling import Trajectory, kl_weights, sampler_steps, trajectory_divergence


class MIRA(DNO):
    @property
    def weight(self) -> float:
        return self.cfg.beta

    def regulariser(self, problem: Problem, flat_noises: list[Tensor], traj: Trajectory, step: int) -> Tensor:
        """Each item's R_MIRA to its own reference trajectory (the problem's first pass, at z0), [B]."""
        cond = self.cfg.surrogate_guidance == "cond"
        predictions = traj.cond_predictions if cond else traj.predictions
        reference = problem.start.traj.cond_predictions if cond else problem.start.traj.predictions
        weights = None
        if self.cfg.weighting == "girsanov":
            weights = kl_weights(sampler_steps(problem.backbone, self.cfg.num_steps, self.cfg.eta))
        return trajectory_divergence(predictions, reference, weights)
