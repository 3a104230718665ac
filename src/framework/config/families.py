"""The model families' one table: a row per family (`model.kind`) states everything the package needs to know of
it, as names only, so that config validation reads it without loading diffusers. The builders, the loader, LoRA
targeting, the full-size architectures and the docs' list all read it from here; a family that differs from the
others in code has its own module in framework.models (qwen_image.py, flux2.py). Adding a family is one row here
and, where its pipeline differs, one module (docs/extending.md)."""

from dataclasses import dataclass

# Attention projections and feed-forward linears of every transformer block (SD1.x and SDXL share the names).
UNET_LORA = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
# SD3's and FLUX's joint blocks add the text stream's projections and MLP (Qwen-Image names its two MLPs img_mlp and
# txt_mlp, FLUX.2 its feed-forwards linear_in/linear_out); FLUX.1's single-stream blocks fuse their MLP into
# proj_mlp/proj_out, FLUX.2's fuse attention and MLP into attn.to_qkv_mlp_proj/attn.to_out (single-block regexes, so
# that the transformer's final proj_out is left alone).
TRANSFORMER_LORA = (
    r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
    r"|(ff|ff_context|img_mlp|txt_mlp)\.net\.0\.proj|(ff|ff_context|img_mlp|txt_mlp)\.net\.2"
    r"|(ff|ff_context)\.linear_(in|out))"
    r"|.*single_transformer_blocks\.\d+\.(proj_mlp|proj_out|attn\.to_qkv_mlp_proj|attn\.to_out)"
)
SD, FLOW = "framework.models.backbone:StableDiffusionBackbone", "framework.models.flow:FlowMatchingBackbone"


@dataclass(frozen=True)
class Family:
    """A model family. Callables are "module:name", imported when used: `backbone(pipe, (height, width),
    max_sequence_length)` wraps a pipeline, `tiny(resolution)` builds the tiny seeded pipeline, `full_size(root)`
    the published architecture of models/architectures/<architecture>/ with seeded random weights."""

    label: str  # what the docs call it
    pipeline: str  # the diffusers pipeline class that loads it (`model.source`)
    backbone: str
    tiny: str
    lora_targets: str | tuple[str, ...]  # peft's target_modules on the denoiser: names, or one regex
    flow_matching: bool = False  # predicts a flow-matching velocity (Euler sampler) instead of ε (DDIM)
    max_text_tokens: int | None = None  # most text tokens `model.max_sequence_length` may ask (None: not read)
    architecture: str | None = None  # directory of its full-size architecture (None: model.random_weights refused)
    full_size: str | None = None
    safety_checker: bool = False  # its pipeline loads a safety checker, which the framework leaves out
    vae_upcast: bool = False  # a float16 VAE that overflows (force_upcast) decodes in float32, as diffusers does


FAMILIES: dict[str, Family] = {
    "sd": Family(
        "SD1.x",
        "StableDiffusionPipeline",
        SD,
        "framework.models.tiny:tiny_sd",
        UNET_LORA,
        architecture="sd15",  # SD1.4 shares it
        full_size="framework.models.full_size:unet_pipeline",
        safety_checker=True,
    ),
    "sdxl": Family(
        "SDXL",
        "StableDiffusionXLPipeline",
        SD,
        "framework.models.tiny:tiny_sdxl",
        UNET_LORA,
        architecture="sdxl",
        full_size="framework.models.full_size:unet_pipeline",
        vae_upcast=True,
    ),
    "sd3": Family(
        "SD3, SD3.5",
        "StableDiffusion3Pipeline",
        FLOW,
        "framework.models.tiny:tiny_sd3",
        TRANSFORMER_LORA,
        flow_matching=True,
        max_text_tokens=512,  # T5's
        architecture="sd35",  # medium
        full_size="framework.models.full_size:sd3_pipeline",
    ),
    "flux": Family(
        "FLUX.1",
        "FluxPipeline",
        FLOW,
        "framework.models.tiny:tiny_flux",
        TRANSFORMER_LORA,
        flow_matching=True,
        max_text_tokens=512,  # T5's
        architecture="flux1",  # dev
        full_size="framework.models.full_size:flux_pipeline",
    ),
    "qwen_image": Family(
        "Qwen-Image",
        "QwenImagePipeline",
        "framework.models.qwen_image:QwenImageBackbone",
        "framework.models.qwen_image:build_tiny",
        TRANSFORMER_LORA,
        flow_matching=True,
        max_text_tokens=1024,
        architecture="qwen_image",
        full_size="framework.models.qwen_image:build_full_size",
    ),
    "flux2": Family(
        "FLUX.2-dev",
        "Flux2Pipeline",
        "framework.models.flux2:Flux2Backbone",
        "framework.models.flux2:build_tiny",
        TRANSFORMER_LORA,
        flow_matching=True,
        max_text_tokens=1024,
        architecture="flux2",
        full_size="framework.models.flux2:build_full_size",
    ),
    "flux2_klein": Family(
        "FLUX.2 klein",
        "Flux2KleinPipeline",
        "framework.models.flux2:Flux2Backbone",
        "framework.models.flux2:build_tiny_klein",
        TRANSFORMER_LORA,
        flow_matching=True,
        max_text_tokens=1024,
    ),
}


def flow_kinds() -> tuple[str, ...]:
    return tuple(name for name, family in FAMILIES.items() if family.flow_matching)
