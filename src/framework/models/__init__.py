"""Backbones: loading a model family (framework.config.families) from a hub id or local directory, or building it
in-process (tiny, or full-size with random weights), and setting how its networks run (checkpointing, memory format,
compilation)."""

import torch

from framework.config import ModelConfig
from framework.config.families import FAMILIES
from framework.core.options import resolve
from framework.core.weights import load_pretrained
from framework.models.backbone import Backbone, Cond, StableDiffusionBackbone
from framework.models.flow import FlowMatchingBackbone

__all__ = [
    "DTYPES",
    "Backbone",
    "Cond",
    "FlowMatchingBackbone",
    "StableDiffusionBackbone",
    "build_tiny",
    "load_backbone",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_backbone(cfg: ModelConfig) -> Backbone:
    """The backbone of a validated model config (see framework.config.validate)."""
    family, dtype = FAMILIES[cfg.kind], DTYPES[cfg.dtype]
    size = (cfg.height or cfg.resolution, cfg.width or cfg.resolution)
    if cfg.tiny:
        pipe = build_tiny(cfg.kind, size[0])
    elif cfg.random_weights:
        from framework.models.full_size import build_full_size_pipeline

        pipe = build_full_size_pipeline(cfg.kind)
    else:
        import diffusers

        extra = {"safety_checker": None, "requires_safety_checker": False} if family.safety_checker else {}
        pipe = load_pretrained(
            getattr(diffusers, family.pipeline),
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
    upcast = family.vae_upcast and cfg.dtype == "float16" and pipe.vae.config.get("force_upcast", False)
    vae_dtype = DTYPES[cfg.vae_dtype or ("float32" if upcast else cfg.dtype)]
    if pipe.vae.dtype != vae_dtype:
        pipe.vae.to(dtype=vae_dtype)
    configure_networks(pipe, cfg)
    options = (cfg.max_sequence_length,) if family.flow_matching else ()
    backbone = resolve(family.backbone)(pipe, size, *options)
    backbone.lora_targets = family.lora_targets  # what DRaFT's adapter attaches to
    return backbone


def build_tiny(kind: str, resolution: int):
    """The tiny seeded pipeline of family `kind` (its row's builder)."""
    return resolve(FAMILIES[kind].tiny)(resolution)


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
