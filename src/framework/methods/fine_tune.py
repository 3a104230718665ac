"""The fine-tuning methods (method=draft, method=grpo) through the method contract: train the run's LoRA adapter with
the method's training module (its schema's `trainer`; a Lightning `fit` that resumes from the run directory's newest
checkpoint), then sample every item with it like `lora_scale` at α = 1."""

from dataclasses import fields
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import Tensor

from framework.config import held_out_rewards
from framework.config.methods import METHODS, LoRAScaleConfig, SamplingConfig
from framework.core.errors import Interrupted
from framework.core.items import derive_seed
from framework.core.options import resolve
from framework.methods.common import Method
from framework.methods.lora_scale import LoRAScale
from framework.methods.probe import BEST_ADAPTER, ProbeMonitor
from framework.models.lora import WEIGHT_NAME, add_lora, load_lora, restore_lora, save_lora
from framework.rewards.ensemble import disagreement_gate

INTERRUPTED_CKPT = "interrupted.ckpt"


class AdapterTraining(L.LightningModule):
    """What the fine-tuning methods share (DRaFT, GRPO): a fresh LoRA adapter on the denoiser (seeded, so every
    process and every rerun starts from the same one), AdamW over it, and checkpoints that keep the adapter only (the
    frozen model is reloaded from its source), each also written in diffusers' format."""

    def __init__(self, backbone, reward, cfg, prompts: list[str], seed: int, out_dir: Path):
        super().__init__()
        self.backbone, self.reward = backbone, reward
        self.cfg, self.prompts, self.seed, self.out_dir = cfg, prompts, seed, Path(out_dir)
        self.trainable = add_lora(
            backbone.denoiser, backbone.lora_targets, cfg.lora_rank, seed=derive_seed(seed, 1 << 25)
        )
        self.strict_loading = False  # checkpoints hold the adapter only, not the frozen weights

    clips_its_gradients = False  # True for a module that makes its own optimiser steps (Lightning clips the others')

    def score(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        """The reward of each image and, where the KL is gated (`method.kl_gate` < 1, an ensemble reward), the
        members' disagreement on it."""
        if self.cfg.kl_gate >= 1:
            return self.reward(images, prompts), None
        return self.reward.scored(images, prompts)

    def gated(self, per_sample: Tensor, disagreement: Tensor | None) -> Tensor:
        """The batch mean of a per-sample KL term, counted only on the gated samples (GARDO) when gating."""
        if disagreement is None:
            return per_sample.mean()
        return (per_sample * disagreement_gate(disagreement, self.cfg.kl_gate)).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
        if self.trainer.is_global_zero:
            save_lora(self.backbone, self.out_dir / "checkpoints" / f"adapter-step{self.global_step:06d}")


class FineTuneThenSample(Method):
    """`prepare` trains the run's adapter (or reuses it when an earlier attempt finished) and returns the method that
    samples the items with it, LoRA scale 1 on the method's own sampler (base image = adapters off, same seed)."""

    def trainer_options(self, cfg) -> dict:
        """Step budget, gradient clipping, resumable checkpoints every `save_every` steps and at a stop signal or an
        error, the probe set; the runner adds the loggers of the training curves (framework.runner.tracking)."""
        from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

        directory = Path(cfg.output_dir) / "checkpoints"
        checkpoints = ModelCheckpoint(
            dirpath=directory,
            every_n_train_steps=cfg.method.save_every,
            save_last=True,
            save_top_k=-1,
            filename="step{step:06d}",
            auto_insert_metric_name=False,
        )
        # a stop signal (Lightning raises at the end of the current step) or an error: save where training stopped
        on_stop = OnExceptionCheckpoint(directory, filename=INTERRUPTED_CKPT.removesuffix(".ckpt"))
        probe = []
        if cfg.monitor.every or cfg.method.sample_every:
            evaluations = cfg.method.train_steps // cfg.monitor.every + 1 if cfg.monitor.every else 0
            held_out, out_dir = held_out_rewards(cfg), Path(cfg.output_dir)
            probe = [ProbeMonitor(cfg.monitor, held_out, out_dir, cfg.method.sample_every, evaluations=evaluations)]
        return {
            "max_steps": cfg.method.train_steps,
            # a module that makes its own optimiser steps (GRPO) clips its gradients itself
            "gradient_clip_val": None if self.trainer_class(cfg).clips_its_gradients else cfg.method.grad_clip,
            "callbacks": [checkpoints, on_stop, *probe],
            "enable_checkpointing": True,
            "log_every_n_steps": 1,
        }

    @staticmethod
    def trainer_class(cfg) -> type[AdapterTraining]:
        return resolve(METHODS[cfg.method.name].trainer)

    def prepare(self, cfg, trainer: L.Trainer, backbone, reward, metrics) -> Method:
        from framework.config.prompts import load_prompts

        adapter = Path(cfg.output_dir) / "adapter"
        if (adapter / WEIGHT_NAME).exists():
            load_lora(backbone.denoiser, adapter)
        else:
            for probe in (c for c in trainer.callbacks if isinstance(c, ProbeMonitor)):
                probe.metrics = metrics
            prompts = load_prompts(cfg.prompts)
            module = self.trainer_class(cfg)(backbone, reward, cfg.method, prompts, cfg.seed, Path(cfg.output_dir))
            adapter = train(trainer, module, select_best=cfg.monitor.select == "best_held_out")
        sampling = {f.name: cfg.method[f.name] for f in fields(SamplingConfig)}  # the method's own sampler
        return LoRAScale(OmegaConf.structured(LoRAScaleConfig(**sampling, adapter=str(adapter), alpha=1.0)))


def train(trainer: L.Trainer, module: AdapterTraining, select_best: bool = False) -> Path:
    """Fit, resuming from the newest checkpoint of the run directory if there is one (the periodic `last.ckpt`, or
    `interrupted.ckpt` written when a stop signal or an error stopped training); returns the adapter directory, which
    holds the last adapter or, with `select_best`, the one of the probe evaluation the held-out reward scored best
    (framework.methods.probe; the last one stays in checkpoints/)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    directory = module.out_dir / "checkpoints"
    saved = [directory / name for name in ("last.ckpt", INTERRUPTED_CKPT) if (directory / name).exists()]
    resume = max(saved, key=lambda p: p.stat().st_mtime_ns, default=None)
    try:
        trainer.fit(module, ckpt_path=resume, weights_only=True)
    except SIGTERMException:
        raise Interrupted(
            f" at training step {trainer.global_step}: resumable checkpoint "
            f"{directory / INTERRUPTED_CKPT}; rerun the same command to resume"
        ) from None
    adapter = module.out_dir / "adapter"
    if select_best:
        restore_lora(module.backbone.denoiser, module.out_dir / "checkpoints" / BEST_ADAPTER)
    if trainer.is_global_zero:
        save_lora(module.backbone, adapter)
    trainer.strategy.barrier()
    return adapter
