"""Typed schemas of every config group, registered in Hydra's ConfigStore.

Each YAML file in `conf/` is validated against its schema: an unknown key or a wrongly typed value fails at compose
time. Methods have one schema each (`schema/method/<name>`), since their knobs differ.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from framework.testbed import MODEL_DIR

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the Hydra configs (src layout: <repo>/conf)


@dataclass
class ModelConfig:
    kind: str = MISSING  # sd (SD1.x) | sdxl
    source: str | None = None  # hub id or local directory (save_pretrained layout); None with tiny=true
    tiny: bool = False  # random-weight tiny architecture built in-process (tests, smoke runs)
    revision: str | None = None
    variant: str | None = None  # e.g. fp16 (which weight files to read)
    dtype: str = "float32"  # float32 | float16 | bfloat16 (UNet and text encoders)
    vae_dtype: str | None = None  # defaults to dtype; SDXL's VAE overflows in float16
    resolution: int = 512  # image side in pixels


@dataclass
class RewardConfig:
    name: str = MISSING  # aesthetic | hps | pickscore | clipscore | jpeg | brightness | darkness | contrast |
    #                      saturation | judge | callable
    source: str | None = None  # CLIP model: hub id or local directory (aesthetic, pickscore, clipscore)
    processor: str | None = None  # tokenizer source when it differs from `source` (pickscore)
    checkpoint: str | None = None  # weight file: local path or owner/repo/file (aesthetic MLP, HPS state dict)
    arch: str | None = None  # open_clip architecture (hps)
    version: str = "v2.1"  # hps: v2.0 | v2.1
    tiny: bool = False  # random tiny version of the same architecture, built in-process
    dtype: str = "float32"
    jpeg_quality: int = 95
    target: str | None = None  # callable: "package.module:function" taking (images, prompts)
    differentiable: bool = False  # callable: whether gradients flow through `target`
    # Score the images clamped to [0, 1] (true) or as decoded (false); null = the reward's own default: the toy
    # statistics read the raw decoder output as DNO does, every model-based reward, JPEG and callables clamp.
    clamp: bool | None = None
    scale: float = 1.0  # multiplies the score (hps: 0.01 gives the raw cosine of DNO's code); β/γ scale with it


@dataclass
class SamplingConfig:
    """What every method shares: the DDIM sampler it draws images with."""

    num_steps: int = 50
    eta: float = 1.0
    guidance_scale: float = 5.0
    # σ·ξ at the last DDIM step when eta > 0: true as diffusers' DDIMScheduler; false as DNO's sampler (the last
    # step deterministic), which matters for rewards that see high-frequency noise (JPEG)
    final_step_noise: bool = True
    batch_size: int = 8  # images per sampler call where a method draws several


@dataclass
class BaseConfig(SamplingConfig):
    name: str = "base"


@dataclass
class BestOfNConfig(SamplingConfig):
    name: str = "best_of_n"
    n: int = 16
    # Compute-matched N: when set, N = 2K + 1 spends exactly the model evaluations of K checkpointed gradient steps
    # of DNO/MIRA (each step evaluates the model twice per sampler step, forward and recompute, and the final
    # sample once more), as the backbone counts them; backward passes are not counted (compare `seconds` for them).
    match_opt_steps: int | None = None


@dataclass
class NoiseOptimisationConfig(SamplingConfig):
    """The optimiser and budget shared by noise-optimisation methods (DNO's defaults), so they compare fairly."""

    opt_steps: int = 100
    lr: float = 0.01
    weight_decay: float = 0.01  # AdamW's torch default
    grad_clip: float = 1.0
    optimize: str = "all"  # all (x_T and every ξ_t) | x_T
    checkpoint: bool = True  # per-model-call gradient checkpointing
    grad_steps: int | None = None  # backprop through the last K sampler steps only (None = all)
    # R_prob (DNO's regulariser; for every noise method also the final noise's Gaussianity metric)
    block_size: int = 4  # d in R_prob
    num_permutations: int = 100  # K: R_prob = −(lp(z) + mean of lp over K permutations of z)
    fresh_permutations: bool = True  # new permutations at every optimisation step (DNO's code); false: one set per item


@dataclass
class DNOConfig(NoiseOptimisationConfig):
    name: str = "dno"
    gamma: float = 0.0  # weight of the probability regulariser R_prob (0 = off)


@dataclass
class MIRAConfig(NoiseOptimisationConfig):
    name: str = "mira"
    optimize: str = "x_T"
    beta: float = 0.1  # weight of R_MIRA; sweep it (0.01–10 depending on the reward's scale)
    # uniform | eps_kl (the weight making each step's ε̂ difference the exact Gaussian KL of that DDIM step taken from
    # the same x_t; needs eta > 0 and final_step_noise)
    weighting: str = "uniform"
    surrogate_guidance: str = "cfg"  # cfg (the guided ε̂ that drives the sampler) | cond (conditional branch only)


@dataclass
class DNOZeroOrderConfig(DNOConfig):
    """DNO with the reward's image gradient estimated from perturbed samples (black-box rewards)."""

    name: str = "dno_zo"
    num_candidates: int = 4  # K perturbed samples per optimisation step (no grad)
    mu: float = 0.01  # perturbation scale of the noise


@dataclass
class MIRADPOConfig(MIRAConfig):
    """MIRA-DPO: preference loss on the best/worst of K perturbed samples, plus β·R_MIRA (β = 0 drops it)."""

    name: str = "mira_dpo"
    num_candidates: int = 4  # K ≥ 2
    mu: float = 0.01
    beta_dpo: float = 1.0  # inverse temperature of the preference loss
    tau: float = 0.01  # per-element scale of the Gaussian log-ratio surrogate
    space: str = "image"  # image | latent: where Δ_z compares samples


@dataclass
class DRaFTConfig(SamplingConfig):
    """DRaFT-K / DRaFT-LV LoRA fine-tuning (+ KL to the adapter-free UNet); then the items are sampled with the
    trained adapter and measured like any method (base = adapters off, same seed)."""

    name: str = "draft"
    num_steps: int = 25
    eta: float = 0.0
    guidance_scale: float = 7.5  # 7.5 for SD1.x; use 5.0 for SDXL
    variant: str = "k"  # k (DRaFT-K; k=null is full DRaFT) | lv (DRaFT-LV)
    k: int | None = 1  # sampler steps that keep gradients (the last k)
    lv_samples: int = 2  # n re-noised copies of DRaFT-LV
    kl_weight: float = 0.0  # λ of DRaFT+KL: λ·mean over differentiated steps of mean((ε̃_ft − sg ε̃_base)²)
    lora_rank: int = 32
    lr: float = 2.5e-4
    weight_decay: float = 5e-3
    grad_clip: float = 10.0
    train_steps: int = 200
    train_batch_size: int = 4  # prompts per optimiser step (the global batch; split evenly over processes)
    checkpoint: bool = True  # per-model-call gradient checkpointing
    save_every: int = 50  # adapter + resumable training state every N steps
    sample_every: int = 50  # log sample images and their reward every N steps


@dataclass
class LoRAScaleConfig(SamplingConfig):
    """Sampling with a trained adapter scaled by α: W = W0 + α·BA (0 = base, 1 = as trained)."""

    name: str = "lora_scale"
    adapter: str = MISSING  # directory with pytorch_lora_weights.safetensors (a draft run's adapter/)
    alpha: float = 1.0


@dataclass
class AIGConfig(SamplingConfig):
    """Annealed importance guidance: ε = (1 − γ_i)·ε̃_base + γ_i·ε̃_ft along the trajectory (i = 0 noisiest)."""

    name: str = "aig"
    adapter: str = MISSING
    schedule: str = "power"  # power (γ_i = (i/N)^p) | linear (p = 1) | step (γ_i = 1[i/N ≥ f])
    p: float = 1.0  # 0 = fine-tuned only, inf = base only
    f: float = 0.5


@dataclass
class PromptsConfig:
    name: str = MISSING  # inline | file | animal_animal | simple_animals | shapes
    prompts: list[str] = field(default_factory=list)  # inline
    path: str | None = None  # file: .txt (one per line, # comments) or .json (list of strings)
    limit: int | None = None  # keep the first N prompts


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "framework"
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """What is measured besides the optimised reward."""

    adherence: bool = False  # ground-truth colour/shape adherence with the testbed judge (model=shapes sets it)
    # Image embedding for drift, CMMD and diversity: auto (judge on the testbed, clip on real models, none on tiny
    # random ones) | clip (also gives CLIPScore adherence) | judge | none
    features: str = "auto"
    clip: str = "openai/clip-vit-large-patch14"  # CLIP for features=clip: hub id, local directory, or "tiny"
    # CMMD's CLIP when features=clip (CMMD as published is defined on ViT-L/14 at 336 px): hub id, local directory,
    # "tiny", or "none" (no CMMD). With features=judge CMMD is computed on the judge's features (sets.cmmd_judge).
    cmmd_clip: str = "openai/clip-vit-large-patch14-336"
    rewards: list[str] = field(default_factory=list)  # held-out rewards by conf/reward name, reported as eval_<name>


@dataclass
class Config:
    model: ModelConfig = MISSING
    reward: RewardConfig = MISSING
    method: Any = MISSING
    prompts: PromptsConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    samples_per_prompt: int = 1
    output_dir: str = "${hydra:runtime.output_dir}"


METHOD_SCHEMAS = {"base": BaseConfig, "best_of_n": BestOfNConfig, "dno": DNOConfig, "mira": MIRAConfig,
                  "dno_zo": DNOZeroOrderConfig, "mira_dpo": MIRADPOConfig, "draft": DRaFTConfig,
                  "lora_scale": LoRAScaleConfig, "aig": AIGConfig}


def register_configs() -> None:
    # ${testbed_model:} in conf/model/shapes.yaml: the trained testbed shipped inside the package
    OmegaConf.register_new_resolver("testbed_model", lambda: str(MODEL_DIR), replace=True)
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)  # types model/reward/prompts/trainer/logger of every option
    for name, node in METHOD_SCHEMAS.items():  # each method/<name>.yaml starts from /schema/method/<name>
        store.store(group="schema/method", name=name, node=node)


register_configs()


def check_known_keys(cfg) -> None:
    """Reject keys that no schema declares, e.g. added with Hydra's `+group.key=value`, which skips struct checks."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from framework.errors import FrameworkError

    for group, node in cfg.items_ex(resolve=False):
        schema = OmegaConf.get_type(node) if OmegaConf.is_dict(node) else None
        if schema is None or schema is dict:
            continue
        known = {f.name for f in fields(schema)}
        unknown = sorted(set(node.keys()) - known)
        if unknown:
            raise FrameworkError(f"unknown option {group}.{unknown[0]}; valid keys of {group}: {', '.join(sorted(known))}")


def choose(value: str, options: tuple[str, ...], key: str) -> str:
    """`value` if it is one of `options`, else a one-line error naming the key and the valid options."""
    from framework.errors import FrameworkError

    if value not in options:
        raise FrameworkError(f"{key}={value!r} is not valid; choose one of: {', '.join(options)}")
    return value
