"""Backbones: loading SD1.x / SDXL from a hub id or local directory, or building tiny ones in-process."""

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from framework.config import ModelConfig, choose
from framework.errors import FrameworkError
from framework.models.backbone import Backbone, Cond, StableDiffusionBackbone
from framework.models.tiny import build_tiny_pipeline
from framework.weights import load_pretrained

__all__ = ["Backbone", "Cond", "StableDiffusionBackbone", "load_backbone", "torch_dtype"]

PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str, key: str) -> torch.dtype:
    return DTYPES[choose(name, tuple(DTYPES), key)]


def load_backbone(cfg: ModelConfig) -> Backbone:
    kind = choose(cfg.kind, tuple(PIPELINES), "model.kind")
    dtype = torch_dtype(cfg.dtype, "model.dtype")
    if cfg.tiny:
        pipe = build_tiny_pipeline(kind, cfg.resolution)
    elif cfg.source is None:
        raise FrameworkError("model.source is not set: give a hub id or a local directory (or use model.tiny=true)")
    else:
        extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd" else {}
        pipe = load_pretrained(PIPELINES[kind], cfg.source, key="model.source", revision=cfg.revision,
                               variant=cfg.variant, dtype=dtype, use_safetensors=True, **extra)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    vae_dtype = torch_dtype(cfg.vae_dtype or cfg.dtype, "model.vae_dtype")
    if pipe.vae.dtype != vae_dtype:
        pipe.vae.to(dtype=vae_dtype)
    return StableDiffusionBackbone(pipe, cfg.resolution)
