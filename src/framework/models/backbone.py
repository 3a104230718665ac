"""The Backbone contract and its Stable Diffusion (SD1.x and SDXL) implementation.

A Backbone is everything the sampler and the methods need from a text-to-image diffusion model, and nothing more:
`encode` prompts once, evaluate the CFG-guided prediction `predict` (ε̂ of an ε-prediction model, the velocity v̂ of
a flow-matching one: `flow_matching`), `decode` latents to images on the [0, 1] scale, and the schedule. Diffusers
does the model work: we keep its pipeline object to reuse its own prompt encoding (so SD1.x, SDXL and their CFG
conventions match diffusers exactly) and register the networks as submodules so Lightning moves them between devices.
"""

import logging
from dataclasses import dataclass, fields, replace

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from torch import Tensor, nn
from torch.nn import functional as F

log = logging.getLogger(__name__)


@dataclass
class Cond:
    """Text conditioning of a batch. Row i of every tensor belongs to prompt i; `uncond_*` is CFG's negative."""

    embeds: Tensor
    uncond_embeds: Tensor | None = None  # None: a guidance-distilled model without a negative branch (FLUX)
    pooled: Tensor | None = None  # SDXL: pooled text embeds of text_encoder_2
    uncond_pooled: Tensor | None = None
    time_ids: Tensor | None = None  # SDXL: (original size, crop top-left, target size)
    mask: Tensor | None = None  # Qwen-Image: which tokens of `embeds` are the prompt's (its length varies), [n, L]
    uncond_mask: Tensor | None = None

    def select(self, rows: list[int]) -> "Cond":
        """The given rows (repeats allowed), e.g. one row per image of a batch whose images share prompts."""
        if rows == list(range(len(self.embeds))):
            return self
        index = torch.tensor(rows, device=self.embeds.device)
        return replace(self, **{f.name: t[index] for f in fields(self) if (t := getattr(self, f.name)) is not None})

    def to(self, device) -> "Cond":
        return replace(self, **{f.name: t.to(device) for f in fields(self) if (t := getattr(self, f.name)) is not None})

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """The rows of several conditionings, in order. Token sequences of different lengths (Qwen-Image encodes a
        prompt to its own length) are padded at the end with zeros, which their masks mark as not the prompt's."""
        first = conds[0]

        def joined(name: str) -> Tensor:
            tensors = [getattr(c, name) for c in conds]
            if tensors[0].dim() >= 2 and len({t.shape[1] for t in tensors}) > 1:
                length = max(t.shape[1] for t in tensors)
                tensors = [F.pad(t, [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]) for t in tensors]
            return torch.cat(tensors)

        return replace(first, **{f.name: joined(f.name) for f in fields(first) if getattr(first, f.name) is not None})


class Backbone(nn.Module):
    """Interface of a conditional ε-prediction model with a DDIM-compatible schedule, or (`flow_matching`) of a
    velocity-prediction model with a flow-matching Euler schedule (framework.models.flow).

    `num_evals` counts model evaluations per image (one per guided ε̂ of one image, CFG's two branches
    counted once, checkpoint recomputation counted again): the unit in which methods are compared at equal compute.
    """

    scheduler: DDIMScheduler
    flow_matching = False

    def __init__(self):
        super().__init__()
        self.num_evals = 0

    def encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def predict_branches(self, x: Tensor, t: float, cond: Cond, guidance_scale: float) -> tuple[Tensor, Tensor]:
        """(CFG-guided p̂ = p_u + w(p_c − p_u), conditional p_c), both from the same model evaluation; p is ε or v."""
        raise NotImplementedError

    def predict(self, x: Tensor, t: float, cond: Cond, guidance_scale: float) -> Tensor:
        return self.predict_branches(x, t, cond, guidance_scale)[0]

    def decode(self, latents: Tensor) -> Tensor:
        """Images on the [0, 1] scale as the decoder produced them, not clamped: rewards that read raw pixels see
        out-of-range values (DNO's white/black rewards do), the others clamp them themselves."""
        raise NotImplementedError

    def postprocess(self, images: Tensor) -> Tensor:
        """The decoded images as saved and measured: clamped to [0, 1]."""
        return images.clamp(0, 1)

    def adapters_disabled(self):
        """Context in which `predict` is the base model's (LoRA adapters of the denoiser off)."""
        from framework.models.lora import adapters_disabled

        return adapters_disabled(self.denoiser)

    def latent_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def denoiser(self) -> nn.Module:
        """The network that LoRA adapters attach to (the UNet, or a flow model's transformer)."""
        raise NotImplementedError(f"{type(self).__name__} has no trainable denoiser")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def float16(self) -> bool:
        """Whether any network runs in float16, whose narrow range makes backward need loss scaling."""
        return any(p.dtype == torch.float16 for p in self.parameters())

    def schedule(self, num_steps: int) -> list[tuple[int, float, float]]:
        """(t, ᾱ_t, ᾱ_prev) for each DDIM step, noisiest first, exactly as diffusers' DDIMScheduler steps them."""
        sched = self.scheduler
        sched.set_timesteps(num_steps)
        stride = sched.config.num_train_timesteps // num_steps
        alphas = sched.alphas_cumprod.tolist()
        final = float(sched.final_alpha_cumprod)
        return [(t, alphas[t], alphas[t - stride] if t - stride >= 0 else final) for t in sched.timesteps.tolist()]


