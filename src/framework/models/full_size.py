"""Full-size SD1.5 and SDXL with seeded random weights, built in-process from their published configurations.

Speed and memory do not depend on the weights' values, so these stand in for the real checkpoints where none can be
downloaded (benchmarks, the CPU proxy of the full-size path): the same modules with the same shapes, whose images are
noise. The configurations (architectures/<name>/, laid out as a diffusers repository) are those of
stable-diffusion-v1-5 (which SD1.4 shares) and stable-diffusion-xl-base-1.0; the tokenizers are the CLIP tokenizer
built offline (SDXL's second one pads with "!", as OpenCLIP's does).
"""

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from framework.models.tokenizer import build_clip_tokenizer

ARCHITECTURES = Path(__file__).parent / "architectures"
ARCHITECTURE_OF_KIND = {"sd": "sd15", "sdxl": "sdxl"}
SEED = 0


def _diffusers(cls, folder: Path):
    return cls.from_config(cls.load_config(folder))


def build_full_size_pipeline(kind: str):
    """The pipeline of `kind` ("sd" or "sdxl") at full size with seeded random weights (the libraries' own
    initialisation). Built on the default device: `with torch.device("meta"):` counts parameters without memory,
    `with torch.device("cuda"):` initialises on the GPU (seconds instead of a minute)."""
    root = ARCHITECTURES / ARCHITECTURE_OF_KIND[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        components = dict(
            unet=_diffusers(UNet2DConditionModel, root / "unet"),
            vae=_diffusers(AutoencoderKL, root / "vae"),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")),
            tokenizer=build_clip_tokenizer(),
            scheduler=_diffusers(DDIMScheduler, root / "scheduler"),
        )
        if kind == "sd":
            return StableDiffusionPipeline(
                **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2"))
        return StableDiffusionXLPipeline(
            **components, text_encoder_2=encoder_2, tokenizer_2=build_clip_tokenizer(pad_token="!")
        )
