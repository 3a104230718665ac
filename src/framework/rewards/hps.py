"""HPSv2 (v2.0 / v2.1): open_clip ViT-H-14 with the HPS state dict; score = 100·cos(image, text).

`hpsv2.score` itself is not differentiable, downloads LAION weights and takes no local path, so we load the same
architecture through open_clip directly (its ViT-H-14 has exactly the keys and shapes of hpsv2's copy).
"""

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from framework.rewards.base import Reward, clip_preprocess

TINY_ARCH = "framework-tiny-ViT"  # ViT-H-14's structure at toy size (conf: rewards/tiny-open-clip/)
open_clip.add_model_config(Path(__file__).parent / "tiny-open-clip")


class HPSReward(Reward):
    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self._text_cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            device = self.model.logit_scale.device
            feats = self.model.encode_text(self.tokenizer(missing).to(device)).float()
            self._text_cache.update(zip(missing, F.normalize(feats, dim=-1)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        size = self.model.visual.image_size
        pixels = clip_preprocess(images, size[0] if isinstance(size, tuple) else size)
        dtype = self.model.logit_scale.dtype
        image = F.normalize(self.model.encode_image(pixels.to(dtype)).float(), dim=-1)
        return 100 * (image * self.text_embeds(prompts).to(images.device)).sum(-1)

    def _apply(self, fn, recurse=True):
        self._text_cache.clear()
        return super()._apply(fn, recurse)


def load_hps(arch: str, checkpoint: Path | None, dtype: torch.dtype) -> HPSReward:
    """`checkpoint=None` builds `arch` with seeded random weights (tiny smoke versions, full-size benchmarks), on
    the default device (see models.full_size)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pretrained = str(checkpoint) if checkpoint else None
        model = open_clip.create_model(arch, pretrained=pretrained, device=torch.get_default_device())
    return HPSReward(model.to(dtype), open_clip.get_tokenizer(arch))
