"""DRaFT (arXiv 2309.17400): fine-tune LoRA adapters of the denoiser (the UNet, or a flow model's transformer) by
back-propagating the reward through sampling.

DRaFT-K: only the last K sampler steps keep gradients (K = null: full DRaFT); loss −mean r(decode(x_0)), x_0 the
sampler's output (as DRaFT and NeMo-Aligner's DRaFT+ score it). DRaFT-LV: sample x0 without gradients, re-noise it
n times to the last timestep (x_t = signal·x0 + noise·ε: √ᾱ and √(1−ᾱ) for DDIM, 1−σ and σ for flow matching) and
take one step with gradients each, scoring its x̂0 (x_t − σ·v̂ on flow models); loss −Σ_i mean r(x̂0^i). DRaFT+KL adds
λ·mean over the differentiated steps of mean((p̃_ft − sg p̃_base)²), p the backbone's prediction (ε, or the velocity
on flow models), the base one being the same denoiser with adapters off at the same x_t: the mean-squared
prediction difference that stands for the KL (logged as `train/eps_mse` for either).

Training is a Lightning `fit` (framework.methods.fine_tune runs it, resumes it and samples the items after). The
prompts and noises of optimiser step s derive from (seed, s, row) only, and each process takes rows rank::world of
the global batch, so a resumed run, or a DDP run with the same global batch, sees exactly the data of an
uninterrupted single-process run.
"""

import numpy as np
import torch
from torch import Tensor

from framework.core.errors import NonFiniteLoss
from framework.core.items import derive_seed
from framework.methods.common import draw_noise, sampler_options
from framework.methods.fine_tune import AdapterTraining
from framework.models.sampling import sample, sampler_steps


class DRaFT(AdapterTraining):
    def rows(self, step: int) -> tuple[list[int], list[int]]:
        """Prompt indices and noise seeds of this process's share of optimiser step `step`'s global batch."""
        batch, world = self.cfg.train_batch_size, self.trainer.world_size
        rng = np.random.default_rng(derive_seed(self.seed, 1 << 21, step))
        prompt_indices = rng.integers(len(self.prompts), size=batch).tolist()
        seeds = [derive_seed(self.seed, 1 << 22, step, row) for row in range(batch)]
        rank = self.trainer.global_rank
        return prompt_indices[rank::world], seeds[rank::world]

    def losses(self, prompts: list[str], seeds: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """(−mean reward, mean reward, mean-squared ε difference to the base model) of one batch."""
        cfg, backbone = self.cfg, self.backbone
        cond = backbone.encode(prompts)
        x_T, noises = draw_noise(backbone, cfg, seeds)
        sampler = sampler_options(cfg)
        if cfg.variant == "k":
            traj = sample(backbone, cond, x_T, noises, checkpoint=cfg.checkpoint, grad_steps=cfg.k, **sampler)
            first = cfg.num_steps - (cfg.k or cfg.num_steps)
            rewards, disagreement = self.score(backbone.decode(traj.latents), prompts)
            differentiated = list(zip(traj.x[first:], traj.timesteps[first:], traj.predictions[first:]))
        else:
            with torch.no_grad():
                x0 = sample(backbone, cond, x_T, noises, **sampler).latents
            last = sampler_steps(backbone, cfg.num_steps, 0.0)[-1]
            rewards, disagreement, differentiated = 0, None, []
            for i in range(cfg.lv_samples):
                fresh = torch.stack(
                    [
                        torch.randn(
                            x0.shape[1:], generator=torch.Generator().manual_seed(derive_seed(seed, 1 << 23, i))
                        )
                        for seed in seeds
                    ]
                ).to(x0.device)
                x1 = last.signal * x0 + last.noise * fresh
                pred = backbone.predict(x1, last.t, cond, cfg.guidance_scale)
                x0_hat, _ = last.update(x1, pred)
                scores, spread = self.score(backbone.decode(x0_hat), prompts)
                rewards = rewards + scores
                disagreement = spread if disagreement is None else disagreement + spread  # gated by the sum
                differentiated.append((x1, last.t, pred))
        eps_mse = torch.zeros((), device=x_T.device)
        if cfg.kl_weight > 0:
            with torch.no_grad(), backbone.adapters_disabled():
                base = [backbone.predict(x.detach(), t, cond, cfg.guidance_scale) for x, t, _ in differentiated]
            per_step = [(p - b).square().flatten(1).mean(1) for (_, _, p), b in zip(differentiated, base)]
            eps_mse = self.gated(torch.stack(per_step).mean(0), disagreement)
        return -rewards.mean(), rewards.mean() / (1 if cfg.variant == "k" else cfg.lv_samples), eps_mse

    def training_step(self, batch, batch_idx) -> Tensor:
        step = self.global_step
        prompt_indices, seeds = self.rows(step)
        reward_loss, reward, eps_mse = self.losses([self.prompts[i] for i in prompt_indices], seeds)
        loss = reward_loss + self.cfg.kl_weight * eps_mse
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite DRaFT loss ({loss.item()}) at step {step}")
        self.log_dict(
            {"train/loss": loss, "train/reward": reward, "train/eps_mse": eps_mse}, sync_dist=True, prog_bar=True
        )
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(self.cfg.train_steps), batch_size=None)  # content: see `rows`
