"""DNO, direct noise optimisation (arXiv 2405.18881): gradient ascent on the reward over the sampler's noise.

loss(z) = −r(M(z)) + γ·R_prob(z), z = x_T and every ξ_t (`optimize=all`) or x_T alone, AdamW with gradient-norm
clipping, backprop through the whole checkpointed chain (or its last `grad_steps` steps). Every step records the
reward, the regulariser, R_MIRA to the step-0 trajectory (uniform weights, guided ε̂: drift in score space, for any
noise method) and the image metrics; the final noise's ‖z‖²/D and R_prob say how Gaussian it still is.
"""

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from framework.errors import FrameworkError, NonFiniteLoss
from framework.items import ItemResult, derive_seed
from framework.methods.common import Method, Problem
from framework.sampling import Trajectory, trajectory_divergence


def _block_log_prob(v: Tensor, block_size: int, perm_seed: int | None) -> Tensor:
    """Concentration-bound log-probability that v's d-blocks (after a seeded permutation) are i.i.d. N(0, I):
    lp_mean = min(−n‖m‖²/(2d), −log 2); lp_cov = min(−nδ²/2, −log 2), δ = max(√(1+‖C−I‖₂) − 1 − √(d/n), 0)."""
    if perm_seed is not None:
        generator = torch.Generator(device=v.device).manual_seed(perm_seed)
        v = v[torch.randperm(v.numel(), generator=generator, device=v.device)]
    d = block_size
    n = v.numel() // d
    rows = v[: n * d].reshape(n, d)
    mean = rows.mean(0)
    cov = rows.T @ rows / n
    lp_mean = torch.clamp(-n * mean.square().sum() / (2 * d), max=-math.log(2))
    spectral = torch.linalg.matrix_norm(cov - torch.eye(d, device=v.device, dtype=v.dtype), ord=2)
    delta = torch.clamp(torch.sqrt(1 + spectral) - 1 - math.sqrt(d / n), min=0)
    lp_cov = torch.clamp(-n * delta.square() / 2, max=-math.log(2))
    return lp_mean + lp_cov


def prob_regulariser(v: Tensor, block_size: int, perm_seeds: list[int]) -> Tensor:
    """R_prob = −(lp(v) + (1/K) Σ_k lp(π_k v)), as in DNO's code: v's own order at weight 1 (the only term that sees
    correlation between neighbouring entries) plus the mean over K seeded permutations (which see the marginal
    statistics). It is flat (4·log 2) while v looks Gaussian. Each permuted term is checkpointed so no permutation is
    kept for backward."""
    if v.numel() < block_size:
        raise FrameworkError(f"R_prob needs at least method.block_size={block_size} noise entries, got {v.numel()}")
    own_order = _block_log_prob(v, block_size, None)
    if not perm_seeds:
        return -own_order
    permuted = [checkpoint(_block_log_prob, v, block_size, s, use_reentrant=False) for s in perm_seeds]
    return -(own_order + torch.stack(permuted).mean())


class DNO(Method):
    """Noise optimisation. Subclasses change the regulariser (`weight` × `regulariser`) or, for black-box rewards,
    the differentiable term that stands for −r(M(z)) (`reward_term`); the loop, optimiser and budget stay shared."""

    needs_gradients = True

    @property
    def weight(self) -> float:
        return self.cfg.gamma

    def regulariser(self, problem: Problem, flat_noise: Tensor, traj: Trajectory, step: int) -> Tensor:
        return self.prob_regulariser(problem, flat_noise, step)

    def prob_regulariser(self, problem: Problem, flat_noise: Tensor, step: int) -> Tensor:
        """R_prob of the optimised noise. Its permutations are drawn afresh at every step, as DNO does
        (`fresh_permutations`), or once per item; either way seeded from the item and step, so runs reproduce."""
        draw = step if self.cfg.fresh_permutations else 0
        perm_seeds = [derive_seed(problem.item.seed, 1 << 20, draw, k) for k in range(self.cfg.num_permutations)]
        return prob_regulariser(flat_noise, self.cfg.block_size, perm_seeds)

    def reward_term(
        self, problem: Problem, images: Tensor, traj: Trajectory, x_T: Tensor, noises: Tensor | None, step: int
    ) -> tuple[Tensor, float, dict]:
        """(−r(M(z)) as a differentiable loss term, r(M(z)), extra values for the step record)."""
        reward = problem.score(images)[0]
        return -reward, reward.item(), {}

    def run(self, problem: Problem) -> ItemResult:
        cfg = self.cfg
        x_T, noises = problem.noise([problem.item.seed])
        variables = [x_T.requires_grad_()]
        if cfg.optimize == "all" and noises is not None:
            variables.append(noises.requires_grad_())
        optimizer = torch.optim.AdamW(variables, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # float16 networks: input gradients underflow without loss scaling (DNO uses a scaler too). A step whose
        # scaled gradients overflow is skipped (its grad_norm is recorded as inf) and the scale is lowered.
        scaler = torch.amp.GradScaler(x_T.device.type, init_scale=2.0**13, enabled=problem.backbone.float16)
        steps, base_image, base_reward, reference = [], None, None, None
        for step in problem.progress(range(cfg.opt_steps), total=cfg.opt_steps, desc=f"{problem.item.id} {cfg.name}"):
            images, traj = problem.render(x_T, noises, checkpoint=cfg.checkpoint, grad_steps=cfg.grad_steps)
            term, reward, extra = self.reward_term(problem, images, traj, x_T, noises, step)
            flat = torch.cat([v.flatten() for v in variables])
            reg = self.regulariser(problem, flat, traj, step) if self.weight > 0 else flat.new_zeros(())
            loss = term + self.weight * reg
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at optimisation step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(variables, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if step == 0:  # z = z0: the base sample and the reference trajectory of the drift metrics
                base_image, base_reward, reference = images[0].detach(), reward, [eps.detach() for eps in traj.eps]
            r_mira = trajectory_divergence([eps.detach() for eps in traj.eps], reference).item()
            steps.append(
                {
                    "step": step,
                    "reward": reward,
                    "loss": loss.item(),
                    "regulariser": reg.item(),
                    "grad_norm": grad_norm.item(),
                    "noise_sq": flat.detach().square().mean().item(),
                    "r_mira": r_mira,
                    **extra,
                    **problem.measure(images, base_image[None]),
                }
            )
        with torch.no_grad():
            images, _ = problem.render(x_T, noises)
            final_reward = problem.score(images)[0].item()
            flat = torch.cat([v.flatten() for v in variables])  # how Gaussian the final noise still is
            info = {"noise_sq": flat.square().mean().item()}
            if flat.numel() >= cfg.block_size:  # R_prob needs one block at least
                info["r_prob"] = self.prob_regulariser(problem, flat, cfg.opt_steps).item()
        if base_image is None:  # opt_steps = 0
            base_image, base_reward = images[0], final_reward
        return ItemResult(base_image, images[0], base_reward, final_reward, steps, info)