class StableDiffusionBackbone(Backbone):
    """SD1.x (`StableDiffusionPipeline`) or SDXL (`StableDiffusionXLPipeline`) components at a fixed image size:
    `size` (height, width) in pixels, or one side of a square."""

    def __init__(self, pipe: DiffusionPipeline, size: int | tuple[int, int]):
        super().__init__()
        self.pipe = pipe
        self.is_sdxl = hasattr(pipe, "text_encoder_2")
        self.height, self.width = (size, size) if isinstance(size, int) else size
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.requires_grad_(False).eval()  # frozen: backprop then computes input grads only
        # The differentiable sampler is DDIM on the model's own training schedule. SD models were trained without
        # x̂0 clipping/thresholding, which would also cut gradients, so both stay off.
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)
        self.prediction_type = self.scheduler.config.prediction_type
        self._checked: set[str] = set()  # prompts whose length was checked

    def latent_shape(self) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        return (self.unet.config.in_channels, self.height // scale, self.width // scale)

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        """CLIP reads 77 tokens; a longer prompt is cut (as the diffusers pipelines do): say so once per prompt."""
        limit = self.pipe.tokenizer.model_max_length
        for prompt in set(prompts) - self._checked:  # each prompt tokenised once, not at every DRaFT step
            self._checked.add(prompt)
            length = len(self.pipe.tokenizer(prompt, truncation=False).input_ids)
            if length > limit:
                log.warning(
                    "prompt %r has %d tokens; CLIP reads the first %d, the rest is ignored",
                    prompt[:60] + ("…" if len(prompt) > 60 else ""),
                    length,
                    limit,
                )

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        self._warn_if_truncated(prompts)
        if not self.is_sdxl:
            embeds, uncond = self.pipe.encode_prompt(prompts, self.device, 1, True)
            return Cond(embeds, uncond)
        embeds, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(prompts, device=self.device)
        size = (self.height, self.width)
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, embeds.dtype, int(pooled.shape[-1]))
        return Cond(embeds, uncond, pooled, uncond_pooled, time_ids.to(self.device).repeat(len(prompts), 1))

    def predict_branches(self, x: Tensor, t: int, cond: Cond, guidance_scale: float) -> tuple[Tensor, Tensor]:
        """In float32 whatever the UNet's dtype. w ≤ 1 evaluates the conditional branch alone, as the pipelines do
        (they switch classifier-free guidance off there: SD-Turbo's guidance_scale=0 samples conditionally)."""
        self.num_evals += len(x)
        guided = guidance_scale > 1.0
        pick = (lambda u, c: torch.cat([u, c])) if guided else (lambda u, c: c)
        model_in = pick(x, x).to(self.unet.dtype)
        added = None
        if self.is_sdxl:
            added = {
                "text_embeds": pick(cond.uncond_pooled, cond.pooled),
                "time_ids": pick(cond.time_ids, cond.time_ids),
            }
        out = self.unet(
            model_in,
            t,
            encoder_hidden_states=pick(cond.uncond_embeds, cond.embeds),
            added_cond_kwargs=added,
            return_dict=False,
        )[0].float()
        if self.prediction_type == "v_prediction":
            alpha = float(self.scheduler.alphas_cumprod[t])
            out = alpha**0.5 * out + (1 - alpha) ** 0.5 * pick(x, x).float()
        elif self.prediction_type != "epsilon":
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        if not guided:
            return out, out
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond), text

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images on the [0, 1] scale (unclamped), differentiable, scaled as the SD pipelines do."""
        z = latents / self.vae.config.scaling_factor
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        return images / 2 + 0.5
