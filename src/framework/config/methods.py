"""The methods' one table: each method's schema (its options, each with what is valid), and on the schema class its
implementation ("module:Class", imported when the method is built) and its properties (`follows_reward_gradients`,
`kind`).
Validation, Hydra's config store (`/schema/method/<name>`) and `build_method` read them from here; importing this
module loads no network, so a typo is reported before torch's models load."""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from omegaconf import MISSING, OmegaConf

from framework.config.rewards import is_differentiable
from framework.core.options import options
from framework.core.validation import COUNT, NON_NEGATIVE, POSITIVE, UNIT, OneOf, Range, Text, valid

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # an adapter directory's weights (diffusers' name)
KINDS = (
    "samples",  # draws each item once (with an adapter, a guidance schedule, or as it is)
    "draws_candidates",  # draws several candidates per item and keeps one (Best-of-N)
    "optimises_noise",  # optimises each item's noise: per-step records, a held-out stopping rule (DNO, MIRA, ...)
    "fine_tunes",  # trains an adapter on the prompts, then samples the items with it (DRaFT)
)


def method_kind(method) -> str:
    """The kind (KINDS) of a method config (a schema instance or a composed DictConfig), declared by its schema."""
    return METHODS[method.name].kind


def reward_options() -> tuple[str, ...]:
    """The options of conf/reward, which name held-out rewards."""
    return options("reward")


def gradient_problem(schema: type, reward: str, differentiable: bool) -> str | None:
    """Why a method cannot use a reward, or None: the one place that decides that a method following reward
    gradients needs a reward they reach the images through."""
    if getattr(schema, "follows_reward_gradients", False) and not differentiable:
        return (
            f"method {schema.__dataclass_fields__['name'].default} follows reward gradients, but reward {reward} is "
            "not differentiable; use a black-box method (method=mira_dpo, dno_zo or best_of_n) or a differentiable "
            "reward"
        )
    return None


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
    implementation: ClassVar[str]  # "module:Class" of the method, imported when it is built
    kind: ClassVar[str] = "samples"  # one of KINDS: what the method does with the model

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        if problem := gradient_problem(OmegaConf.get_type(c), run.reward.name, is_differentiable(run.reward)):
            yield "reward.name", problem


@dataclass
class BaseConfig(SamplingConfig):
    name: str = valid("base", OneOf(("base",)))
    implementation: ClassVar[str] = "framework.methods.base:Base"


@dataclass
class BestOfNConfig(SamplingConfig):
    name: str = valid("best_of_n", OneOf(("best_of_n",)))
    implementation: ClassVar[str] = "framework.methods.best_of_n:BestOfN"
    kind: ClassVar[str] = "draws_candidates"
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
    held_out: str | None = valid(None, OneOf(reward_options))
    follows_reward_gradients: ClassVar[bool] = True
    kind: ClassVar[str] = "optimises_noise"

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        if c.grad_steps is not None and c.grad_steps > c.num_steps:
            yield "method.grad_steps", f"it must be ≤ method.num_steps={c.num_steps}"


@dataclass
class DNOConfig(NoiseOptimisationConfig):
    name: str = valid("dno", OneOf(("dno",)))
    implementation: ClassVar[str] = "framework.methods.dno:DNO"
    gamma: float = valid(0.0, NON_NEGATIVE)  # weight of the probability regulariser R_prob (0 = off)


@dataclass
class MIRAConfig(NoiseOptimisationConfig):
    name: str = valid("mira", OneOf(("mira",)))
    implementation: ClassVar[str] = "framework.methods.mira:MIRA"
    optimize: str = valid("x_T", OneOf(("all", "x_T")))
    beta: float = valid(0.1, NON_NEGATIVE)  # weight of R_MIRA; sweep it (0.01–10 depending on the reward's scale)
    # uniform | girsanov (the weight making each step's prediction difference the exact Gaussian KL of that DDIM or
    # stochastic Euler step taken from the same x_t; needs eta > 0 and final_step_noise)
    weighting: str = valid("uniform", OneOf(("uniform", "girsanov")))
    # cfg (the guided ε̂ or v̂ that drives the sampler) | cond (conditional branch only)
    surrogate_guidance: str = valid("cfg", OneOf(("cfg", "cond")))

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        if c.weighting == "girsanov" and not (c.eta > 0 and c.final_step_noise):
            yield (
                "method.weighting",
                (
                    "girsanov needs method.eta > 0 and method.final_step_noise=true (every step "
                    "stochastic, so each step's KL is finite)"
                ),
            )


@dataclass
class DNOZeroOrderConfig(DNOConfig):
    """DNO with the reward's image gradient estimated from perturbed samples (black-box rewards)."""

    name: str = valid("dno_zo", OneOf(("dno_zo",)))
    implementation: ClassVar[str] = "framework.methods.dno_zo:DNOZeroOrder"
    num_candidates: int = valid(4, COUNT)  # K perturbed samples per optimisation step (no grad)
    mu: float = valid(0.01, POSITIVE)  # perturbation scale of the noise
    follows_reward_gradients: ClassVar[bool] = False


