"""Flow-matching backbones: Stable Diffusion 3 / 3.5 (MMDiT) and FLUX.1 (dev, schnell), through diffusers' pipelines.

These models predict the velocity v = ε − x0 of the straight path x_σ = (1 − σ)·x0 + σ·ε, and are sampled by Euler
steps on σ from 1 to 0 with the model's own timestep shift (framework.models.sampling holds the update and its SDE
form).
We keep the pipeline object to reuse its prompt encoding, latent packing and schedule, so conditioning and steps are
diffusers' own.

Guidance differs between the two families, and `predict_branches` follows each pipeline:
- SD3: classifier-free guidance, v̂ = v_u + w·(v_c − v_u), the negative being the empty prompt (as for SD); at
  w ≤ 1 the conditional branch alone, as the pipeline switches guidance off there.
- FLUX.1-dev is guidance-distilled: w enters the transformer as its guidance embedding and there is one branch (the
  guided prediction is the conditional one); FLUX.1-schnell has no guidance input at all, so w is ignored.

Qwen-Image (framework.models.qwen_image) and FLUX.2 (framework.models.flux2) subclass FlowMatchingBackbone, replacing
what their pipelines do differently: prompt encoding, latent layout, schedule shift, guidance, decoding.
"""

import logging

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor, nn

from framework.core.errors import FrameworkError
from framework.models.backbone import Backbone, Cond

log = logging.getLogger(__name__)


def image_size_shift(image_tokens: int, config, max_shift: float = 1.15) -> float:
    """The pipelines' μ, linear in the image's token count between the scheduler config's two anchors."""
    return calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", max_shift),
    )


