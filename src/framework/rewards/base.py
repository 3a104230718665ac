"""The Reward contract: `reward(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]`, higher is better."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framework.core.errors import FrameworkError, item_work

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Reward(nn.Module):
    """A frozen scorer. `differentiable` says whether gradients reach the images (gradient methods require it).

    `clamp`: score the images clamped to [0, 1] (what is saved; models trained on real images expect it) or as the
    decoder produced them (toy statistics, as DNO scores them, so out-of-range hacking stays visible and saturated
    pixels keep their gradient). `scale` multiplies the documented score (e.g. 0.01 turns HPS's 100·cos into the raw
    cosine some papers use). Subclasses implement `score`."""

    differentiable: bool = True
    clamp: bool = True
    scale: float = 1.0
    name: str = "reward"

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Scores [B]. Whatever the scoring raises becomes an ItemError: the items it concerns fail, not the run."""
        with item_work(f"reward {self.name}"):
            scores = self.score(images.clamp(0, 1) if self.clamp else images, prompts)
            if scores.shape != (len(images),):
                raise ValueError(f"returned scores of shape {tuple(scores.shape)} for {len(images)} images")
        return self.scale * scores

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError


def clip_preprocess(images: Tensor, size: int) -> Tensor:
    """CLIP's image preprocessing as differentiable torch ops: bicubic resize of the short side to `size`,
    centre crop, normalisation with the OpenAI CLIP mean/std (which HPSv2 and PickScore also use)."""
    height, width = images.shape[-2:]
    if min(height, width) != size:
        scale = size / min(height, width)
        height, width = max(size, int(height * scale)), max(size, int(width * scale))  # floor, as HF does
        images = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    top, left = (height - size) // 2, (width - size) // 2
    images = images[..., top : top + size, left : left + size]
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def load_parts(owner: nn.Module, parts: dict[str, dict[str, Tensor]], checkpoint: str) -> None:
    """Load each submodule of `owner` that `parts` names with its weights (renamed from a published checkpoint):
    every weight it has, and nothing else, or one error line saying the file is not such a `checkpoint`."""
    for part, weights in parts.items():
        missing, unexpected = getattr(owner, part).load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise FrameworkError(
                f"reward.checkpoint: not an {checkpoint} state dict ({part}: {len(missing)} weights missing, e.g. "
                f"{(missing or [None])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or [None])[0]})"
            )