@dataclass
class MIRADPOConfig(MIRAConfig):
    """MIRA-DPO: preference loss on the best/worst of K perturbed samples, plus β·R_MIRA (β = 0 drops it)."""

    name: str = valid("mira_dpo", OneOf(("mira_dpo",)))
    implementation: ClassVar[str] = "framework.methods.mira_dpo:MIRADPO"
    num_candidates: int = valid(4, Range(2))  # K: the best and the worst of them form the preference pair
    mu: float = valid(0.01, POSITIVE)
    beta_dpo: float = valid(1.0, POSITIVE)  # inverse temperature of the preference loss
    tau: float = valid(0.01, POSITIVE)  # per-element scale of the Gaussian log-ratio surrogate
    space: str = valid("image", OneOf(("image", "latent")))  # where Δ_z compares samples
    follows_reward_gradients: ClassVar[bool] = False


@dataclass
class AdapterTrainingConfig(SamplingConfig):
    """What the fine-tuning methods share: a LoRA adapter trained for `train_steps` optimiser steps, resumable,
    then the items are sampled with it and measured like any method (base = adapters off, same seed)."""

    lora_rank: int = valid(32, COUNT)
    lr: float = valid(2.5e-4, POSITIVE)
    weight_decay: float = valid(5e-3, NON_NEGATIVE)
    grad_clip: float = valid(10.0, POSITIVE)  # max gradient norm
    train_steps: int = valid(200, COUNT)  # optimiser steps
    save_every: int = valid(50, COUNT)  # adapter + resumable training state every N steps
    sample_every: int = valid(50, Range(0))  # a grid of probe images, with their reward, every N steps (0 = never)
    # GARDO's gate: the KL term (kl_weight) on only this fraction of each batch's samples, those whose ensemble
    # members disagree most (reward=ensemble); 1: on every sample
    kl_gate: float = valid(1.0, Range(0, 1, low_open=True))
    implementation: ClassVar[str] = "framework.methods.fine_tune:FineTuneThenSample"
    kind: ClassVar[str] = "fine_tunes"
    trainer: ClassVar[str]  # "module:Class" of its Lightning module (framework.methods.fine_tune.AdapterTraining)

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        if c.kl_gate < 1 and run.reward.name != "ensemble":
            yield "method.kl_gate", "it gates the KL by the disagreement of an ensemble: use reward=ensemble"
        elif c.kl_gate < 1 and not c.kl_weight:
            yield "method.kl_gate", "there is no KL term to gate: set method.kl_weight > 0"
        if "float16" in (run.model.dtype, run.model.vae_dtype):
            yield (
                "model.dtype",
                f"method={c.name} does not train in float16 (the LoRA fit has no loss scaling, so small gradients "
                "underflow to zero); use bfloat16 or float32",
            )


def split_over_processes(key: str, value: int, run, each: str) -> Iterator[tuple[str, str]]:
    """A global batch that every process (trainer.devices × trainer.num_nodes) shares equally."""
    processes = run.trainer.devices * run.trainer.num_nodes
    if value % processes:
        yield (
            f"method.{key}",
            f"it must be a multiple of the {processes} processes (trainer.devices × trainer.num_nodes): each {each}",
        )


@dataclass
class DRaFTConfig(AdapterTrainingConfig):
    """DRaFT-K / DRaFT-LV LoRA fine-tuning (+ KL to the adapter-free UNet)."""

    name: str = valid("draft", OneOf(("draft",)))
    trainer: ClassVar[str] = "framework.methods.draft:DRaFT"
    num_steps: int = valid(25, Range(1, 1000))
    eta: float = valid(0.0, UNIT)
    guidance_scale: float = valid(7.5, NON_NEGATIVE)  # 7.5 for SD1.x; use 5.0 for SDXL
    variant: str = valid("k", OneOf(("k", "lv")))  # k (DRaFT-K; k=null is full DRaFT) | lv (DRaFT-LV)
    k: int | None = valid(1, COUNT)  # sampler steps that keep gradients (the last k)
    lv_samples: int = valid(2, COUNT)  # n re-noised copies of DRaFT-LV
    # λ of DRaFT+KL: λ·mean over the differentiated steps of mean((ε̃_ft − sg ε̃_base)²)
    kl_weight: float = valid(0.0, NON_NEGATIVE)
    train_batch_size: int = valid(4, COUNT)  # prompts per optimiser step (the global batch, split over processes)
    checkpoint: bool = True  # per-model-call gradient checkpointing
    follows_reward_gradients: ClassVar[bool] = True

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        if c.variant == "k" and c.k is not None and c.k > c.num_steps:
            yield "method.k", f"it must be ≤ method.num_steps={c.num_steps}"
        yield from split_over_processes("train_batch_size", c.train_batch_size, run, "takes an equal share")


