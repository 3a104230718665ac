"""DNO, direct noise optimisation (arXiv 2405.18881): gradient ascent on the reward over the sampler's noise.

loss(z) = −r(M(z)) + γ·R_prob(z), z = x_T and every ξ_t (`optimize=all`) or x_T alone, AdamW with gradient-norm
clipping, backprop through the whole checkpointed chain (or its last `grad_steps` steps). Every step records the
reward, the regulariser, R_MIRA to the step-0 trajectory (uniform weights, guided ε̂: drift in score space, for any
noise method) and the image metrics; the final noise's ‖z‖²/D and R_prob say how Gaussian it still is. With a
held-out reward (eval.rewards) the step whose image it scores best is recorded (`held_out_step`; the final noise
counts as step opt_steps) and, with `select=best_held_out`, returned: a stopping rule blind to the ground truth.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from framework.core.errors import FrameworkError, NonFiniteLoss
from framework.core.items import Item, ItemResult, derive_seed
from framework.methods.common import Method, Problem, Start
from framework.models.sampling import Trajectory, trajectory_divergence

PERMUTED_ENTRIES = 1 << 24  # at most this many permuted noise entries at once (R_prob's batched permutations)


def _block_log_prob(rows: Tensor) -> Tensor:
    """Concentration-bound log-probability that the d-blocks rows[..., n, d] are i.i.d. N(0, I), per leading index:
    lp_mean = min(−n‖m‖²/(2d), −log 2); lp_cov = min(−nδ²/2, −log 2), δ = max(√(1+‖C−I‖₂) − 1 − √(d/n), 0)."""
    n, d = rows.shape[-2:]
    mean = rows.mean(-2)
    cov = rows.transpose(-1, -2) @ rows / n
    lp_mean = torch.clamp(-n * mean.square().sum(-1) / (2 * d), max=-math.log(2))
    spectral = torch.linalg.matrix_norm(cov - torch.eye(d, device=rows.device, dtype=rows.dtype), ord=2)
    delta = torch.clamp(torch.sqrt(1 + spectral) - 1 - math.sqrt(d / n), min=0)
    lp_cov = torch.clamp(-n * delta.square() / 2, max=-math.log(2))
    return lp_mean + lp_cov


def _blocks(v: Tensor, block_size: int) -> Tensor:
    n = v.shape[-1] // block_size
    return v[..., : n * block_size].unflatten(-1, (n, block_size))


def _permuted_log_probs(v: Tensor, block_size: int, perm_seeds: list[int]) -> Tensor:
    """lp of each seeded permutation of v, [K], in one batched computation."""
    generators = [torch.Generator(device=v.device).manual_seed(s) for s in perm_seeds]
    perms = torch.stack([torch.randperm(v.numel(), generator=g, device=v.device) for g in generators])
    return _block_log_prob(_blocks(v[perms], block_size))


def prob_regulariser(v: Tensor, block_size: int, perm_seeds: list[int]) -> Tensor:
    """R_prob = −(lp(v) + (1/K) Σ_k lp(π_k v)), as in DNO's code: v's own order at weight 1 (the only term that sees
    correlation between neighbouring entries) plus the mean over K seeded permutations (which see the marginal
    statistics). It is flat (4·log 2) while v looks Gaussian. The permuted terms are checkpointed, so the K
    permuted copies of v are not kept for backward."""
    if v.numel() < block_size:
        raise FrameworkError(f"R_prob needs at least method.block_size={block_size} noise entries, got {v.numel()}")
    own_order = _block_log_prob(_blocks(v, block_size))
    if not perm_seeds:
        return -own_order
    chunk = max(1, PERMUTED_ENTRIES // v.numel())  # permutations per batched call: bounded transient memory
    permuted = [
        checkpoint(_permuted_log_probs, v, block_size, perm_seeds[i : i + chunk], use_reentrant=False)
        for i in range(0, len(perm_seeds), chunk)
    ]
    return -(own_order + torch.cat(permuted).mean())


class ItemNoise:
    """One item's optimised noise (x_T [1, ...] and, with `optimize=all`, its ξ [S', 1, ...]) with its own AdamW
    state, loss scale and gradient clipping, so that its steps are those it would take alone. float16 networks:
    input gradients underflow without loss scaling (DNO uses a scaler too); a step whose scaled gradients overflow
    is skipped (its grad_norm is recorded as inf) and that item's scale is lowered."""

    def __init__(self, cfg, x_T: Tensor, noises: Tensor | None, float16: bool):
        self.tensors = [x_T.clone().requires_grad_()] + ([] if noises is None else [noises.clone().requires_grad_()])
        self.optimizer = torch.optim.AdamW(self.tensors, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(x_T.device.type, init_scale=2.0**13, enabled=float16)
        self.grad_clip = cfg.grad_clip

    def flat(self) -> Tensor:
        return torch.cat([v.flatten() for v in self.tensors])

    def step(self) -> float:
        """Apply the gradients that backward left; returns their norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.tensors, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return grad_norm.item()


class BatchNoise:
    """The optimised noises of a batch's items, rendered together: x_T [B, ...] and ξ [S', B, ...] (the fixed ξ when
    only x_T is optimised)."""

    def __init__(self, problem: Problem, cfg):
        x_T, self.noises = problem.noise()
        self.optimise_noises = cfg.optimize == "all" and self.noises is not None
        self.items = [
            ItemNoise(
                cfg,
                x_T[i : i + 1],
                self.noises[:, i : i + 1] if self.optimise_noises else None,
                problem.backbone.float16,
            )
            for i in range(len(x_T))
        ]

    def batch(self) -> tuple[Tensor, Tensor | None]:
        x_T = torch.cat([it.tensors[0] for it in self.items])
        return x_T, torch.cat([it.tensors[1] for it in self.items], dim=1) if self.optimise_noises else self.noises

    def step(self, losses: Tensor, active: list[int]) -> dict[int, float]:
        """One optimiser step of each active item on its own loss; their gradient norms."""
        for it in self.items:
            it.optimizer.zero_grad(set_to_none=True)
        torch.stack([self.items[i].scaler.scale(losses[i]) for i in active]).sum().backward()
        return {i: self.items[i].step() for i in active}


@dataclass
class Choice:
    value: float  # the held-out reward of the chosen image
    step: int
    image: Tensor
    reward: float


class ItemLog:
    """What a noise optimisation keeps per item of its batch: whether it failed (a non-finite loss ends that item
    alone), one record per step, the base reward, and the held-out choice: the step whose image the held-out reward
    (`problem.held_out`) scores best, the final noise counting as step opt_steps. That choice is a stopping rule blind
    to the ground truth and to the optimised reward."""

    def __init__(self, num_items: int, held_out: str | None):
        self.failures: list[NonFiniteLoss | None] = [None] * num_items
        self.steps: list[list[dict]] = [[] for _ in range(num_items)]
        self.base_rewards: list[float] | None = None
        self.held_out_key = held_out and f"eval_{held_out}"
        self.choices: list[Choice | None] = [None] * num_items

    def active(self, losses: Tensor, step: int) -> list[int]:
        """The items still optimised after this step's losses (a non-finite one fails its item)."""
        for i, loss in enumerate(losses.tolist()):
            if self.failures[i] is None and not math.isfinite(loss):
                self.failures[i] = NonFiniteLoss(f"non-finite loss ({loss}) at optimisation step {step}")
        return [i for i, failure in enumerate(self.failures) if failure is None]

    def record(self, problem: Problem, step: int, active: list[int], images: Tensor, values: dict, extras: list[dict]):
        """Each active item's step record: `values` (per-item lists: reward, loss, ...), `extras`, and the image
        metrics of this step's image against the base image."""
        if step == 0:
            self.base_rewards = values["reward"]
        for i, measures in zip(active, problem.measure(images[active], problem.start.images[active], active)):
            self.steps[i].append({"step": step} | {k: v[i] for k, v in values.items()} | extras[i] | measures)
            self.offer(i, step, measures, images[i], values["reward"][i])

    def offer(self, i: int, step: int, measures: dict, image: Tensor, reward: float) -> None:
        """A candidate of item i's held-out choice."""
        key, best = self.held_out_key, self.choices[i]
        if key and (best is None or measures[key] > best.value):
            self.choices[i] = Choice(measures[key], step, image.detach().clone(), reward)  # not a view of the batch


