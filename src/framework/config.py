"""Typed schemas of every config group, registered in Hydra's ConfigStore, and the valid values of every field.

Each YAML file in `conf/` is validated against its schema: an unknown key or a wrongly typed value fails at compose
time. Methods have one schema each (`schema/method/<name>`), since their knobs differ. Every numeric or option
field declares what is valid next to its definition (`valid(default, rule)`), and a schema's rules across fields
are its `relations`; `validate` checks them all before anything is loaded, so a bad value is one line naming the
key, the value and what is valid.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from framework.errors import FrameworkError
from framework.testbed import MODEL_DIR

CONF_DIR = Path(__file__).resolve().parent / "conf"  # the Hydra configs, package data (<repo>/conf links here)


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high`, bounds included unless open; None: no bound. NaN is never valid, and ±inf only
    where a bound is ±inf itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if math.isinf(value) and value not in (self.low, self.high):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below and (self.multiple_of is None or value % self.multiple_of == 0)

    def describe(self) -> str:
        show = lambda v: str(int(v)) if float(v).is_integer() else f"{v:g}"  # noqa: E731  (2147483647, not 2.1e+09)
        low = None if self.low is None else f"{'>' if self.low_open else '≥'} {show(self.low)}"
        high = None if self.high is None else f"{'<' if self.high_open else '≤'} {show(self.high)}"
        if low and high:
            bounds = (
                f"in {'(' if self.low_open else '['}{show(self.low)}, {show(self.high)}{')' if self.high_open else ']'}"
            )
        else:
            bounds = low or high or "finite"
        return f"it must be {bounds}" + (f" and a multiple of {self.multiple_of}" if self.multiple_of else "")


@dataclass(frozen=True)
class OneOf:
    """One of fixed names (for a list field: each element); `options` may be a function listing them."""

    options: tuple[str, ...] | Callable[[], tuple[str, ...]]

    def names(self) -> tuple[str, ...]:
        return self.options() if callable(self.options) else self.options

    def accepts(self, value) -> bool:
        values = value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
        return all(v in self.names() for v in values)

    def describe(self) -> str:
        return f"choose from: {', '.join(self.names())}"


@dataclass(frozen=True)
class Text:
    """Free text of the field's type (a hub id, a path, a name): checked where it is used (e.g. weights exist)."""


