"""What every per-item method shares: the item's world (its conditioning, seeded noise, rendering and scoring) and the
method contract."""

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from framework.config import SamplingConfig
from framework.items import Item, ItemResult
from framework.errors import Interrupted
from framework.metrics import ImageMetrics
from framework.models import Backbone
from framework.rewards import Reward
from framework.sampling import Trajectory, ddim_sample, num_noises


def draw_noise(backbone: Backbone, sampling: SamplingConfig, seeds: list[int]) -> tuple[Tensor, Tensor | None]:
    """x_T [B, ...] and one ξ per stochastic step [S', B, ...] (None at η = 0), drawn on the CPU from each seed so
    that they are the same on every device and in any batch layout. S + 1 draws are made whatever S' is, so
    switching the final step's noise off leaves x_T and the other ξ unchanged."""
    steps = sampling.num_steps if sampling.eta > 0 else 0
    shape = backbone.latent_shape()
    draws = [torch.randn((1 + steps, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    noise = torch.stack(draws, dim=1).to(backbone.device)  # [1 + S, B, ...]
    used = num_noises(sampling.num_steps, sampling.eta, sampling.final_step_noise)
    return noise[0], (noise[1 : 1 + used] if used else None)


class Problem:
    """One item's world: frozen backbone and reward, the prompt's conditioning (encoded once), seeded noise."""

    def __init__(
        self,
        backbone: Backbone,
        reward: Reward,
        item: Item,
        sampling: SamplingConfig,
        metrics: ImageMetrics | None = None,
        show_progress: bool = False,
        interrupted: Callable[[], bool] = lambda: False,
    ):
        self.backbone, self.reward, self.item, self.sampling = backbone, reward, item, sampling
        self.cond = backbone.encode([item.prompt])
        self.metrics = metrics or ImageMetrics()
        self.show_progress, self.interrupted = show_progress, interrupted

    def noise(self, seeds: list[int]) -> tuple[Tensor, Tensor | None]:
        return draw_noise(self.backbone, self.sampling, seeds)

    def render(self, x_T: Tensor, noises: Tensor | None, **sampler_options) -> tuple[Tensor, Trajectory]:
        """Decoded images (unclamped, see Backbone.decode) from the given noises (batch size = len(x_T)), and the
        sampler's trajectory."""
        cfg = self.sampling
        traj = ddim_sample(
            self.backbone,
            self.cond.repeat(len(x_T)),
            x_T,
            noises,
            num_steps=cfg.num_steps,
            eta=cfg.eta,
            guidance_scale=cfg.guidance_scale,
            final_step_noise=cfg.final_step_noise,
            **sampler_options,
        )
        return self.backbone.decode(traj.latents), traj

    def score(self, images: Tensor) -> Tensor:
        return self.reward(images, [self.item.prompt] * len(images))

    def measure(self, images: Tensor, base: Tensor | None = None) -> dict[str, float]:
        """Drift from `base` and, on the testbed, ground-truth adherence (no gradients), of the images as saved."""
        shown = self.backbone.postprocess
        return self.metrics(shown(images.detach()), self.item.prompt, None if base is None else shown(base.detach()))

    def progress(self, iterable, total: int, desc: str):
        """`iterable` with a progress bar; stops the item (unwritten, so a rerun redoes it) if SIGTERM arrives."""
        for value in tqdm(
            iterable, total=total, desc=desc, leave=False, disable=not self.show_progress, dynamic_ncols=True
        ):
            if self.interrupted():
                raise Interrupted(
                    f"SIGTERM during item {self.item.id}: stopped after the finished items; rerun "
                    "the same command to resume"
                )
            yield value


class Method:
    """A per-item inference-time method. `needs_gradients`: it backpropagates through the backbone (whether through
    the reward too, its config schema says: `follows_reward_gradients`)."""

    needs_gradients = False

    def __init__(self, cfg):
        self.cfg = cfg

    def trainer_options(self, run_cfg) -> dict:
        """Options of the run's Lightning Trainer: a per-item method only predicts."""
        return {"logger": False, "enable_checkpointing": False}

    def prepare(self, run_cfg, trainer, backbone: Backbone, reward: Reward) -> "Method":
        """Work before the items (load an adapter; a fine-tuning method trains here); returns the method that runs
        the items."""
        return self

    def run(self, problem: Problem) -> ItemResult:
        raise NotImplementedError
