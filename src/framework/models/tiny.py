"""Tiny random-weight SD1.x and SDXL pipelines, built in-process in milliseconds.

They have the real architectures' structure (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIP text
encoders, SDXL's second encoder with pooled embeds and time ids) at a size that runs on a CPU, so every code path
of the real models is exercised by tests without downloading anything. Weights are seeded: the same every time.
"""

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from framework.models.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer

TINY_SEED = 0


def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion's training schedule (scaled-linear betas, 1000 steps, leading spacing)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def tiny_text_encoder(projection: bool = False, hidden_size: int = 32):
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_vae(sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=sample_size,
    )


def build_tiny_pipeline(kind: str, resolution: int = 64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet_common = dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=resolution // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        )
        tokenizer = build_clip_tokenizer()
        if kind == "sd":
            unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=4, **unet_common)
            return StableDiffusionPipeline(
                vae=tiny_vae(resolution),
                text_encoder=tiny_text_encoder(),
                tokenizer=tokenizer,
                unet=unet,
                scheduler=sd_scheduler(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        # SDXL: hidden states of both encoders are concatenated (32 + 32); the added embedding takes the pooled
        # embeds of encoder 2 (32) plus 6 time ids × addition_time_embed_dim (8).
        unet = UNet2DConditionModel(
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            **unet_common,
        )
        return StableDiffusionXLPipeline(
            vae=tiny_vae(resolution),
            text_encoder=tiny_text_encoder(),
            text_encoder_2=tiny_text_encoder(projection=True),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=sd_scheduler(),
        )
