"""Backbones: loading SD1.x / SDXL from a hub id or local directory, or building them in-process (tiny, or full-size
with random weights), and setting how their networks run (checkpointing, memory format, compilation)."""

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from framework.config import ModelConfig
from framework.models.backbone import Backbone, Cond, StableDiffusionBackbone
from framework.models.full_size import build_full_size_pipeline
from framework.models.tiny import build_tiny_pipeline
from framework.weights import load_pretrained

__all__ = ["DTYPES", "Backbone", "Cond", "StableDiffusionBackbone", "load_backbone"]

PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_backbone(cfg: ModelConfig) -> Backbone:
    """The backbone of a validated model config (see framework.config.validate)."""
    kind, dtype = cfg.kind, DTYPES[cfg.dtype]
    if cfg.tiny:
        pipe = build_tiny_pipeline(kind, cfg.resolution)
    elif cfg.random_weights:
        pipe = build_full_size_pipeline(kind)
    else:
        extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd" else {}
        pipe = load_pretrained(
            PIPELINES[kind],
            cfg.source,
            key="model.source",
            revision=cfg.revision,
            variant=cfg.variant,
            dtype=dtype,
            use_safetensors=True,
            **extra,
        )
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    # Unset vae_dtype: the model's, except float32 for an SDXL VAE that overflows in float16 (force_upcast), as
    # diffusers' SDXL pipeline does; bfloat16 has the range, and the SD1.x pipeline never upcasts.
    upcast = kind == "sdxl" and cfg.dtype == "float16" and pipe.vae.config.get("force_upcast", False)
    vae_dtype = DTYPES[cfg.vae_dtype or ("float32" if upcast else cfg.dtype)]
    if pipe.vae.dtype != vae_dtype:
        pipe.vae.to(dtype=vae_dtype)
    configure_networks(pipe, cfg)
    return StableDiffusionBackbone(pipe, cfg.resolution)


def configure_networks(pipe, cfg: ModelConfig) -> None:
    """The runtime options of a model config; attention is diffusers' default, PyTorch's fused SDPA kernels."""
    if cfg.vae_checkpointing:
        pipe.vae.enable_gradient_checkpointing()
    if cfg.unet_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    if cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if cfg.compile:
        pipe.unet.compile()
