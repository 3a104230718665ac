"""LoRA scaling: sample with a trained adapter scaled by α, W = W0 + α·BA (α = 0: base model, α = 1: fine-tuned).
The item's base image is the adapter-free sample of the same seed."""

import torch

from framework.core.items import ItemResult
from framework.methods.common import Method, Problem, paired_results
from framework.models.lora import load_lora, set_lora_scale


class LoRAScale(Method):
    def prepare(self, run_cfg, trainer, backbone, reward, metrics) -> Method:
        load_lora(backbone.denoiser, self.cfg.adapter)
        return self

    @torch.no_grad()
    def run(self, problem: Problem) -> list[ItemResult]:
        noise = problem.noise()
        with problem.backbone.adapters_disabled():
            base, _ = problem.render(*noise)
        set_lora_scale(problem.backbone.denoiser, self.cfg.alpha)
        try:
            images, traj = problem.render(*noise)
            return paired_results(problem, base, images, {"alpha": self.cfg.alpha}, traj)
        finally:
            set_lora_scale(problem.backbone.denoiser, 1.0)