class FlowMatchingBackbone(Backbone):
    """`StableDiffusion3Pipeline` or `FluxPipeline` components at a fixed image size (`size`: (height, width) in
    pixels, or one side of a square); latents are kept unpacked ([16, h, w]) so noises, metrics and methods see the
    same shapes as for the SD backbones."""

    flow_matching = True

    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, pipe, size: int | tuple[int, int], max_sequence_length: int | None = None):
        super().__init__()
        self.pipe = pipe
        self.is_flux = isinstance(pipe, FluxPipeline)
        self.height, self.width = (size, size) if isinstance(size, int) else size
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.text_encoders = nn.ModuleList(
            m for name in self.TEXT_ENCODERS if (m := getattr(pipe, name, None)) is not None
        )
        for module in (self.transformer, self.vae, *self.text_encoders):
            module.requires_grad_(False).eval()  # frozen: backprop then computes input grads only
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length()
        self.guidance_embeds = bool(self.transformer.config.get("guidance_embeds", False))
        self._ignored_guidance_said = False
        self.patch = patch = self.patch_size()
        multiple, vae = pipe.vae_scale_factor * patch, pipe.vae_scale_factor
        keys = ("resolution", "resolution") if self.height == self.width else ("height", "width")
        for key, side in zip(keys, (self.height, self.width)):
            if side % multiple:
                raise FrameworkError(
                    f"model.{key}={side} is not valid; it must be a multiple of {multiple} for this model "
                    f"(VAE {vae}× and {patch}×{patch} patches)"
                )
        self.latent_height, self.latent_width = self.height // vae, self.width // vae
        self._position_ids: dict = {}  # position ids per (device, shapes): the same at every step
        self._encoded: tuple[Cond, dict[str, int]] | None = None  # after `offload_text_encoders`: the run's prompts

    def default_max_sequence_length(self) -> int:
        return 512 if self.is_flux else 256  # the pipelines' defaults

    def patch_size(self) -> int:
        return 2 if self.is_flux else self.transformer.config.patch_size  # FLUX packs 2×2 latents

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def latent_shape(self) -> tuple[int, int, int]:
        channels = self.transformer.config.in_channels // (4 if self.is_flux else 1)
        return (channels, self.latent_height, self.latent_width)

    def _image_tokens(self) -> int:
        return (self.latent_height // self.patch) * (self.latent_width // self.patch)

    def schedule(self, num_steps: int) -> list[tuple[float, float, float]]:
        """(t, σ_t, σ_next) for each Euler step, noisiest first, exactly as the pipeline sets its scheduler: FLUX from
        sigmas linspace(1, 1/n, n) and the image-size shift μ; SD3 from the scheduler's own spacing (and μ when its
        config shifts by image size). t is the transformer's timestep input, 1000·σ_t."""
        sched, mu = self.scheduler, self.shift_mu(num_steps)
        options = {} if mu is None else {"mu": mu}
        if self.pipeline_sigmas():
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), **options)
        else:
            sched.set_timesteps(num_steps, **options)
        sigmas = sched.sigmas.tolist()
        return [(t, sigmas[i], sigmas[i + 1]) for i, t in enumerate(sched.timesteps.tolist())]

    def pipeline_sigmas(self) -> bool:
        """Whether the pipeline gives the scheduler its own σ, linspace(1, 1/n, n), instead of the default spacing."""
        return self.is_flux and not self.scheduler.config.get("use_flow_sigmas")

    def shift_mu(self, num_steps: int) -> float | None:
        """μ of the image-size timestep shift, as the pipeline computes it; None where the schedule is not shifted by
        image size."""
        config = self.scheduler.config
        if not (self.is_flux or config.get("use_dynamic_shifting")):
            return None
        return image_size_shift(self._image_tokens(), config, max_shift=1.15 if self.is_flux else 1.16)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        if self._encoded is None:
            return self._encode(prompts, self.device)
        encoded, rows = self._encoded
        unknown = [p for p in prompts if p not in rows]
        if unknown:
            raise FrameworkError(
                f"prompt {unknown[0]!r} was not among the run's prompts encoded before model.offload_text_encoder "
                "dropped the text encoders; set model.offload_text_encoder=false to encode it"
            )
        return encoded.select([rows[p] for p in prompts]).to(self.device)

    def _encode(self, prompts: list[str], device: torch.device) -> Cond:
        if self.is_flux:
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompts, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
            )
            return Cond(embeds, pooled=pooled)
        embeds, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompts, None, None, device=device, max_sequence_length=self.max_sequence_length
        )
        return Cond(embeds, uncond, pooled, uncond_pooled)

    @torch.no_grad()
    def offload_text_encoders(self, prompts: list[str], device: torch.device, batch: int = 16) -> None:
        """Encode each distinct prompt once on `device`, keep the encodings (on the CPU) and drop the text encoders
        (T5-XXL alone is 4.7B parameters, Mistral-3 24B): they are needed only to encode, so the run re-encodes
        nothing and the accelerator never holds them beside the transformer."""
        distinct = list(dict.fromkeys(prompts))
        for encoder in self.text_encoders:
            encoder.to(device)
        chunks = [self._encode(distinct[i : i + batch], device).to("cpu") for i in range(0, len(distinct), batch)]
        self.use_encodings(Cond.cat(chunks), distinct)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def use_encodings(self, encoded: Cond, prompts: list[str]) -> None:
        """Encode `prompts` (row i of `encoded` is prompt i) from now on by these encodings, and drop the text
        encoders."""
        self._encoded = encoded, {p: i for i, p in enumerate(prompts)}
        self.text_encoders = nn.ModuleList()
        for name in self.TEXT_ENCODERS:
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)

    def predict_branches(self, x: Tensor, t: float, cond: Cond, guidance_scale: float) -> tuple[Tensor, Tensor]:
        """(guided v̂, conditional v_c), in float32 whatever the transformer's dtype."""
        self.num_evals += len(x)
        if self.is_flux:
            out = self._flux_velocity(x, t, cond, guidance_scale)
            return out, out
        guided = guidance_scale > 1.0  # the pipeline's do_classifier_free_guidance
        pick = (lambda u, c: torch.cat([u, c])) if guided else (lambda u, c: c)
        model_in = pick(x, x).to(self.transformer.dtype)
        out = self.transformer(
            hidden_states=model_in,
            timestep=torch.full((len(model_in),), t, device=x.device),
            encoder_hidden_states=pick(cond.uncond_embeds, cond.embeds),
            pooled_projections=pick(cond.uncond_pooled, cond.pooled),
            return_dict=False,
        )[0].float()
        if not guided:
            return out, out
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond), text

    def _flux_velocity(self, x: Tensor, t: float, cond: Cond, guidance_scale: float) -> Tensor:
        """FLUX's transformer on 2×2-packed latent tokens with position ids, timestep t/1000 as its pipeline passes."""
        batch, channels, height, width = x.shape
        dtype = self.transformer.dtype
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=x.device, dtype=torch.float32)
        elif guidance_scale not in (0.0, 1.0) and not self._ignored_guidance_said:
            self._ignored_guidance_said = True
            log.warning("this FLUX model has no guidance input (as FLUX.1-schnell): guidance_scale is ignored")
        packed = self.pipe._pack_latents(x.to(dtype), batch, channels, height, width)
        key = (x.device, dtype)
        if key not in self._position_ids:
            self._position_ids[key] = self.pipe._prepare_latent_image_ids(batch, height // 2, width // 2, *key)
        image_ids = self._position_ids[key]
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=dtype)
        out = self.transformer(
            hidden_states=packed,
            timestep=torch.full((batch,), t, device=x.device, dtype=dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(out, height * scale, width * scale, scale).float()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images on the [0, 1] scale (unclamped), differentiable, shifted and scaled as the pipelines do."""
        z = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        return images / 2 + 0.5