@dataclass
class GRPOConfig(AdapterTrainingConfig):
    """GRPO (Flow-GRPO; DDPO on ε-models): online RL with group-relative advantages; any reward, black box included.
    Defaults: Flow-GRPO's (framework.methods.grpo)."""

    name: str = valid("grpo", OneOf(("grpo",)))
    trainer: ClassVar[str] = "framework.methods.grpo:GRPO"
    # the items' sampler after training: Flow-GRPO evaluates at 40 deterministic steps
    num_steps: int = valid(40, Range(1, 1000))
    eta: float = valid(0.0, UNIT)
    guidance_scale: float = valid(4.5, NON_NEGATIVE)  # CFG of the items, the rollouts and the updates
    rollout_steps: int = valid(10, Range(1, 1000))  # sampler steps of the rollouts
    noise_level: float = valid(0.7, Range(0, 1, low_open=True))  # η of the rollouts' stochastic steps (> 0)
    group_size: int = valid(8, Range(2))  # images per prompt (Flow-GRPO: 24)
    prompts_per_epoch: int = valid(2, COUNT)  # prompt groups per epoch (the global batch, split over processes)
    inner_epochs: int = valid(1, COUNT)  # optimiser steps per epoch's rollouts
    advantage: str = valid("group", OneOf(("group", "batch", "pairwise")))
    global_std: bool = True  # the std of the advantage over the epoch's rewards, not the group's
    adv_clip_max: float = valid(5.0, POSITIVE)
    clip_range: float = valid(1e-4, POSITIVE)  # ε of the clipped ratio
    kl_weight: float = valid(0.04, NON_NEGATIVE)  # β of the per-step KL to the base model
    timesteps: str = valid("first", OneOf(("first", "random", "window")))  # which rollout steps are trained ...
    timestep_fraction: float = valid(0.99, UNIT)  # ... that many of them, at least one (first, random)
    # window (MixGRPO): window_size steps, stochastic and trained, the rest deterministic; the window starts at the
    # noisiest step and moves window_stride steps later every window_shift_every epochs, up to the last step
    window_size: int = valid(4, COUNT)
    window_stride: int = valid(1, COUNT)
    window_shift_every: int = valid(25, COUNT)
    lr: float = valid(3e-4, POSITIVE)
    weight_decay: float = valid(1e-4, NON_NEGATIVE)
    grad_clip: float = valid(1.0, POSITIVE)

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        yield from split_over_processes("prompts_per_epoch", c.prompts_per_epoch, run, "samples whole groups")
        if c.train_steps % c.inner_epochs:
            yield "method.train_steps", f"it counts optimiser steps: a multiple of method.inner_epochs={c.inner_epochs}"
        if c.timesteps == "window" and c.window_size > c.rollout_steps:
            yield "method.window_size", f"a window within the rollout: at most method.rollout_steps={c.rollout_steps}"


@dataclass
class LoRAScaleConfig(SamplingConfig):
    """Sampling with a trained adapter scaled by α: W = W0 + α·BA (0 = base, 1 = as trained)."""

    name: str = valid("lora_scale", OneOf(("lora_scale",)))
    implementation: ClassVar[str] = "framework.methods.lora_scale:LoRAScale"
    adapter: str = valid(MISSING, Text())  # directory with pytorch_lora_weights.safetensors (a draft run's adapter/)
    alpha: float = valid(1.0, Range())  # any finite scale: < 0 and > 1 extrapolate


@dataclass
class AIGConfig(SamplingConfig):
    """Annealed importance guidance: ε = (1 − γ_i)·ε̃_base + γ_i·ε̃_ft along the trajectory
    (i = 0 the noisiest step)."""

    name: str = valid("aig", OneOf(("aig",)))
    implementation: ClassVar[str] = "framework.methods.aig:AIG"
    adapter: str = valid(MISSING, Text())
    schedule: str = valid("power", OneOf(("power", "linear", "step")))  # γ_i = (i/N)^p | p = 1 | 1[i/N ≥ f]
    p: float = valid(1.0, Range(0, math.inf))  # 0 = fine-tuned only, inf = base only
    f: float = valid(0.5, UNIT)


METHODS: dict[str, type[SamplingConfig]] = {
    schema.__dataclass_fields__["name"].default: schema
    for schema in (
        BaseConfig,
        BestOfNConfig,
        DNOConfig,
        MIRAConfig,
        DNOZeroOrderConfig,
        MIRADPOConfig,
        DRaFTConfig,
        GRPOConfig,
        LoRAScaleConfig,
        AIGConfig,
    )
}


def register_method(schema: type[SamplingConfig]) -> None:
    """Add a method of your own (docs/extending.md): its schema, with `name` and `implementation`, becomes
    `method.name=<name>` and `/schema/method/<name>` for a conf/method/<name>.yaml on Hydra's search path."""
    from hydra.core.config_store import ConfigStore

    name = schema.__dataclass_fields__["name"].default
    METHODS[name] = schema
    ConfigStore.instance().store(group="schema/method", name=name, node=schema)
