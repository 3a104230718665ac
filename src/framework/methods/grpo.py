"""GRPO (Flow-GRPO, arXiv 2505.05470; DDPO, arXiv 2305.13301, for ε-models): fine-tune LoRA adapters of the denoiser
by online RL with group-relative advantages. No reward gradient is used, so any reward works, served ones included.

Each step of the stochastic sampler is a Gaussian policy π_θ(x' | x_t, c) = N(μ_θ(x_t), std_t²): the SDE step of a
flow model, DDIM with η > 0 on an ε-model (framework.models.sampling). One epoch:
1. rollouts: `prompts_per_epoch` prompts, `group_size` images each, sampled with the current adapter (no gradient)
   at `rollout_steps` steps and noise level `noise_level`; every step's x_t, x' and log π_old(x' | x_t) are kept;
2. rewards, in batches; advantages per prompt group, A = (R − mean_group R)/(std R + 1e-4) with the std over the
   group or (`global_std`) over the whole epoch, or (`advantage=batch`) mean and std over the epoch, or
   (`advantage=pairwise`, Pref-GRPO) R_i replaced by i's win rate against the rest of its group first (the
   preference probability with a Bradley–Terry reward, the testbed's proxies); then clipped to ±`adv_clip_max`;
3. `inner_epochs` optimiser steps, each over the trained steps (the first ⌊`timestep_fraction`·T⌋, or that many at
   random, or MixGRPO's sliding window: `window_size` steps, the only stochastic ones of the rollout, starting at the
   noisiest step and moving `window_stride` later every `window_shift_every` epochs) with, per step,
   ρ = exp(log π_θ − log π_old) and
       loss = max(−Aρ, −A·clip(ρ, 1 − ε, 1 + ε)) + β·‖μ_θ − μ_ref‖²/(2 std_t²),
   μ_ref the same denoiser with its adapter off. As Flow-GRPO's code, log π and the KL are means over the latent's
   entries (so its clip range and β apply unchanged); the losses are means over images and trained steps.
The defaults are Flow-GRPO's (config/base.py and the SD3.5 configurations of config/grpo.py: 10 rollout steps, noise
level 0.7, CFG 4.5, lr 3e-4, weight decay 1e-4, gradient norm 1, clip range 1e-4, advantages clipped at 5,
timestep fraction 0.99, global std, β 0.04 as its OCR and GenEval runs; 24 images per prompt there, 8 here).

The prompts and seeds of epoch e derive from (seed, e, row) only, and process r of W takes groups r::W, so a resumed
or DDP run sees the data of an uninterrupted single-process one; rewards are gathered for the global std.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as checkpointed

from framework.config.methods import SamplingConfig
from framework.config.rewards import REWARDS
from framework.core.errors import NonFiniteLoss
from framework.core.items import derive_seed
from framework.methods.common import draw_noise
from framework.methods.fine_tune import AdapterTraining
from framework.models.sampling import Step, sample, sampler_steps


@dataclass
class Rollout:
    """One epoch's images of this process: per trained step i, x_t [B, ...], x' [B, ...] and log π_old [B]."""

    cond: object
    x: list[Tensor]
    x_next: list[Tensor]
    old_log_prob: list[Tensor]
    rewards: Tensor  # [B]
    advantages: Tensor  # [B]
    disagreement: Tensor | None  # [B], an ensemble's, where the KL is gated (method.kl_gate < 1)


def log_prob(x_next: Tensor, mean: Tensor, std: float) -> Tensor:
    """Per image: log N(x' | mean, std²) averaged over the latent's entries (Flow-GRPO's reading)."""
    log_density = -((x_next - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)
    return log_density.flatten(1).mean(1)


def group_advantages(
    rewards: Tensor, group_size: int, advantage: str, global_std: bool, clip: float, bradley_terry: float | None = None
) -> Tensor:
    """Advantages of rewards laid out group after group ([prompts × group_size]); see the module docstring. With
    `bradley_terry` (the reward's scale, for a reward whose score is a Bradley–Terry utility), a pairwise win is the
    preference probability σ((r_i − r_j)/scale) instead of 1, ½ or 0."""
    groups = rewards.reshape(-1, group_size)
    if advantage == "pairwise":  # win rate against the rest of the group; against itself ½, removed below
        gaps = groups[:, :, None] - groups[:, None, :]
        wins = torch.sigmoid(gaps / bradley_terry) if bradley_terry else (gaps > 0) + 0.5 * (gaps == 0)
        groups = (wins.sum(2) - 0.5) / (group_size - 1)
    if advantage == "batch":
        centred = groups - groups.mean()
    else:
        centred = groups - groups.mean(1, keepdim=True)
    std = groups.std() if global_std or advantage == "batch" else groups.std(1, keepdim=True)
    return (centred / (std + 1e-4)).clamp(-clip, clip).flatten()


class GRPO(AdapterTraining):
    """Training step = one epoch (rollouts, then `inner_epochs` optimiser steps): the optimiser steps are made here
    (manual optimisation), so Lightning's step counter counts optimiser steps."""

    clips_its_gradients = True  # framework.methods.fine_tune passes no gradient_clip_val

    def __init__(self, backbone, reward, cfg, prompts: list[str], seed: int, out_dir: Path):
        super().__init__(backbone, reward, cfg, prompts, seed, out_dir)
        self.automatic_optimization = False
        self.rollout_sampler = SamplingConfig(
            num_steps=cfg.rollout_steps, eta=cfg.noise_level, guidance_scale=cfg.guidance_scale
        )

    def rows(self, epoch: int) -> tuple[list[int], list[int]]:
        """Prompt indices and noise seeds of this process's groups of epoch `epoch`, group after group."""
        rng = np.random.default_rng(derive_seed(self.seed, 1 << 27, epoch))
        prompt_indices = rng.integers(len(self.prompts), size=self.cfg.prompts_per_epoch).tolist()
        mine = range(self.trainer.global_rank, len(prompt_indices), self.trainer.world_size)
        size = range(self.cfg.group_size)
        return [prompt_indices[g] for g in mine for _ in size], [
            derive_seed(self.seed, 1 << 28, epoch, g, i) for g in mine for i in size
        ]

    def window(self, epoch: int) -> tuple[int, int] | None:
        """The stochastic, trained steps (start, stop) of epoch `epoch` with `timesteps=window`; None otherwise."""
        cfg = self.cfg
        if cfg.timesteps != "window":
            return None
        start = min(cfg.window_stride * (epoch // cfg.window_shift_every), cfg.rollout_steps - cfg.window_size)
        return start, start + cfg.window_size

    def trained_steps(self, epoch: int) -> list[int]:
        if self.cfg.timesteps == "window":
            return list(range(*self.window(epoch)))
        count = max(1, int(self.cfg.rollout_steps * self.cfg.timestep_fraction))
        if self.cfg.timesteps == "random":
            rng = np.random.default_rng(derive_seed(self.seed, 1 << 29, epoch))
            return sorted(rng.choice(self.cfg.rollout_steps, size=count, replace=False).tolist())
        return list(range(count))

    @torch.no_grad()
    def rollout(self, prompts: list[str], seeds: list[int], epoch: int) -> Rollout:
        backbone, steps, trained = self.backbone, self.steps(epoch), self.trained_steps(epoch)
        cond = backbone.encode(prompts)
        x_T, noises = draw_noise(backbone, self.rollout_sampler, seeds)
        traj = sample(
            backbone,
            cond,
            x_T,
            noises,
            num_steps=self.cfg.rollout_steps,
            eta=self.cfg.noise_level,
            guidance_scale=self.cfg.guidance_scale,
            sde_window=self.window(epoch),
        )
        x_next = traj.x[1:] + [traj.latents]
        old = [log_prob(x_next[i], steps[i].update(traj.x[i], traj.predictions[i])[1], steps[i].std) for i in trained]
        images = backbone.decode(traj.latents)
        size = self.cfg.batch_size
        scored = [self.score(images[i : i + size], prompts[i : i + size]) for i in range(0, len(prompts), size)]
        rewards = torch.cat([scores for scores, _ in scored]).float()
        disagreement = None if scored[0][1] is None else torch.cat([spread for _, spread in scored])
        everyone = self.all_gather(rewards).reshape(-1) if self.trainer.world_size > 1 else rewards
        cfg, entry = self.cfg, REWARDS.get(self.reward.name)  # a reward built outside the registry has no entry
        bradley_terry = entry is not None and entry.bradley_terry
        advantages = group_advantages(
            everyone,
            cfg.group_size,
            cfg.advantage,
            cfg.global_std,
            cfg.adv_clip_max,
            bradley_terry and self.reward.scale,
        )
        if self.trainer.world_size > 1:  # gathered rank after rank: this process's share
            advantages = advantages.reshape(self.trainer.world_size, -1)[self.trainer.global_rank]
        kept = [traj.x[i] for i in trained], [x_next[i] for i in trained]
        return Rollout(cond, *kept, old, rewards, advantages, disagreement)

    def steps(self, epoch: int) -> list[Step]:
        return sampler_steps(self.backbone, self.cfg.rollout_steps, self.cfg.noise_level, sde_window=self.window(epoch))

    def step_loss(self, rollout: Rollout, j: int, step: Step) -> tuple[Tensor, dict]:
        """The clipped policy loss and the KL to the base model at trained step `j` (module docstring)."""
        backbone, cfg = self.backbone, self.cfg
        # checkpointed: backward recomputes the step, so one backward over every trained step (as DDP needs) keeps
        # only each step's input
        pred, _ = checkpointed(
            backbone.predict_branches, rollout.x[j], step.t, rollout.cond, cfg.guidance_scale, use_reentrant=False
        )
        mean = step.update(rollout.x[j], pred)[1]
        ratio = torch.exp(log_prob(rollout.x_next[j], mean, step.std) - rollout.old_log_prob[j])
        a = rollout.advantages.to(ratio.dtype)
        policy = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)).mean()
        kl = torch.zeros((), device=mean.device)
        if cfg.kl_weight > 0:
            with torch.no_grad(), backbone.adapters_disabled():
                ref, _ = backbone.predict_branches(rollout.x[j], step.t, rollout.cond, cfg.guidance_scale)
                ref_mean = step.update(rollout.x[j], ref)[1]
            kl = self.gated(((mean - ref_mean) ** 2).flatten(1).mean(1), rollout.disagreement) / (2 * step.std**2)
        stats = {
            "clip_fraction": ((ratio - 1).abs() > cfg.clip_range).float().mean(),
            "approx_kl": 0.5 * (ratio.detach().log() ** 2).mean(),
            "kl_base": kl.detach(),
        }
        return policy + cfg.kl_weight * kl, stats

    def training_step(self, batch, batch_idx) -> None:
        cfg, optimiser = self.cfg, self.optimizers()
        epoch = self.global_step // cfg.inner_epochs
        prompt_indices, seeds = self.rows(epoch)
        rollout = self.rollout([self.prompts[i] for i in prompt_indices], seeds, epoch)
        trained, steps = self.trained_steps(epoch), self.steps(epoch)
        for _ in range(cfg.inner_epochs):
            losses, stats = zip(*(self.step_loss(rollout, j, steps[i]) for j, i in enumerate(trained)))
            loss = torch.stack(losses).mean()
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite GRPO loss ({loss.item()}) at step {self.global_step}")
            self.manual_backward(loss)
            self.clip_gradients(optimiser, gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm")
            optimiser.step()
            optimiser.zero_grad()
        totals = {"loss": loss.detach()} | {k: torch.stack([s[k] for s in stats]).mean() for k in stats[0]}
        groups = rollout.rewards.reshape(-1, cfg.group_size)
        logged = {f"train/{k}": v for k, v in totals.items()} | {
            "train/reward": groups.mean(),
            "train/reward_std": groups.std(1).mean(),
            "train/zero_spread": (groups.std(1) == 0).float().mean(),
        }
        self.log_dict(logged, sync_dist=True, prog_bar=True)

    def train_dataloader(self):
        epochs = self.cfg.train_steps // self.cfg.inner_epochs
        return torch.utils.data.DataLoader(range(epochs), batch_size=None)  # content: see `rows`
