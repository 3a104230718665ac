"""What every per-item method shares: a batch of items' world (conditioning, seeded noise, rendering and scoring)
and the method contract."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from framework.config.methods import SamplingConfig
from framework.core.errors import Interrupted, NonFiniteLoss
from framework.core.items import Item, ItemResult
from framework.metrics import ImageMetrics
from framework.models import Backbone
from framework.models.sampling import Trajectory, num_noises, path_kl, sample, sampler_steps
from framework.rewards import Reward


def sampler_options(sampling: SamplingConfig) -> dict:
    """The sampler's arguments of a method config: every caller of `sample` draws images the same way."""
    return {key: getattr(sampling, key) for key in ("num_steps", "eta", "guidance_scale", "final_step_noise")}


def sampler_path_kl(backbone: Backbone, sampling: SamplingConfig, traj: Trajectory, cond) -> list[float] | None:
    """Per image, the KL of the adapted sampler of `sampling` that drew `traj` from the adapter-free one
    (`sampling.path_kl`); None at η = 0, where both samplers are deterministic and the KL is not defined."""
    if sampling.eta <= 0:
        return None
    options = sampler_options(sampling)
    steps = sampler_steps(backbone, options["num_steps"], options["eta"], options["final_step_noise"])
    return path_kl(backbone, traj, cond, options["guidance_scale"], steps).tolist()


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


@dataclass
class Start:
    """A noise optimisation's first pass, at z = z0 (detached): the base images, and the reference trajectory that
    regularisers (R_MIRA) and drift metrics compare later passes with. `traj` is None when nothing was optimised."""

    images: Tensor
    traj: Trajectory | None

    @classmethod
    def of(cls, images: Tensor, traj: Trajectory) -> "Start":
        return cls(images.detach(), traj.reference())


