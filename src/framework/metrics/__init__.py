"""Measurements of an item's images besides the optimised reward, taken without gradients: drift from the item's
base image (same seed) and, on the testbed, ground-truth prompt adherence."""

import torch
from torch import Tensor

from framework.testbed.judge import judge_log_prob
from framework.testbed.shapes import is_caption


class ImageMetrics:
    def __init__(self, judge=None):
        self.judge = judge  # framework.testbed.judge.Judge, for ground-truth adherence

    @torch.no_grad()
    def __call__(self, images: Tensor, prompt: str, base: Tensor | None = None) -> dict[str, float]:
        """Means over the batch: `drift_rmse` (pixel RMSE to `base`), and for prompts of the shapes world
        `adherence` (judge: colour and shape both right) and `judge_log_prob`; other prompts have no ground truth."""
        metrics = {}
        if base is not None:
            metrics["drift_rmse"] = (images - base).flatten(1).square().mean(1).sqrt().mean().item()
        if self.judge is not None and is_caption(prompt):

            log_prob, correct = judge_log_prob(self.judge.to(images.device), images.float(), [prompt] * len(images))
            metrics |= {"adherence": correct.mean().item(), "judge_log_prob": log_prob.mean().item()}
        return metrics
