"""FLUX.2 through diffusers' `Flux2Pipeline` (FLUX.2-dev: Mistral-3 text encoder, guidance-distilled) and
`Flux2KleinPipeline` (FLUX.2 klein: Qwen3 text encoder; the base models take true CFG, the step-distilled ones no
guidance).

What differs from FLUX.1, each as the pipelines do it:
- the prompt goes through the encoder's chat template, padded to `max_sequence_length`, and the conditioning is three
  intermediate hidden layers concatenated along the features (no pooled vector);
- latents are the VAE's 32 channels patchified 2×2 (128 channels at 1/16 of the image side) and normalised by the
  VAE's batch-norm statistics, so that is the space noises and latents live in here ([128, h, w]);
- position ids have four axes (time, height, width, layer), timesteps are σ, and the schedule's shift μ is an
  empirical function of image size *and* step count;
- klein base: v̂ = v_u + w(v_c − v_u) with the empty negative prompt at w > 1, the conditional branch alone at w ≤ 1.
"""

import logging
from pathlib import Path

import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from torch import Tensor

from framework.core.tokenizer import build_mistral_tokenizer, build_qwen_tokenizer
from framework.models.backbone import Cond
from framework.models.flow import FlowMatchingBackbone
from framework.models.full_size import llm_conditioned
from framework.models.tiny import TINY_SEED, published_scheduler

log = logging.getLogger(__name__)


class Flux2Backbone(FlowMatchingBackbone):
    def __init__(self, pipe, size: int | tuple[int, int], max_sequence_length: int | None = None):
        super().__init__(pipe, size, max_sequence_length)
        self.klein = isinstance(pipe, Flux2KleinPipeline)
        self.true_cfg = self.klein and not pipe.config.get("is_distilled", False)

    def default_max_sequence_length(self) -> int:
        return 512

    def patch_size(self) -> int:
        return 2

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels, self.latent_height // 2, self.latent_width // 2)

    def pipeline_sigmas(self) -> bool:
        return not self.scheduler.config.get("use_flow_sigmas")

    def shift_mu(self, num_steps: int) -> float:
        return compute_empirical_mu(image_seq_len=self._image_tokens(), num_steps=num_steps)

    def _encode(self, prompts: list[str], device: torch.device) -> Cond:
        def encoded(texts: list[str]) -> Tensor:
            return self.pipe.encode_prompt(texts, device=device, max_sequence_length=self.max_sequence_length)[0]

        return Cond(encoded(prompts), encoded([""] * len(prompts)) if self.true_cfg else None)

    def predict_branches(self, x: Tensor, t: float, cond: Cond, guidance_scale: float) -> tuple[Tensor, Tensor]:
        """(guided v̂, conditional v_c) in float32: the transformer on the latent tokens with their position ids."""
        self.num_evals += len(x)
        batch, channels, height, width = x.shape
        dtype = self.transformer.dtype
        guided = self.true_cfg and guidance_scale > 1.0  # klein base: the pipeline's do_classifier_free_guidance
        if not self.guidance_embeds and not self.true_cfg and guidance_scale > 1.0 and not self._ignored_guidance_said:
            self._ignored_guidance_said = True
            log.warning("this FLUX.2 model is step-distilled (no guidance input, no CFG): guidance_scale is ignored")
        pick = (lambda u, c: torch.cat([u, c])) if guided else (lambda u, c: c)
        latents, embeds = pick(x, x), pick(cond.uncond_embeds, cond.embeds)
        tokens = latents.to(dtype).flatten(2).transpose(1, 2)  # [B, h·w, C], the pipeline's _pack_latents
        image_ids, text_ids = self._ids(tokens, latents, embeds)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((len(tokens),), guidance_scale, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=tokens,
            timestep=torch.full((len(tokens),), t, device=x.device, dtype=dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        out = out.transpose(1, 2).reshape(len(tokens), channels, height, width).float()
        if not guided:
            return out, out
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond), text

    def _ids(self, tokens: Tensor, latents: Tensor, embeds: Tensor) -> tuple[Tensor, Tensor]:
        """Image and text position ids, as the pipeline builds them; the same at every step, so built once."""
        key = (tokens.device, *latents.shape, embeds.shape[1])
        if key not in self._position_ids:
            self._position_ids[key] = (
                self.pipe._prepare_latent_ids(latents).to(tokens.device),
                self.pipe._prepare_text_ids(embeds).to(tokens.device),
            )
        return self._position_ids[key]

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images on the [0, 1] scale (unclamped), differentiable: batch-norm statistics undone, 2×2 patches
        unfolded, decoded, as the pipeline does."""
        bn = self.vae.bn
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        z = self.pipe._unpatchify_latents(latents * std.to(latents) + bn.running_mean.view(1, -1, 1, 1).to(latents))
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        return images / 2 + 0.5


def build_tiny(resolution: int = 32, klein: bool = False):
    """FLUX.2-dev (guidance-distilled; a Mistral-3 encoder read at hidden layers 10, 20, 30) or, with `klein`, FLUX.2
    klein base (true CFG; a Qwen3 encoder read at layers 9, 18, 27): the double- and single-stream transformer on
    2×2-patchified latents, the 32-channel VAE with its batch-norm statistics (seeded, not the identity, so decoding
    exercises them); tiny and seeded. Encoders are two layers deeper than the last layer their pipelines read (so
    reading the wrong layers, the last one included, changes the conditioning), and narrow."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        width, layers = 16, (29 if klein else 32)
        tokenizer = build_qwen_tokenizer() if klein else build_mistral_tokenizer(words=SYSTEM_MESSAGE)
        text = dict(hidden_size=width, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2)
        text |= dict(num_key_value_heads=1, head_dim=8, vocab_size=len(tokenizer))
        if klein:
            encoder = Qwen3ForCausalLM(Qwen3Config(**text))
        else:
            vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1)
            vision |= dict(num_attention_heads=2, head_dim=8, image_size=28, patch_size=14)
            encoder = Mistral3ForConditionalGeneration(
                Mistral3Config(text_config=text | {"model_type": "mistral"}, vision_config=vision)
            )
        vae = AutoencoderKLFlux2(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=8,
            layers_per_block=1,
            sample_size=resolution,
        )
        vae.bn.running_mean.normal_(std=0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
        transformer = Flux2Transformer2DModel(
            in_channels=32,  # 8 latent channels × a 2×2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * width,  # three hidden layers, concatenated
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=not klein,
        )
        components = dict(
            scheduler=published_scheduler("flux2"),
            vae=vae,
            text_encoder=encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
        return Flux2KleinPipeline(**components, is_distilled=False) if klein else Flux2Pipeline(**components)


def build_tiny_klein(resolution: int = 32):
    return build_tiny(resolution, klein=True)


def build_full_size(root: Path):
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return llm_conditioned(root, Flux2Pipeline, lambda pipe: build_mistral_tokenizer(SYSTEM_MESSAGE))
