"""Backbones: loading SD1.x / SDXL / SD3 / FLUX.1 / Qwen-Image / FLUX.2 from a hub id or local directory, or building
them in-process (tiny, or full-size with random weights), and setting how their networks run (checkpointing, memory
format, compilation)."""

import diffusers
import torch

from framework.config import FLOW_KINDS, MODEL_KINDS, ModelConfig
from framework.models.backbone import Backbone, Cond, StableDiffusionBackbone
from framework.models.flow import FlowMatchingBackbone
from framework.models.flux2 import Flux2Backbone
from framework.models.full_size import build_full_size_pipeline
from framework.models.qwen_image import QwenImageBackbone
from framework.models.tiny import build_tiny_flow_pipeline, build_tiny_pipeline
from framework.weights import load_pretrained

__all__ = [
    "DTYPES",
    "FLOW_BACKBONES",
    "Backbone",
    "Cond",
    "FlowMatchingBackbone",
    "StableDiffusionBackbone",
    "load_backbone",
]

FLOW_BACKBONES = {"qwen_image": QwenImageBackbone, "flux2": Flux2Backbone, "flux2_klein": Flux2Backbone}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_backbone(cfg: ModelConfig) -> Backbone:
    """The backbone of a validated model config (see framework.config.validate)."""
    kind, dtype = cfg.kind, DTYPES[cfg.dtype]
    size = (cfg.height or cfg.resolution, cfg.width or cfg.resolution)
    if cfg.tiny:
        pipe = (build_tiny_flow_pipeline if kind in FLOW_KINDS else build_tiny_pipeline)(kind, size[0])
    elif cfg.random_weights:
        pipe = build_full_size_pipeline(kind)
    else:
        extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd" else {}
        pipe = load_pretrained(
            getattr(diffusers, MODEL_KINDS[kind].pipeline),
            cfg.source,
            key="model.source",
            revision=cfg.revision,
            variant=cfg.variant,
            dtype=dtype,
            use_safetensors=True,
            **extra,
        )
    if denoiser(pipe).dtype != dtype:
        pipe.to(dtype=dtype)
    # Unset vae_dtype: the model's, except float32 for an SDXL VAE that overflows in float16 (force_upcast), as
    # diffusers' SDXL pipeline does; bfloat16 has the range, and the SD1.x pipeline never upcasts.
    upcast = kind == "sdxl" and cfg.dtype == "float16" and pipe.vae.config.get("force_upcast", False)
    vae_dtype = DTYPES[cfg.vae_dtype or ("float32" if upcast else cfg.dtype)]
    if pipe.vae.dtype != vae_dtype:
        pipe.vae.to(dtype=vae_dtype)
    configure_networks(pipe, cfg)
    if kind in FLOW_KINDS:
        return FLOW_BACKBONES.get(kind, FlowMatchingBackbone)(pipe, size, cfg.max_sequence_length)
    return StableDiffusionBackbone(pipe, size)


def denoiser(pipe) -> torch.nn.Module:
    """The UNet of an SD pipeline, the transformer of a flow-matching one."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def configure_networks(pipe, cfg: ModelConfig) -> None:
    """The runtime options of a model config; attention is diffusers' default, PyTorch's fused SDPA kernels.
    `unet_checkpointing` and `compile` apply to the denoiser, UNet or transformer; channels-last to convolutions
    (the UNet and the VAE); `vae_checkpointing` to the VAEs diffusers can checkpoint (all but Qwen-Image's)."""
    if cfg.vae_checkpointing and pipe.vae._supports_gradient_checkpointing:  # Qwen-Image's 3-D VAE does not
        pipe.vae.enable_gradient_checkpointing()
    if cfg.unet_checkpointing:
        denoiser(pipe).enable_gradient_checkpointing()
    if cfg.channels_last:  # each convolution in its rank's format: Qwen-Image's VAE mixes 3-D and 2-D ones
        for module in (getattr(pipe, "unet", None), pipe.vae):
            for layer in module.modules() if module is not None else ():
                if isinstance(layer, (torch.nn.Conv2d, torch.nn.Conv3d)):
                    three_d = isinstance(layer, torch.nn.Conv3d)
                    layer.to(memory_format=torch.channels_last_3d if three_d else torch.channels_last)
    if cfg.compile:
        denoiser(pipe).compile()