class Problem:
    """A batch of items' world: frozen backbone and reward, the prompts' conditioning (encoded once), seeded noise.

    Image j of a batch belongs to item `rows[j]`; left out, rows are j mod len(items) (one image per item, or any
    number of images of a single item). Everything per image depends on that image's item and noise alone, so an
    item's result is the same in any batch. `held_out`: the eval reward of a noise method's stopping rule (None: no
    rule); `start`: the first pass of a noise optimisation, once it ran."""

    def __init__(
        self,
        backbone: Backbone,
        reward: Reward,
        items: Item | list[Item],
        sampling: SamplingConfig,
        metrics: ImageMetrics | None = None,
        show_progress: bool = False,
        interrupted: Callable[[], bool] = lambda: False,
        held_out: str | None = None,
    ):
        self.items = [items] if isinstance(items, Item) else list(items)
        self.held_out, self.start = held_out, None
        self.backbone, self.reward, self.sampling = backbone, reward, sampling
        self.cond = backbone.encode([item.prompt for item in self.items])
        self.metrics = metrics or ImageMetrics()
        self.show_progress, self.interrupted = show_progress, interrupted

    def noise(self, seeds: list[int] | None = None) -> tuple[Tensor, Tensor | None]:
        """x_T [B, ...] and ξ [S', B, ...] of the given seeds (default: each item's own seed)."""
        return draw_noise(self.backbone, self.sampling, seeds or [item.seed for item in self.items])

    def _rows(self, n: int, rows: list[int] | None) -> list[int]:
        return rows if rows is not None else [j % len(self.items) for j in range(n)]

    def render(
        self, x_T: Tensor, noises: Tensor | None, rows: list[int] | None = None, **options
    ) -> tuple[Tensor, Trajectory]:
        """Decoded images (unclamped, see Backbone.decode) from the given noises (batch size = len(x_T)), and the
        sampler's trajectory."""
        cond = self.cond.select(self._rows(len(x_T), rows))
        traj = sample(self.backbone, cond, x_T, noises, **sampler_options(self.sampling), **options)
        return self.backbone.decode(traj.latents), traj

    @torch.no_grad()
    def sample_and_score(self, x_T: Tensor, noises: Tensor | None, rows: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Images, final latents and rewards of many samples without gradients, `method.batch_size` per call."""
        images, latents, rewards, size = [], [], [], self.sampling.batch_size
        for start in range(0, len(x_T), size):
            chunk = slice(start, start + size)
            chunk_images, traj = self.render(x_T[chunk], None if noises is None else noises[:, chunk], rows[chunk])
            images.append(chunk_images)
            latents.append(traj.latents)
            rewards.append(self.score(chunk_images, rows[chunk]))
        return torch.cat(images), torch.cat(latents), torch.cat(rewards)

    def score(self, images: Tensor, rows: list[int] | None = None) -> Tensor:
        """The reward of each image for its item's prompt: [len(images)]."""
        return self.reward(images, [self.items[i].prompt for i in self._rows(len(images), rows)])

    def measure(self, images: Tensor, base: Tensor | None = None, rows: list[int] | None = None) -> list[dict]:
        """Per image: drift from its `base` and, on the testbed, ground-truth adherence (no gradients), of the
        images as saved."""
        shown = self.backbone.postprocess
        prompts = [self.items[i].prompt for i in self._rows(len(images), rows)]
        return self.metrics(shown(images.detach()), prompts, None if base is None else shown(base.detach()))

    def progress(self, iterable, total: int, desc: str):
        """`iterable` with a progress bar, drawn on a terminal only (in a log its carriage returns would share a line
        with the next message); a stop signal stops the batch (unwritten, so a rerun redoes it)."""
        disable = None if self.show_progress else True  # None: tqdm draws only when stderr is a terminal
        for value in tqdm(iterable, total=total, desc=desc, leave=False, disable=disable, dynamic_ncols=True):
            if self.interrupted():
                raise Interrupted(
                    f" during items {self.describe()}: stopped after the finished items; rerun "
                    "the same command to resume"
                )
            yield value

    def describe(self) -> str:
        first = self.items[0].id
        return first if len(self.items) == 1 else f"{first} +{len(self.items) - 1}"


def paired_results(
    problem: Problem, base: Tensor, final: Tensor, info: dict | None = None, traj: Trajectory | None = None
) -> list[ItemResult]:
    """Each item's result from its base and final image, both scored in one reward call; given the trajectory that
    drew the final images with adapters, each item's `kl` from the adapter-free sampler (η > 0)."""
    rewards = problem.score(torch.cat([base, final])).view(2, -1).T.tolist()
    kls = traj is not None and sampler_path_kl(problem.backbone, problem.sampling, traj, problem.cond)
    kls = kls or [None] * len(base)
    return [
        ItemResult(b, f, rb, rf, info=dict(info or {}) | ({"kl": kl} if kl is not None else {}))
        for b, f, (rb, rf), kl in zip(base, final, rewards, kls)
    ]


class Method:
    """A per-item inference-time method, run on batches of items (`method.batch_size`). `needs_gradients`: it
    backpropagates through the backbone (whether through the reward too, its config schema says:
    `follows_reward_gradients`)."""

    needs_gradients = False

    def __init__(self, cfg):
        self.cfg = cfg

    def trainer_options(self, run_cfg) -> dict:
        """Options of the run's Lightning Trainer: a per-item method only predicts."""
        return {"logger": False, "enable_checkpointing": False}

    def prepare(self, run_cfg, trainer, backbone: Backbone, reward: Reward, metrics: ImageMetrics) -> "Method":
        """Work before the items (load an adapter; a fine-tuning method trains here, watching its probe set with
        `metrics`); returns the method that runs the items."""
        return self

    def run(self, problem: Problem) -> list[ItemResult | NonFiniteLoss]:
        """One result per item of the batch, in order; an item whose loss stopped being finite gets its error and
        fails alone."""
        raise NotImplementedError
