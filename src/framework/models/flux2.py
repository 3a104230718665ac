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

import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from torch import Tensor

from framework.models.backbone import Cond
from framework.models.flow import FlowMatchingBackbone

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
