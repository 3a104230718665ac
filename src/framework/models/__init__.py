"""Backbones: loading SD1.x / SDXL from a hub id or local directory, or building tiny ones in-process."""

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from framework.config import ModelConfig
from framework.models.backbone import Backbone, Cond, StableDiffusionBackbone
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
    vae_dtype = DTYPES[cfg.vae_dtype or cfg.dtype]
    if pipe.vae.dtype != vae_dtype:
        pipe.vae.to(dtype=vae_dtype)
    return StableDiffusionBackbone(pipe, cfg.resolution)
