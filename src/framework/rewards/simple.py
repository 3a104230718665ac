"""Rewards without a network: JPEG compressibility (non-differentiable), toy image statistics, any callable."""

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from framework.core.options import resolve
from framework.rewards.base import Reward


class JpegCompressibility(Reward):
    """−(JPEG file size in kB) at the given quality: flat, simple images score higher. Not differentiable (the
    registry says so; the PIL encoder cuts the graph)."""

    def __init__(self, quality: int = 95):
        super().__init__()
        self.quality = quality

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        sizes = []
        for array in pixels.numpy():
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)


class ImageStatistic(Reward):
    """Toy rewards with closed forms, for hacking experiments and tests:
    brightness = mean pixel; darkness = −mean pixel; contrast = std of the grey image;
    saturation = mean chroma max(r,g,b) − min(r,g,b). By default they read the raw decoder output (DNO's reading)."""

    clamp = False

    STATISTICS = {
        "brightness": lambda x: x.flatten(1).mean(1),  # any shape: also the analytic backbone's vectors
        "darkness": lambda x: -x.flatten(1).mean(1),
        "contrast": lambda x: x.mean(1).flatten(1).std(1),
        "saturation": lambda x: (x.amax(1) - x.amin(1)).mean((1, 2)),
    }

    def __init__(self, statistic: str):
        super().__init__()
        self.statistic = statistic

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.STATISTICS[self.statistic](images.float())


class CallableReward(Reward):
    """Any `f(images, prompts) -> scores` importable as "package.module:function"; scores may be a tensor, a list
    or an array. Unless declared differentiable (`reward.differentiable`, which build_reward sets) it only ever sees
    detached images."""

    differentiable = False

    def __init__(self, target: str):
        super().__init__()
        self.fn = resolve(target)
        if not callable(self.fn):
            module_name, _, attr = target.partition(":")
            raise ValueError(f"{attr} of {module_name} is a {type(self.fn).__name__}, not a function")

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        if not self.differentiable:
            with torch.no_grad():
                scores = self.fn(images.detach(), prompts)
            scores = scores.detach() if isinstance(scores, Tensor) else np.asarray(scores, dtype=np.float32)
        else:
            scores = self.fn(images, prompts)
        return torch.as_tensor(scores, dtype=torch.float32, device=images.device).reshape(len(images))
