"""Tiny random-weight SD1.x, SDXL, SD3 and FLUX.1 pipelines, built in-process in milliseconds (Qwen-Image's and
FLUX.2's are built in their own modules from the parts here).

They have the real architectures' structure (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIP text
encoders, SDXL's second encoder with pooled embeds and time ids; SD3's MMDiT and FLUX's transformer with their CLIP
and T5 encoders and the 16-channel VAE; Qwen-Image's and FLUX.2's transformers with their LLM text encoders, chat
templates and VAEs) at a size that runs on a CPU, so every code path of the real models is exercised by tests without
downloading anything. Weights are seeded: the same every time.
"""

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

from framework.core.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer, build_t5_tokenizer

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


def tiny_vae(sample_size: int, latent_channels: int = 4, **config) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=sample_size,
        **config,
    )


def unet_common(resolution: int) -> dict:
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


def tiny_sd(resolution: int = 64) -> StableDiffusionPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=4, **unet_common(resolution))
        return StableDiffusionPipeline(
            vae=tiny_vae(resolution),
            text_encoder=tiny_text_encoder(),
            tokenizer=build_clip_tokenizer(),
            unet=unet,
            scheduler=sd_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def tiny_sdxl(resolution: int = 64) -> StableDiffusionXLPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        tokenizer = build_clip_tokenizer()
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
            **unet_common(resolution),
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


# Flow-matching models: SD3's scheduler (static shift 3, as SD3.5) and FLUX.1-dev's (shift by image size).
SD3_SCHEDULER = dict(shift=3.0)
FLUX_SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)


def tiny_flow_vae(sample_size: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """The 16-channel latent VAE of SD3 and FLUX (no quant convs, a shift besides the scale), tiny."""
    return tiny_vae(
        sample_size,
        16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_t5_encoder(d_model: int = 32) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(build_t5_tokenizer()),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def tiny_sd3(resolution: int = 32) -> StableDiffusion3Pipeline:
    """SD3 (MMDiT, CLIP-L and CLIP-G with projections, T5) with tiny seeded weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        clip_tokenizer = build_clip_tokenizer()
        latent = resolution // 2  # the tiny VAE downsamples 2×
        # hidden states: both CLIPs' (32 + 32) padded to T5's width (64) and joined with T5's along the
        # sequence; pooled: both CLIPs' projections (32 + 32)
        transformer = SD3Transformer2DModel(
            sample_size=latent,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=latent,
            dual_attention_layers=(0,),  # SD3.5's MMDiT-X self-attention in the first block
            qk_norm="rms_norm",
        )
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
            vae=tiny_flow_vae(resolution, scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=tiny_text_encoder(projection=True),
            tokenizer=clip_tokenizer,
            text_encoder_2=tiny_text_encoder(projection=True),
            tokenizer_2=clip_tokenizer,
            text_encoder_3=tiny_t5_encoder(d_model=64),
            tokenizer_3=build_t5_tokenizer(),
        )


def tiny_flux(resolution: int = 32, guidance_embeds: bool = True) -> FluxPipeline:
    """FLUX.1 (double- and single-stream blocks, CLIP-L pooled, T5; `guidance_embeds` as FLUX.1-dev, off as
    schnell) with tiny seeded weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        # FLUX packs 2×2 latent patches into tokens (16 × 4 = 64 channels); rotary axes sum to the head dim
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        )
        scheduler = FLUX_SCHEDULER if guidance_embeds else dict(shift=1.0)
        return FluxPipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
            vae=tiny_flow_vae(resolution, scaling_factor=0.3611, shift_factor=0.1159),
            text_encoder=tiny_text_encoder(),
            tokenizer=build_clip_tokenizer(),
            text_encoder_2=tiny_t5_encoder(),
            tokenizer_2=build_t5_tokenizer(),
        )


def published_scheduler(name: str) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler of a full-size architecture (models/architectures/<name>/scheduler): Qwen-Image's image-size
    shift with an exponential time shift and σ stretched to end at 0.02, FLUX.2's (whose pipeline computes μ from
    image size and step count)."""
    from framework.models.full_size import ARCHITECTURES

    config = FlowMatchEulerDiscreteScheduler.load_config(ARCHITECTURES / name / "scheduler")
    return FlowMatchEulerDiscreteScheduler.from_config(config)
