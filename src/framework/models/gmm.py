"""An analytic backbone: a class-conditional Gaussian mixture whose noise prediction is exact at every noise level.

Class c (the prompt) has components k with weights w_ck, means μ_ck and isotropic standard deviations s_ck. Under
the forward process x_t = √ᾱ x_0 + √(1−ᾱ) ε, every component stays Gaussian, so

    p_t(x | c) = Σ_k w_ck N(x; √ᾱ μ_ck, (ᾱ s_ck² + 1 − ᾱ) I),     ε*(x, t, c) = −√(1−ᾱ) ∇_x log p_t(x | c),

with ∇ log p_t the responsibility-weighted sum of the components' scores. The unconditional model (CFG's negative)
is the mixture over all classes with their priors. Samplers, methods and metrics run on it unchanged, and the exact
log-likelihood of any output under the data distribution (`log_prob`) is a ground-truth drift measure.
"""

import math

import torch
from torch import Tensor

from framework.models.backbone import Backbone, Cond
from framework.models.tiny import sd_scheduler


class GaussianMixtureBackbone(Backbone):
    def __init__(
        self, classes: list[str], means: Tensor, stds: Tensor, weights: Tensor, class_prior: Tensor | None = None
    ):
        """means [C, K, d], stds [C, K], weights [C, K] (rows sum to 1), class_prior [C] (uniform by default)."""
        super().__init__()
        self.classes = list(classes)
        self.register_buffer("means", means.float())
        self.register_buffer("stds", stds.float())
        self.register_buffer("weights", weights.float())
        prior = torch.full((len(classes),), 1 / len(classes)) if class_prior is None else class_prior.float()
        self.register_buffer("class_prior", prior)
        self.scheduler = sd_scheduler()

    @classmethod
    def random(cls, classes: list[str], dim: int = 2, components: int = 2, spread: float = 3.0, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        shape = (len(classes), components)
        means = spread * torch.randn((*shape, dim), generator=generator)
        stds = 0.3 + 0.4 * torch.rand(shape, generator=generator)
        weights = torch.softmax(torch.randn(shape, generator=generator), dim=1)
        return cls(classes, means, stds, weights)

    @property
    def device(self) -> torch.device:
        return self.means.device

    def latent_shape(self) -> tuple[int, ...]:
        return (self.means.shape[-1],)

    def encode(self, prompts: list[str]) -> Cond:
        """One-hot class of each prompt; the negative is the zero vector, read as 'all classes with their prior'."""
        unknown = [p for p in prompts if p not in self.classes]
        if unknown:
            raise ValueError(f"unknown class {unknown[0]!r}; this mixture's classes are {self.classes}")
        onehot = torch.zeros(len(prompts), len(self.classes), device=self.device)
        onehot[torch.arange(len(prompts)), [self.classes.index(p) for p in prompts]] = 1
        return Cond(onehot, torch.zeros_like(onehot))

    def _component_weights(self, selector: Tensor) -> Tensor:
        """[B, C·K] mixture weights: the selected class's, or the prior-weighted mixture of all for a zero row."""
        class_weights = torch.where(selector.sum(1, keepdim=True) > 0, selector, self.class_prior.expand_as(selector))
        return (class_weights[:, :, None] * self.weights[None]).flatten(1)

    def log_prob_t(self, x: Tensor, alpha: float, selector: Tensor) -> Tensor:
        """log p_t(x | class) for x [B, d] (alpha = ᾱ_t; alpha = 1 gives the data distribution)."""
        mean = alpha**0.5 * self.means.flatten(0, 1)  # [C·K, d]
        var = alpha * self.stds.flatten().square() + (1 - alpha)  # [C·K]
        d = x.shape[-1]
        sq = (x[:, None, :] - mean[None]).square().sum(-1)  # [B, C·K]
        log_normal = -0.5 * (sq / var + d * torch.log(2 * math.pi * var))
        return torch.logsumexp(self._component_weights(selector).log() + log_normal, dim=1)

    def log_prob(self, x0: Tensor, prompts: list[str]) -> Tensor:
        """Exact log-density of outputs under the data distribution of their class."""
        return self.log_prob_t(x0.float(), 1.0, self.encode(prompts).embeds)

    def _eps(self, x: Tensor, alpha: float, selector: Tensor) -> Tensor:
        mean = alpha**0.5 * self.means.flatten(0, 1)
        var = alpha * self.stds.flatten().square() + (1 - alpha)
        d = x.shape[-1]
        diff = x[:, None, :] - mean[None]  # [B, C·K, d]
        log_joint = self._component_weights(selector).log() - 0.5 * (diff.square().sum(-1) / var + d * var.log())
        responsibilities = torch.softmax(log_joint, dim=1)  # [B, C·K]
        score = -(responsibilities[:, :, None] * diff / var[None, :, None]).sum(1)
        return -((1 - alpha) ** 0.5) * score

    def predict_branches(self, x: Tensor, t: int, cond: Cond, guidance_scale: float) -> tuple[Tensor, Tensor]:
        self.num_evals += len(x)
        alpha = float(self.scheduler.alphas_cumprod[t])
        conditional = self._eps(x.float(), alpha, cond.embeds)
        if guidance_scale == 1.0:
            return conditional, conditional
        unconditional = self._eps(x.float(), alpha, cond.uncond_embeds)
        return unconditional + guidance_scale * (conditional - unconditional), conditional

    def decode(self, latents: Tensor) -> Tensor:
        return latents  # the samples are the data

    def postprocess(self, images: Tensor) -> Tensor:
        return images  # vectors, not pixels: nothing to clamp
