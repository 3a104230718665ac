"""Qwen-Image through diffusers' `QwenImagePipeline`: a 20 B MMDiT over 2×2-packed latents of a causal 3-D VAE,
conditioned on the last hidden state of Qwen2.5-VL.

What differs from SD3 and FLUX.1, each as the pipeline does it:
- the prompt is wrapped in the pipeline's chat template and its first tokens (the template's system turn) dropped;
  each prompt keeps its own length, so a batch pads with zeros and a mask (`Cond.mask`) marks the prompt's tokens;
- guidance is *true* CFG with a negative prompt (the model card's " "), rescaled per token to the conditional
  prediction's norm: v̂ = c·‖v_c‖/‖c‖ with c = v_u + w(v_c − v_u), the norm over each packed token's 64 values; at
  w ≤ 1 the conditional branch alone;
- latents are normalised per channel by the VAE's published mean and std and carry a frame axis for the VAE.
"""

from pathlib import Path

import torch
from torch import Tensor

from framework.core.tokenizer import build_qwen_tokenizer
from framework.models.backbone import Cond
from framework.models.flow import FlowMatchingBackbone, image_size_shift
from framework.models.full_size import llm_conditioned
from framework.models.tiny import TINY_SEED, published_scheduler


class QwenImageBackbone(FlowMatchingBackbone):
    NEGATIVE_PROMPT = " "  # the model card's negative prompt when none is wanted

    def default_max_sequence_length(self) -> int:
        return 512  # the pipeline's default (at most 1024)

    def patch_size(self) -> int:
        return 2

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels // 4, self.latent_height, self.latent_width)

    def pipeline_sigmas(self) -> bool:
        return True

    def shift_mu(self, num_steps: int) -> float:
        return image_size_shift(self._image_tokens(), self.scheduler.config)

    def _encode(self, prompts: list[str], device: torch.device) -> Cond:
        def encoded(texts: list[str]) -> tuple[Tensor, Tensor]:
            embeds, mask = self.pipe.encode_prompt(texts, device=device, max_sequence_length=self.max_sequence_length)
            return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=device) if mask is None else mask

        (embeds, mask), (uncond, uncond_mask) = encoded(prompts), encoded([self.NEGATIVE_PROMPT] * len(prompts))
        return Cond(embeds, uncond, mask=mask, uncond_mask=uncond_mask)

    def predict_branches(self, x: Tensor, t: float, cond: Cond, guidance_scale: float) -> tuple[Tensor, Tensor]:
        """(guided v̂, conditional v_c) in float32; each branch is one transformer call, as in the pipeline."""
        self.num_evals += len(x)
        batch, channels, height, width = x.shape
        packed = self.pipe._pack_latents(x.to(self.transformer.dtype), batch, channels, height, width)
        shapes = [[(1, height // 2, width // 2)]] * batch  # the packed token grid, as the pipeline's img_shapes
        text = self._velocity(packed, t, shapes, cond.embeds, cond.mask)
        guided = text
        if guidance_scale > 1.0:  # the pipeline's do_true_cfg
            negative = self._velocity(packed, t, shapes, cond.uncond_embeds, cond.uncond_mask)
            combined = negative + guidance_scale * (text - negative)
            guided = combined * (text.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        scale = self.pipe.vae_scale_factor
        unpack = lambda v: self.pipe._unpack_latents(v, height * scale, width * scale, scale)[:, :, 0]  # noqa: E731
        return unpack(guided), unpack(text)

    def _velocity(self, packed: Tensor, t: float, shapes: list, embeds: Tensor, mask: Tensor | None) -> Tensor:
        """One transformer call on the packed tokens; `shapes` is the pipeline's img_shapes (frames, rows, columns of
        each image's token grid), which places the rotary positions."""
        batch = len(packed)
        return self.transformer(
            hidden_states=packed,
            timestep=torch.full((batch,), t, device=packed.device, dtype=packed.dtype) / 1000,
            encoder_hidden_states=embeds,
            # the pipeline passes no mask when every token is the prompt's
            encoder_hidden_states_mask=None if mask is None or bool(mask.all()) else mask,
            img_shapes=shapes,
            return_dict=False,
        )[0].float()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images on the [0, 1] scale (unclamped), differentiable: un-normalised per channel and decoded as
        one frame, as the pipeline does."""
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device).view(shape)
        z = latents.unsqueeze(2) * std + mean
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0][:, :, 0].float()
        return images / 2 + 0.5


def build_tiny(resolution: int = 32):
    """Qwen-Image: the MMDiT over 2×2-packed latents, a Qwen2.5-VL text encoder (language model and vision tower;
    the pipeline reads its last hidden state), the causal 3-D VAE (2× here; its per-channel latent statistics are the
    published ones), tiny and seeded."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = QwenImageTransformer2DModel(
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKLQwenImage(
            base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False]
        )
        pipe = QwenImagePipeline(
            published_scheduler("qwen_image"), vae, text_encoder=None, tokenizer=None, transformer=transformer
        )
        tokenizer = build_qwen_tokenizer(words=pipe.prompt_template_encode)  # the template is the pipeline's
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
        text |= dict(num_key_value_heads=1, vocab_size=len(tokenizer))
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}  # sections sum to half the head size
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32)
        encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text, vision_config=vision | {"fullatt_block_indexes": [0]})
        )
        pipe.register_modules(text_encoder=encoder, tokenizer=tokenizer)
        return pipe


def build_full_size(root: Path):
    from diffusers import QwenImagePipeline

    return llm_conditioned(root, QwenImagePipeline, lambda pipe: build_qwen_tokenizer(pipe.prompt_template_encode))