class DNO(Method):
    """Noise optimisation. Subclasses change the regulariser (`weight` × `regulariser`) or, for black-box rewards,
    the differentiable term that stands for −r(M(z)) (`reward_term`); the loop, optimiser and budget stay shared.
    A batch's items are rendered together, but each keeps its own loss, optimiser, clipping and records."""

    needs_gradients = True

    @property
    def weight(self) -> float:
        return self.cfg.gamma

    def regulariser(self, problem: Problem, flat_noises: list[Tensor], traj: Trajectory, step: int) -> Tensor:
        """Each item's regulariser, [B]."""
        return torch.stack([self.prob_regulariser(it, flat, step) for it, flat in zip(problem.items, flat_noises)])

    def prob_regulariser(self, item: Item, flat_noise: Tensor, step: int) -> Tensor:
        """R_prob of the optimised noise. Its permutations are drawn afresh at every step, as DNO does
        (`fresh_permutations`), or once per item; either way seeded from the item and step, so runs reproduce."""
        draw = step if self.cfg.fresh_permutations else 0
        perm_seeds = [derive_seed(item.seed, 1 << 20, draw, k) for k in range(self.cfg.num_permutations)]
        return prob_regulariser(flat_noise, self.cfg.block_size, perm_seeds)

    def reward_term(
        self, problem: Problem, images: Tensor, traj: Trajectory, x_T: Tensor, noises: Tensor | None, step: int
    ) -> tuple[Tensor, list[float], list[dict]]:
        """Per item: −r(M(z)) as a differentiable loss term ([B]), r(M(z)), extra values for the step record."""
        rewards = problem.score(images)
        return -rewards, rewards.tolist(), [{} for _ in rewards]

    def run(self, problem: Problem) -> list[ItemResult | NonFiniteLoss]:
        cfg, n = self.cfg, len(problem.items)
        noise, log = BatchNoise(problem, cfg), ItemLog(n, problem.held_out)
        desc = f"{problem.describe()} {cfg.name}"
        for step in problem.progress(range(cfg.opt_steps), total=cfg.opt_steps, desc=desc):
            x, xi = noise.batch()
            images, traj = problem.render(x, xi, checkpoint=cfg.checkpoint, grad_steps=cfg.grad_steps)
            if step == 0:  # z = z0: the base images, and the reference of regularisers and drift metrics
                problem.start = Start.of(images, traj)
            terms, rewards, extras = self.reward_term(problem, images, traj, x, xi, step)
            flats = [it.flat() for it in noise.items]
            regs = self.regulariser(problem, flats, traj, step) if self.weight > 0 else terms.new_zeros(n)
            losses = terms + self.weight * regs
            active = log.active(losses, step)
            if not active:
                break
            grad_norms = noise.step(losses, active)
            values = {
                "loss": losses,
                "regulariser": regs,
                "noise_sq": torch.stack([f.square().mean() for f in flats]),
                "r_mira": trajectory_divergence([p.detach() for p in traj.predictions], problem.start.traj.predictions),
            }
            values = {k: value.detach().tolist() for k, value in values.items()}
            values |= {"reward": rewards, "grad_norm": [grad_norms.get(i) for i in range(n)]}
            log.record(problem, step, active, images, values, extras)
        with torch.no_grad():
            return self.finish(problem, noise, log)

    def finish(self, problem: Problem, noise: BatchNoise, log: ItemLog) -> list[ItemResult | NonFiniteLoss]:
        """Each item's result from its final noise (or its held-out choice), or its failure."""
        cfg = self.cfg
        images, _ = problem.render(*noise.batch())
        final_rewards = problem.score(images).tolist()
        if problem.start is None:  # opt_steps = 0: the final noise is the initial one
            problem.start, log.base_rewards = Start(images, None), final_rewards
        ok = [i for i, failure in enumerate(log.failures) if failure is None]
        if log.held_out_key and ok:
            for i, measures in zip(ok, problem.measure(images[ok], rows=ok)):
                log.offer(i, cfg.opt_steps, measures, images[i], final_rewards[i])
        results = []
        for i, it in enumerate(noise.items):
            if log.failures[i] is not None:
                results.append(log.failures[i])
                continue
            flat = it.flat()  # how Gaussian the final noise still is
            info = {"noise_sq": flat.square().mean().item()}
            if flat.numel() >= cfg.block_size:  # R_prob needs one block at least
                info["r_prob"] = self.prob_regulariser(problem.items[i], flat, cfg.opt_steps).item()
            final, final_reward = images[i], final_rewards[i]
            if log.held_out_key:
                choice = log.choices[i]
                info["held_out_step"] = choice.step
                if cfg.select == "best_held_out":
                    final, final_reward = choice.image, choice.reward
            base = problem.start.images[i]
            results.append(ItemResult(base, final, log.base_rewards[i], final_reward, log.steps[i], info))
        return results
