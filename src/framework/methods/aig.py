"""AIG, annealed importance guidance (arXiv 2409.06493): at sampler step i of N (i = 0 noisiest) the prediction is
ε = (1 − γ_i)·ε̃_base + γ_i·ε̃_ft, each with its own CFG, so early (layout) steps follow the base model and late
(detail) steps the fine-tuned one. Base = the same denoiser (UNet or transformer) with its adapters off; on flow
models the mixed predictions are velocities. Schedules: power γ_i = (i/N)^p (p = 0: fine-tuned only, p = ∞: base
only), linear (p = 1), step γ_i = 1[i/N ≥ f]."""

import math

import torch

from framework.core.items import ItemResult
from framework.methods.common import Method, Problem, paired_results
from framework.models.lora import load_lora


def aig_gamma(schedule: str, i: int, n: int, p: float = 1.0, f: float = 0.5) -> float:
    if schedule == "step":
        return float(i / n >= f)
    p = 1.0 if schedule == "linear" else p
    if math.isinf(p):
        return 0.0
    return (i / n) ** p  # 0 ** 0 = 1: p = 0 is the fine-tuned model at every step


class AIG(Method):
    def prepare(self, run_cfg, trainer, backbone, reward, metrics) -> Method:
        load_lora(backbone.denoiser, self.cfg.adapter)
        return self

    @torch.no_grad()
    def run(self, problem: Problem) -> list[ItemResult]:
        cfg = self.cfg
        noise = problem.noise()
        with problem.backbone.adapters_disabled():
            base, _ = problem.render(*noise)
        images, traj = problem.render(*noise, mix=lambda i: aig_gamma(cfg.schedule, i, cfg.num_steps, cfg.p, cfg.f))
        return paired_results(problem, base, images, traj=traj)