def valid(default, rule: Range | OneOf | Text):
    """A dataclass field with its default and its rule."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


DTYPES = ("float32", "float16", "bfloat16")
REWARDS = (
    "aesthetic",
    "hps",
    "pickscore",
    "clipscore",
    "jpeg",
    "brightness",
    "darkness",
    "contrast",
    "saturation",
    "judge",
    "callable",
)
MODEL_REWARDS = ("aesthetic", "hps", "pickscore", "clipscore")  # those that are networks with weight files
NON_DIFFERENTIABLE_REWARDS = ("jpeg",)  # and `callable` unless reward.differentiable=true
POSITIVE, NON_NEGATIVE, UNIT, COUNT = Range(0, low_open=True), Range(0), Range(0, 1), Range(1)


def reward_configs() -> tuple[str, ...]:
    """The reward options of conf/reward (held-out rewards are named by them)."""
    return tuple(sorted(p.stem for p in (CONF_DIR / "reward").glob("*.yaml")))


FLOW_KINDS = ("sd3", "flux")  # flow-matching models (velocity prediction, Euler sampler)


@dataclass
class ModelConfig:
    kind: str = valid(MISSING, OneOf(("sd", "sdxl", *FLOW_KINDS)))  # SD1.x | SDXL | SD3.x | FLUX.1
    source: str | None = valid(None, Text())  # hub id or local directory (save_pretrained layout); None if built
    tiny: bool = False  # random-weight tiny architecture built in-process (tests, smoke runs)
    # the published full-size architecture of `kind` (SD1.5 or SDXL base) with seeded random weights, built
    # in-process from configurations shipped with the package: speed and memory as the real model's, images noise
    random_weights: bool = False
    revision: str | None = valid(None, Text())
    variant: str | None = valid(None, Text())  # e.g. fp16 (which weight files to read)
    dtype: str = valid("float32", OneOf(DTYPES))  # UNet and text encoders
    # null: dtype, except float32 under float16 for a VAE that overflows there (SDXL's), as diffusers does
    vae_dtype: str | None = valid(None, OneOf(DTYPES))
    resolution: int = valid(512, Range(8, multiple_of=8))  # image side in pixels (the SD VAEs downsample 8×)
    # T5 tokens of a flow model's prompt; null: its pipeline's default (256 SD3, 512 FLUX; FLUX.1-schnell takes ≤ 256)
    max_sequence_length: int | None = valid(None, Range(1, 512))
    # How the networks run (RUNTIME_OPTIONS); none changes a result beyond float rounding, so a run resumes across
    # them. The defaults are measured (README, Performance).
    vae_checkpointing: bool = True  # keep only the VAE decoder's block inputs for backward, recompute the rest
    unet_checkpointing: bool = False  # the same inside each UNet evaluation (one more UNet forward per step)
    channels_last: bool = False  # UNet and VAE in channels-last memory format
    compile: bool = False  # torch.compile the UNet (the first steps compile: minutes)

    @staticmethod
    def relations(c) -> Iterator[tuple[str, str]]:
        if c.tiny and c.random_weights:
            yield "random_weights", "model.tiny and model.random_weights both build random weights: choose one"
        elif (c.tiny or c.random_weights) and c.source is not None:
            built = "tiny" if c.tiny else "random_weights"
            yield "source", f"model.{built}=true builds the model in-process: unset model.source (source=null)"
        elif not (c.tiny or c.random_weights) and c.source is None:
            yield "source", "give a hub id or a local directory (or set model.tiny=true or model.random_weights=true)"
        if c.max_sequence_length is not None and c.kind not in FLOW_KINDS:
            yield "max_sequence_length", f"only the T5-conditioned flow models ({', '.join(FLOW_KINDS)}) read it"
        if c.random_weights and c.kind == "flux":
            yield "random_weights", "full-size random architectures ship for sd, sdxl and sd3 (SD3.5 medium), not flux"


RUNTIME_OPTIONS = ("vae_checkpointing", "unet_checkpointing", "channels_last", "compile")


@dataclass
class RewardConfig:
    name: str = valid(MISSING, OneOf(REWARDS))
    source: str | None = valid(None, Text())  # CLIP model: hub id or local directory (aesthetic, pickscore, clipscore)
    processor: str | None = valid(None, Text())  # tokenizer source when it differs from `source` (pickscore)
    checkpoint: str | None = valid(None, Text())  # weight file: local path or owner/repo/file (aesthetic MLP, HPS)
    arch: str | None = valid(None, Text())  # open_clip architecture (hps)
    version: str = valid("v2.1", OneOf(("v2.0", "v2.1")))  # hps
    tiny: bool = False  # random tiny version of the same architecture, built in-process
    # the reward's published full-size network (CLIP ViT-L/14, ViT-H/14) with seeded random weights, built
    # in-process: speed and memory as the real reward's, scores meaningless
    random_weights: bool = False
    dtype: str = valid("float32", OneOf(DTYPES))
    jpeg_quality: int = valid(95, Range(1, 100))  # PIL's JPEG quality
    target: str | None = valid(None, Text())  # callable: "package.module:function" taking (images, prompts)
    differentiable: bool = False  # callable: whether gradients flow through `target`
    # Score the images clamped to [0, 1] (true) or as decoded (false); null = the reward's own default: the toy
    # statistics read the raw decoder output as DNO does, every model-based reward, JPEG and callables clamp.
    clamp: bool | None = None
    # Multiplies the score (hps: 0.01 gives the raw cosine of DNO's code); β/γ scale with it. To minimise a
    # statistic use its opposite (darkness for brightness) or a callable.
    scale: float = valid(1.0, POSITIVE)

    @staticmethod
    def relations(c) -> Iterator[tuple[str, str]]:
        if c.name == "callable" and (not c.target or c.target.count(":") != 1):
            yield "target", "reward=callable needs reward.target='package.module:function'"
        if c.random_weights and c.name not in MODEL_REWARDS:
            yield "random_weights", f"only the network rewards ({', '.join(MODEL_REWARDS)}) have weights"
        elif c.random_weights and c.tiny:
            yield "random_weights", "reward.tiny and reward.random_weights both build random weights: choose one"
        elif c.random_weights and (c.source or c.checkpoint or c.processor):
            yield (
                "random_weights",
                (
                    f"it builds the network in-process and reads no weights: unset reward.source, reward.processor and "
                    f"reward.checkpoint (reward={c.name}_arch does)"
                ),
            )


@dataclass
class SamplingConfig:
    """What every method shares: the sampler it draws images with (DDIM, or Euler for flow-matching models)."""

    num_steps: int = valid(50, Range(1, 1000))  # at most the 1000 training timesteps
    # DDIM's η (0 deterministic, 1 DDPM-like); on flow models the noise level of the Euler SDE (Flow-GRPO's a)
    eta: float = valid(1.0, UNIT)
    guidance_scale: float = valid(5.0, NON_NEGATIVE)
    # σ·ξ at the last DDIM step when eta > 0: true as diffusers' DDIMScheduler; false as DNO's sampler (the last
    # step deterministic), which matters for rewards that see high-frequency noise (JPEG)
    final_step_noise: bool = True
    batch_size: int = valid(8, COUNT)  # items optimised or sampled together; also the most images per sampler call
    # whether the method back-propagates the reward into the images (so it needs a differentiable reward)
    follows_reward_gradients: ClassVar[bool] = False


@dataclass
class BaseConfig(SamplingConfig):
    name: str = valid("base", OneOf(("base",)))


@dataclass
class BestOfNConfig(SamplingConfig):
    name: str = valid("best_of_n", OneOf(("best_of_n",)))
    n: int = valid(16, COUNT)
    # Compute-matched N: when set, N = 2K + 1 spends exactly the model evaluations of K checkpointed gradient steps
    # of DNO/MIRA (each step evaluates the model twice per sampler step, forward and recompute, and the final
    # sample once more), as the backbone counts them; backward passes are not counted (compare `seconds` for them).
    match_opt_steps: int | None = valid(None, Range(0))


@dataclass
class NoiseOptimisationConfig(SamplingConfig):
    """The optimiser and budget shared by noise-optimisation methods (DNO's defaults), so they compare fairly."""

    opt_steps: int = valid(100, Range(0))  # 0: the base sample (the start of a sweep over budgets)
    lr: float = valid(0.01, POSITIVE)
    weight_decay: float = valid(0.01, NON_NEGATIVE)  # AdamW's torch default
    grad_clip: float = valid(1.0, POSITIVE)  # max gradient norm
    optimize: str = valid("all", OneOf(("all", "x_T")))  # all (x_T and every ξ_t) | x_T
    checkpoint: bool = True  # per-model-call gradient checkpointing
    grad_steps: int | None = valid(None, COUNT)  # backprop through the last K sampler steps only (None = all)
    # R_prob (DNO's regulariser; for every noise method also the final noise's Gaussianity metric)
    block_size: int = valid(4, COUNT)  # d in R_prob
    num_permutations: int = valid(100, COUNT)  # K: R_prob = −(lp(z) + mean of lp over K permutations of z)
    fresh_permutations: bool = True  # new permutations at every optimisation step (DNO's code); false: one set per item
    # A held-out stopping rule: the step (or the final noise) whose image the held-out reward `held_out` (one of
    # eval.rewards; default the first) scores best is recorded as `held_out_step` whenever eval.rewards is set;
    # select=best_held_out also returns that image instead of the last one (select=last)
    select: str = valid("last", OneOf(("last", "best_held_out")))
    held_out: str | None = valid(None, OneOf(reward_configs))
    follows_reward_gradients: ClassVar[bool] = True

    @staticmethod
    def relations(c) -> Iterator[tuple[str, str]]:
        if c.grad_steps is not None and c.grad_steps > c.num_steps:
            yield "grad_steps", f"it must be ≤ method.num_steps={c.num_steps}"


@dataclass
class DNOConfig(NoiseOptimisationConfig):
    name: str = valid("dno", OneOf(("dno",)))
    gamma: float = valid(0.0, NON_NEGATIVE)  # weight of the probability regulariser R_prob (0 = off)


@dataclass
class MIRAConfig(NoiseOptimisationConfig):
    name: str = valid("mira", OneOf(("mira",)))
    optimize: str = valid("x_T", OneOf(("all", "x_T")))
    beta: float = valid(0.1, NON_NEGATIVE)  # weight of R_MIRA; sweep it (0.01–10 depending on the reward's scale)
    # uniform | girsanov (the weight making each step's prediction difference the exact Gaussian KL of that DDIM or
    # stochastic Euler step taken from the same x_t; needs eta > 0 and final_step_noise)
    weighting: str = valid("uniform", OneOf(("uniform", "girsanov")))
    # cfg (the guided ε̂ or v̂ that drives the sampler) | cond (conditional branch only)
    surrogate_guidance: str = valid("cfg", OneOf(("cfg", "cond")))

    @staticmethod
    def relations(c) -> Iterator[tuple[str, str]]:
        if c.weighting == "girsanov" and not (c.eta > 0 and c.final_step_noise):
            yield (
                "weighting",
                (
                    "girsanov needs method.eta > 0 and method.final_step_noise=true (every step "
                    "stochastic, so each step's KL is finite)"
                ),
            )


@dataclass
class DNOZeroOrderConfig(DNOConfig):
    """DNO with the reward's image gradient estimated from perturbed samples (black-box rewards)."""

    name: str = valid("dno_zo", OneOf(("dno_zo",)))
    num_candidates: int = valid(4, COUNT)  # K perturbed samples per optimisation step (no grad)
    mu: float = valid(0.01, POSITIVE)  # perturbation scale of the noise
    follows_reward_gradients: ClassVar[bool] = False


@dataclass
class MIRADPOConfig(MIRAConfig):
    """MIRA-DPO: preference loss on the best/worst of K perturbed samples, plus β·R_MIRA (β = 0 drops it)."""

    name: str = valid("mira_dpo", OneOf(("mira_dpo",)))
    num_candidates: int = valid(4, Range(2))  # K: the best and the worst of them form the preference pair
    mu: float = valid(0.01, POSITIVE)
    beta_dpo: float = valid(1.0, POSITIVE)  # inverse temperature of the preference loss
    tau: float = valid(0.01, POSITIVE)  # per-element scale of the Gaussian log-ratio surrogate
    space: str = valid("image", OneOf(("image", "latent")))  # where Δ_z compares samples
    follows_reward_gradients: ClassVar[bool] = False


@dataclass
class DRaFTConfig(SamplingConfig):
    """DRaFT-K / DRaFT-LV LoRA fine-tuning (+ KL to the adapter-free UNet); then the items are sampled with the
    trained adapter and measured like any method (base = adapters off, same seed)."""

    name: str = valid("draft", OneOf(("draft",)))
    num_steps: int = valid(25, Range(1, 1000))
    eta: float = valid(0.0, UNIT)
    guidance_scale: float = valid(7.5, NON_NEGATIVE)  # 7.5 for SD1.x; use 5.0 for SDXL
    variant: str = valid("k", OneOf(("k", "lv")))  # k (DRaFT-K; k=null is full DRaFT) | lv (DRaFT-LV)
    k: int | None = valid(1, COUNT)  # sampler steps that keep gradients (the last k)
    lv_samples: int = valid(2, COUNT)  # n re-noised copies of DRaFT-LV
    # λ of DRaFT+KL: λ·mean over the differentiated steps of mean((ε̃_ft − sg ε̃_base)²)
    kl_weight: float = valid(0.0, NON_NEGATIVE)
    lora_rank: int = valid(32, COUNT)
    lr: float = valid(2.5e-4, POSITIVE)
    weight_decay: float = valid(5e-3, NON_NEGATIVE)
    grad_clip: float = valid(10.0, POSITIVE)
    train_steps: int = valid(200, COUNT)
    train_batch_size: int = valid(4, COUNT)  # prompts per optimiser step (the global batch, split over processes)
    checkpoint: bool = True  # per-model-call gradient checkpointing
    save_every: int = valid(50, COUNT)  # adapter + resumable training state every N steps
    sample_every: int = valid(50, Range(0))  # log sample images and their reward every N steps (0 = never)
    follows_reward_gradients: ClassVar[bool] = True

    @staticmethod
    def relations(c) -> Iterator[tuple[str, str]]:
        if c.variant == "k" and c.k is not None and c.k > c.num_steps:
            yield "k", f"it must be ≤ method.num_steps={c.num_steps}"


@dataclass
class LoRAScaleConfig(SamplingConfig):
    """Sampling with a trained adapter scaled by α: W = W0 + α·BA (0 = base, 1 = as trained)."""

    name: str = valid("lora_scale", OneOf(("lora_scale",)))
    adapter: str = valid(MISSING, Text())  # directory with pytorch_lora_weights.safetensors (a draft run's adapter/)
    alpha: float = valid(1.0, Range())  # any finite scale: < 0 and > 1 extrapolate


@dataclass
class AIGConfig(SamplingConfig):
    """Annealed importance guidance: ε = (1 − γ_i)·ε̃_base + γ_i·ε̃_ft along the trajectory
    (i = 0 the noisiest step)."""

    name: str = valid("aig", OneOf(("aig",)))
    adapter: str = valid(MISSING, Text())
    schedule: str = valid("power", OneOf(("power", "linear", "step")))  # γ_i = (i/N)^p | p = 1 | 1[i/N ≥ f]
    p: float = valid(1.0, Range(0, math.inf))  # 0 = fine-tuned only, inf = base only
    f: float = valid(0.5, UNIT)


@dataclass
class PromptsConfig:
    name: str = valid(MISSING, OneOf(("inline", "file", "animal_animal", "simple_animals", "shapes")))
    prompts: list[str] = valid([], Text())  # inline
    path: str | None = valid(None, Text())  # file: .txt (one per line, # comments) or .json (list of strings)
    limit: int | None = valid(None, COUNT)  # keep the first N prompts

    @staticmethod
    def relations(c) -> Iterator[tuple[str, str]]:
        if c.name == "file" and not c.path:
            yield "path", "prompts=file needs prompts.path=/path/to/prompts.txt (or .json)"
        if c.name == "inline" and not c.prompts:
            yield "prompts", "prompts=inline needs prompts.prompts='[a cat,a dog]'"


@dataclass
class TrainerConfig:
    accelerator: str = valid("cpu", OneOf(("cpu", "gpu", "cuda", "mps", "auto")))
    devices: int = valid(1, COUNT)  # processes per node (one per device)
    strategy: str = valid("auto", OneOf(("auto", "ddp")))
    num_nodes: int = valid(1, COUNT)


@dataclass
class LoggerConfig:
    name: str = valid("wandb", OneOf(("wandb", "none")))
    project: str = valid("framework", Text())
    mode: str = valid("offline", OneOf(("offline", "online", "disabled")))
    group: str | None = valid(None, Text())
    tags: list[str] = valid([], Text())


@dataclass
class EvalConfig:
    """What is measured besides the optimised reward."""

    adherence: bool = False  # ground-truth colour/shape adherence with the testbed judge (model=shapes sets it)
    # Image embedding for drift, CMMD and diversity: auto (judge on the testbed, clip on real models, none on tiny
    # random ones) | clip (also gives CLIPScore adherence) | judge | none
    features: str = valid("auto", OneOf(("auto", "clip", "judge", "none")))
    clip: str = valid("openai/clip-vit-large-patch14", Text())  # CLIP for features=clip: hub id, directory or "tiny"
    # CMMD's CLIP when features=clip (CMMD as published is defined on ViT-L/14 at 336 px): hub id, local directory,
    # "tiny", or "none" (no CMMD). With features=judge CMMD is computed on the judge's features (sets.cmmd_judge).
    cmmd_clip: str = valid("openai/clip-vit-large-patch14-336", Text())
    rewards: list[str] = valid([], OneOf(reward_configs))  # held-out rewards by conf/reward name: eval_<name>


@dataclass
class Config:
    model: ModelConfig = MISSING
    reward: RewardConfig = MISSING
    method: Any = MISSING
    prompts: PromptsConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = valid(0, Range(0, 2**31 - 1))  # item seeds derive from (seed, prompt index, sample index)
    samples_per_prompt: int = valid(1, COUNT)
    output_dir: str = valid("${hydra:runtime.output_dir}", Text())

    @staticmethod
    def relations(c) -> Iterator[tuple[str, str]]:
        """Rules across groups; keys are full paths."""
        method = OmegaConf.get_type(c.method)
        if method is DRaFTConfig:
            processes = c.trainer.devices * c.trainer.num_nodes
            if c.method.train_batch_size % processes:
                yield (
                    "method.train_batch_size",
                    (
                        f"it must be a multiple of the {processes} processes "
                        "(trainer.devices × trainer.num_nodes): each takes an equal share"
                    ),
                )
            if "float16" in (c.model.dtype, c.model.vae_dtype):
                yield (
                    "model.dtype",
                    (
                        "method=draft does not train in float16 (the LoRA fit has no loss scaling, "
                        "so small gradients underflow to zero); use bfloat16 or float32"
                    ),
                )
        if "select" in c.method:
            yield from held_out_relations(c)
        if follows_reward_gradients(c.method) and not reward_is_differentiable(c.reward):
            yield (
                "reward.name",
                (
                    f"method {c.method.name} follows reward gradients, but reward {c.reward.name} is not "
                    "differentiable; use a black-box method (method=mira_dpo, dno_zo or best_of_n) or "
                    "a differentiable reward"
                ),
            )


def held_out_reward(c) -> str | None:
    """The held-out reward of a noise method's stopping rule in run config `c`: `method.held_out`, or the first of
    eval.rewards that is neither the testbed's ground-truth judge (which stays a pure measurement) nor the optimised
    reward itself (which the rule must not consult)."""
    if "select" not in c.method:  # not a noise-optimisation method: no stopping rule
        return None
    if c.method.held_out:
        return c.method.held_out
    candidates = (name for name in c.eval.rewards if name != "judge" and not same_reward(reward_config(name), c.reward))
    return next(candidates, None)


def held_out_relations(c) -> Iterator[tuple[str, str]]:
    if c.method.held_out is not None and c.method.held_out not in c.eval.rewards:
        yield "method.held_out", f"it must be one of eval.rewards={list(c.eval.rewards)}"
    elif c.method.held_out == "judge":
        yield "method.held_out", "the ground-truth judge measures adherence; it cannot choose the step"
    elif c.method.held_out is not None and same_reward(reward_config(c.method.held_out), c.reward):
        yield "method.held_out", "it is the optimised reward; a held-out reward must be another one"
    elif c.method.select == "best_held_out" and held_out_reward(c) is None:
        yield (
            "method.select",
            "best_held_out needs a held-out reward other than the optimised one: set eval.rewards "
            "(e.g. eval.rewards=[contrast])",
        )


def reward_config(name: str) -> RewardConfig:
    """The config of conf/reward/<name>.yaml (e.g. a held-out evaluation reward), as `reward=<name>` composes it."""
    path = CONF_DIR / "reward" / f"{name}.yaml"
    if not path.is_file():
        raise FrameworkError(f"eval.rewards: no reward config {name!r}; choose from: {', '.join(reward_configs())}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardConfig), OmegaConf.load(path)))


def same_reward(a, b) -> bool:
    """Whether reward configs `a` and `b` score with the same reward and weights (whatever their scale, dtype or
    clamping)."""
    keys = [f.name for f in fields(RewardConfig) if f.name not in ("scale", "dtype", "clamp")]
    return all(getattr(a, key) == getattr(b, key) for key in keys)


METHOD_SCHEMAS = {
    "base": BaseConfig,
    "best_of_n": BestOfNConfig,
    "dno": DNOConfig,
    "mira": MIRAConfig,
    "dno_zo": DNOZeroOrderConfig,
    "mira_dpo": MIRADPOConfig,
    "draft": DRaFTConfig,
    "lora_scale": LoRAScaleConfig,
    "aig": AIGConfig,
}


def register_configs() -> None:
    # ${testbed_model:} in conf/model/shapes.yaml: the trained testbed shipped inside the package
    OmegaConf.register_new_resolver("testbed_model", lambda: str(MODEL_DIR), replace=True)
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)  # types model/reward/prompts/trainer/logger of every option
    for name, node in METHOD_SCHEMAS.items():  # each method/<name>.yaml starts from /schema/method/<name>
        store.store(group="schema/method", name=name, node=node)


register_configs()


def reward_is_differentiable(reward) -> bool:
    """Whether gradients reach the images through reward config `reward` (known before it is built)."""
    if reward.name == "callable":
        return reward.differentiable
    return reward.name not in NON_DIFFERENTIABLE_REWARDS


def follows_reward_gradients(method) -> bool:
    """Whether the method of config `method` (a DictConfig or a schema instance) back-propagates the reward."""
    return getattr(OmegaConf.get_type(method), "follows_reward_gradients", False)


def unknown_key(group: str, key: str, schema: type) -> FrameworkError:
    """The error for `key` not declared by `schema` (group "" = the top level), naming the valid keys."""
    valid_keys = ", ".join(sorted(f.name for f in fields(schema)))
    if not group:
        return FrameworkError(f"unknown option {key}; valid top-level keys: {valid_keys} (and group keys: method.lr)")
    return FrameworkError(f"unknown option {group}.{key}; valid keys of {group}: {valid_keys}")


def compose_error(e: Exception) -> FrameworkError:
    """Hydra's and OmegaConf's composition errors as one line, an unknown key as `validate` reports it (Hydra says
    "Could not override" without `+` and nothing at all with it)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = e.__cause__
    if isinstance(e, OverrideParseException):
        return FrameworkError(parse_error(e))
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return FrameworkError(f"{group}={option}: no such option; choose from: {', '.join(e.options)}")
    key = getattr(cause, "full_key", None)
    schema = getattr(cause, "object_type", None)
    if key and isinstance(cause, AttributeError) and schema is not None and hasattr(schema, "__dataclass_fields__"):
        group, _, name = key.rpartition(".")
        return unknown_key(group, name, schema)
    first = lambda error: (str(error).strip().splitlines() or [type(error).__name__])[0]  # noqa: E731
    return FrameworkError(f"{key}: {first(cause)}" if key else first(e))


def parse_error(e) -> str:
    """Hydra's OverrideParseException as one line naming the override and what the grammar expected."""
    lines = [line for line in str(e).splitlines() if line.strip() and not line.startswith(("Error parsing", "See "))]
    detail = lines[0] if lines else "not valid override syntax"
    if detail.startswith("LexerNoViableAltException") and len(lines) > 1:  # a caret line points at the character
        position = len(lines[1]) - len(lines[1].lstrip()) - len("LexerNoViableAltException: ")
        detail = f"unexpected character {e.override[position]!r} at position {position + 1}"
    return (
        f"cannot parse the override {e.override!r}: {detail}; write key=value, a list as key=[a,b], and quote a "
        "value holding brackets, commas, quotes or $ (key='a, b')"
    )


def _schema_nodes(cfg) -> Iterator[tuple[str, Any, type]]:
    """(key prefix, node, schema) of the top-level config and of every group with a schema."""
    yield "", cfg, Config
    for group, node in cfg.items_ex(resolve=False):
        schema = OmegaConf.get_type(node) if OmegaConf.is_dict(node) else None
        if schema not in (None, dict):
            yield f"{group}.", node, schema


def validate(cfg) -> None:
    """Every value of a composed run config against its field's rule, then every schema's `relations`; the first
    problem is one FrameworkError naming the key, the value given and what is valid. Also rejects keys that no
    schema declares (added with Hydra's `+group.key=value`, which skips struct checks)."""
    nodes = list(_schema_nodes(cfg))
    for prefix, node, schema in nodes:
        declared = {f.name: f for f in fields(schema)}
        for key in node.keys():
            if key not in declared:
                raise unknown_key(prefix.rstrip("."), key, schema)
        for name, spec in declared.items():
            if OmegaConf.is_missing(node, name):
                raise FrameworkError(f"{prefix}{name} is required (it has no default); set {prefix}{name}=...")
            rule = spec.metadata.get("rule")
            if rule is None or isinstance(rule, Text):  # bools are type-checked by OmegaConf; text where it is used
                continue
            value = node[name]
            if value is not None and not rule.accepts(value):
                shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
                raise FrameworkError(f"{prefix}{name}={shown!r} is not valid; {rule.describe()}")
    for prefix, node, schema in nodes[1:] + nodes[:1]:  # within groups first, then across them
        for cls in schema.__mro__:  # each class states its own relations; subclasses inherit them
            relations = cls.__dict__.get("relations")
            for key, why in relations(node) if relations else ():
                key = key if prefix == "" else f"{prefix}{key}"
                value = OmegaConf.select(cfg, key)
                raise FrameworkError(f"{key}={value!r} is not valid; {why}")
