"""Full-size SD1.5, SDXL, SD3.5 medium, FLUX.1-dev, Qwen-Image and FLUX.2-dev with seeded random weights, built
in-process from their published configurations.

Speed and memory do not depend on the weights' values, so these stand in for the real checkpoints where none can be
downloaded (benchmarks, the CPU proxy of the full-size path): the same modules with the same shapes, whose images are
noise. The configurations (architectures/<name>/, laid out as a diffusers repository) are those of
stable-diffusion-v1-5 (which SD1.4 shares), stable-diffusion-xl-base-1.0 and stable-diffusion-3.5-medium (MMDiT-X,
CLIP-L and CLIP-G with projections, the T5-XXL encoder, the 16-channel VAE) and FLUX.1-dev (the 12 B transformer,
CLIP-L, T5-XXL, the 16-channel VAE); the tokenizers are the CLIP tokenizer
built offline (SDXL's and SD3's second one pads with "!", as OpenCLIP's does) and, for T5, the small-vocabulary T5
tokenizer: its ids lie within T5's vocabulary and it pads to the same sequence length, which is what cost depends on.
Qwen-Image (the 20 B MMDiT, Qwen2.5-VL-7B with its vision tower, the 3-D VAE) and FLUX.2-dev (the 32 B transformer,
Mistral-Small-3.1 24 B with its vision tower, the batch-normalised VAE) read prompts through the tiny models' offline
byte-level tokenizers, which know their pipelines' templates: ids within the real vocabularies.
"""

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from framework.config.families import FAMILIES
from framework.core.options import resolve
from framework.core.tokenizer import build_clip_tokenizer, build_t5_tokenizer

ARCHITECTURES = Path(__file__).parent / "architectures"
SEED = 0


def _diffusers(cls, folder: Path):
    return cls.from_config(cls.load_config(folder))


def build_full_size_pipeline(kind: str):
    """The pipeline of family `kind` (a row of framework.config.families with an architecture) at full size with
    seeded random weights (the libraries' own initialisation). Built on the default device: `with
    torch.device("meta"):` counts parameters without memory, `with torch.device("cuda"):` initialises on the GPU
    (seconds instead of a minute)."""
    family = FAMILIES[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return resolve(family.full_size)(ARCHITECTURES / family.architecture)


def sd3_pipeline(root: Path) -> StableDiffusion3Pipeline:
    clip = lambda name: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / name))  # noqa: E731
    return StableDiffusion3Pipeline(
        transformer=_diffusers(SD3Transformer2DModel, root / "transformer"),
        scheduler=_diffusers(FlowMatchEulerDiscreteScheduler, root / "scheduler"),
        vae=_diffusers(AutoencoderKL, root / "vae"),
        text_encoder=clip("text_encoder"),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=clip("text_encoder_2"),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        text_encoder_3=T5EncoderModel(T5Config.from_pretrained(root / "text_encoder_3")),
        tokenizer_3=build_t5_tokenizer(),
    )


def flux_pipeline(root: Path) -> FluxPipeline:
    """FLUX.1-dev: the 12 B transformer with guidance embedding, CLIP-L (pooled) and the T5-XXL encoder."""
    return FluxPipeline(
        transformer=_diffusers(FluxTransformer2DModel, root / "transformer"),
        scheduler=_diffusers(FlowMatchEulerDiscreteScheduler, root / "scheduler"),
        vae=_diffusers(AutoencoderKL, root / "vae"),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=T5EncoderModel(T5Config.from_pretrained(root / "text_encoder_2")),
        tokenizer_2=build_t5_tokenizer(),
    )


def unet_pipeline(root: Path):
    """SD1.5, or SDXL where the architecture has a second text encoder."""
    components = dict(
        unet=_diffusers(UNet2DConditionModel, root / "unet"),
        vae=_diffusers(AutoencoderKL, root / "vae"),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")),
        tokenizer=build_clip_tokenizer(),
        scheduler=_diffusers(DDIMScheduler, root / "scheduler"),
    )
    if not (root / "text_encoder_2").is_dir():
        return StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2"))
    return StableDiffusionXLPipeline(
        **components, text_encoder_2=encoder_2, tokenizer_2=build_clip_tokenizer(pad_token="!")
    )


def llm_conditioned(root: Path, pipeline, tokenizer):
    """Qwen-Image or FLUX.2-dev: transformer, VAE and scheduler from their diffusers configurations, the text encoder
    from its transformers configuration; `tokenizer(pipe)` builds the tokenizer that knows the pipeline's template."""
    import diffusers
    import transformers

    components = {
        name: _diffusers(getattr(diffusers, json.loads((root / name / file).read_text())["_class_name"]), root / name)
        for name, file in (
            ("transformer", "config.json"),
            ("vae", "config.json"),
            ("scheduler", "scheduler_config.json"),
        )
    }
    config = transformers.AutoConfig.from_pretrained(root / "text_encoder")
    encoder = getattr(transformers, config.architectures[0])(config)
    pipe = pipeline(**components, text_encoder=encoder, tokenizer=None)
    pipe.register_modules(tokenizer=tokenizer(pipe))
    return pipe
