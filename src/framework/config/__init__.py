"""The run's config: the schema of every group that has no package of its own (model, prompts, trainer, logger, eval),
the root that composes them with the rewards' and the methods' schemas (framework.config.rewards,
framework.config.methods), the rules across groups, and their registration in Hydra's ConfigStore.

Each YAML file in `conf/` is checked against its schema at compose time (an unknown key or a wrongly typed value);
framework.core.validation then checks every value against its rule and every schema's relations before anything loads.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from framework.config.families import FAMILIES, flow_kinds
from framework.config.methods import METHODS, method_kind, reward_options
from framework.config.rewards import DTYPES, RewardConfig, preset
from framework.core.errors import FrameworkError
from framework.core.validation import COUNT, POSITIVE, OneOf, Range, Text, valid
from framework.testbed import MODEL_DIR


@dataclass
class ModelConfig:
    kind: str = valid(MISSING, OneOf(lambda: tuple(FAMILIES)))  # a row of framework.config.families
    source: str | None = valid(None, Text())  # hub id or local directory (save_pretrained layout); None if built
    tiny: bool = False  # random-weight tiny architecture built in-process (tests, smoke runs)
    # the published full-size architecture of `kind` (SD1.5, SDXL base, SD3.5 medium, Qwen-Image, FLUX.2-dev) with
    # seeded random weights, built in-process from configurations shipped with the package: speed and memory as the
    # real model's, images noise
    random_weights: bool = False
    revision: str | None = valid(None, Text())
    variant: str | None = valid(None, Text())  # e.g. fp16 (which weight files to read)
    dtype: str = valid("float32", OneOf(DTYPES))  # UNet and text encoders
    # null: dtype, except float32 under float16 for a VAE that overflows there (SDXL's), as diffusers does
    vae_dtype: str | None = valid(None, OneOf(DTYPES))
    resolution: int = valid(512, Range(8, multiple_of=8))  # image side in pixels (the SD VAEs downsample 8×)
    # non-square images: either or both sides in pixels (null: resolution)
    height: int | None = valid(None, Range(8, multiple_of=8))
    width: int | None = valid(None, Range(8, multiple_of=8))
    # text tokens of a flow model's prompt (T5's for SD3 and FLUX.1, ≤ 512; the LLM encoder's for Qwen-Image, ≤ 1024,
    # and FLUX.2); null: its pipeline's default (256 SD3, 512 the others; FLUX.1-schnell takes ≤ 256)
    max_sequence_length: int | None = valid(None, Range(1, 1024))
    # How the networks run (RUNTIME_OPTIONS); none changes a result beyond float rounding, so a run resumes across
    # them. The defaults are measured (docs/performance.md).
    vae_checkpointing: bool = True  # keep only the VAE decoder's block inputs for backward, recompute the rest
    unet_checkpointing: bool = False  # the same inside each UNet evaluation (one more UNet forward per step)
    channels_last: bool = False  # UNet and VAE in channels-last memory format
    compile: bool = False  # torch.compile the UNet (the first steps compile: minutes)
    # flow models: encode the run's prompts once on the device, then drop the text encoders for the run
    offload_text_encoder: bool = False

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        if c.tiny and c.random_weights:
            yield "model.random_weights", "model.tiny and model.random_weights both build random weights: choose one"
        elif (c.tiny or c.random_weights) and c.source is not None:
            built = "tiny" if c.tiny else "random_weights"
            yield "model.source", f"model.{built}=true builds the model in-process: unset model.source (source=null)"
        elif not (c.tiny or c.random_weights) and c.source is None:
            yield (
                "model.source",
                "give a hub id or a local directory (or set model.tiny=true or model.random_weights=true)",
            )
        family, flow = FAMILIES[c.kind], ", ".join(flow_kinds())
        if c.max_sequence_length is not None and family.max_text_tokens is None:
            yield "model.max_sequence_length", f"only the flow models ({flow}) read it"
        elif (c.max_sequence_length or 0) > (family.max_text_tokens or 0):
            yield "model.max_sequence_length", f"{c.kind}'s text encoder reads at most {family.max_text_tokens} tokens"
        if c.offload_text_encoder and not family.flow_matching:
            yield "model.offload_text_encoder", f"the flow models ({flow}) offload their text encoders"
        if c.random_weights and family.architecture is None:
            shipped = ", ".join(name for name, row in FAMILIES.items() if row.architecture)
            yield "model.random_weights", f"full-size random architectures ship for {shipped}, not {c.kind}"


RUNTIME_OPTIONS = ("vae_checkpointing", "unet_checkpointing", "channels_last", "compile", "offload_text_encoder")


@dataclass
class PromptsConfig:
    name: str = valid(MISSING, OneOf(("inline", "file", "animal_animal", "simple_animals", "shapes")))
    prompts: list[str] = valid([], Text())  # inline
    path: str | None = valid(None, Text())  # file: .txt (one per line, # comments) or .json (list of strings)
    limit: int | None = valid(None, COUNT)  # keep the first N prompts

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        if c.name == "file" and not c.path:
            yield "prompts.path", "prompts=file needs prompts.path=/path/to/prompts.txt (or .json)"
        if c.name == "inline" and not c.prompts:
            yield "prompts.prompts", "prompts=inline needs prompts.prompts='[a cat,a dog]'"


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
    rewards: list[str] = valid([], OneOf(reward_options))  # held-out rewards by conf/reward name: eval_<name>
    remote_url: str | None = valid(None, Text())  # the reward server of eval.rewards=[remote] (framework.serve)

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        if ("remote" in c.rewards) != bool(c.remote_url):
            yield "eval.remote_url", "eval.rewards=[remote] needs eval.remote_url (its server), and only it reads one"


@dataclass
class MonitorConfig:
    """The probe set a fine-tuning run evaluates while it trains and the hacking rule over it
    (framework.methods.probe, framework.core.hacking).
    The noise methods need no probe: the rule runs over their per-step records (summary.json: `monitor`)."""

    every: int = valid(0, Range(0))  # optimiser steps between probe evaluations (0: no probe set); method=draft
    prompts: int = valid(4, COUNT)  # the first N prompts of the run's prompt set ...
    seeds: int = valid(2, COUNT)  # ... × N fixed seeds each (diversity needs 2 or more)
    # The share of pure-noise runs the rule may flag, simulated under the run's conditions (its evaluations, units,
    # signals and their correlation across evaluations): z is the smallest that keeps it (null: z as set below)
    false_alarms: float | None = valid(0.05, Range(0, 1, low_open=True, high_open=True))
    z: float = valid(3.0, POSITIVE)  # with false_alarms=null: standard errors a held-out signal must fall by
    patience: int = valid(2, COUNT)  # evaluations in a row the rule must hold before it flags
    stop: bool = False  # end training at the flag
    # last | best_held_out: sample the items with the adapter of the evaluation the first held-out reward scored best
    select: str = valid("last", OneOf(("last", "best_held_out")))

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        if c.every and method_kind(run.method) != "fine_tunes":
            yield "monitor.every", "a probe set is evaluated by fine-tuning methods (method=draft, method=grpo)"
        for key in ("stop", "select"):
            if c[key] not in (False, "last") and not c.every:
                yield f"monitor.{key}", "it acts on the probe set's evaluations: set monitor.every (e.g. 5)"
        if c.select == "best_held_out" and not held_out_rewards(run):
            yield "monitor.select", "best_held_out needs a held-out reward: set eval.rewards (e.g. [contrast])"


@dataclass
class Config:
    model: ModelConfig = MISSING
    reward: RewardConfig = MISSING
    method: Any = MISSING  # one of framework.config.methods.METHODS
    prompts: PromptsConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    seed: int = valid(0, Range(0, 2**31 - 1))  # item seeds derive from (seed, prompt index, sample index)
    samples_per_prompt: int = valid(1, COUNT)
    output_dir: str = valid("${hydra:runtime.output_dir}", Text())

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        """The held-out stopping rule of the noise methods, which reads three groups (method, eval, reward)."""
        if method_kind(c.method) == "optimises_noise":
            yield from held_out_relations(c)


def held_out_reward(c) -> str | None:
    """The held-out reward of a noise method's stopping rule in run config `c`: `method.held_out`, or the first of
    eval.rewards that is neither the testbed's ground-truth judge (which stays a pure measurement) nor the optimised
    reward itself (which the rule must not consult): the first of `held_out_rewards`."""
    if method_kind(c.method) != "optimises_noise":  # no stopping rule
        return None
    return c.method.held_out or next(iter(held_out_rewards(c)), None)


def held_out_rewards(c) -> list[str]:
    """The rewards of eval.rewards that can judge run `c` blind: neither the testbed's ground-truth judge (which
    stays a pure measurement) nor the optimised reward."""
    return [name for name in c.eval.rewards if name != "judge" and not same_reward(reward_config(name), c.reward)]


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
    try:
        return preset(name)
    except FrameworkError as e:
        raise FrameworkError(f"eval.rewards: {e}") from None


def same_reward(a, b) -> bool:
    """Whether reward configs `a` and `b` score with the same reward and weights (whatever their scale, dtype or
    clamping)."""
    keys = [f.name for f in fields(RewardConfig) if f.name not in ("scale", "dtype", "clamp")]
    return all(getattr(a, key) == getattr(b, key) for key in keys)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """conf/<config_name>.yaml under Hydra `overrides` as the command line composes it, validated. Hydra's own node is
    dropped and its run directory becomes `output_dir` unless an override sets that (`hydra.run.dir=...` chooses it
    as on the command line). A bad override or value raises FrameworkError, one line naming it. A Hydra the caller
    initialised (e.g. a notebook's `initialize_config_dir`) is set aside meanwhile and restored."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from framework.core.hydra_errors import check_group_lists, compose_error
    from framework.core.options import CONF_DIR
    from framework.core.validation import validate

    overrides = list(overrides)
    check_group_lists(overrides)
    callers = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
        run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    except (HydraException, OmegaConfBaseException) as e:
        raise compose_error(e) from None
    finally:
        if callers is not None:  # (Hydra's context replaced the instance on leaving)
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(callers)
    with open_dict(cfg):
        del cfg["hydra"]
        if "output_dir" in cfg and not any(o.lstrip("+").startswith("output_dir=") for o in overrides):
            cfg.output_dir = run_dir
    validate(cfg)
    return cfg


def _register_configs() -> None:
    """Hydra's ConfigStore: the root schema (which types every group) and each method's schema, which each
    conf/method/<name>.yaml starts from (`/schema/method/<name>`); `${testbed_model:}` in conf/model/shapes.yaml,
    the trained testbed shipped inside the package. Run when this module is imported (as `import framework` does), so
    Hydra's own compose API reads the package's configs with no further call."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("testbed_model", lambda: str(MODEL_DIR), replace=True)
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for name, node in METHODS.items():
        store.store(group="schema/method", name=name, node=node)


_register_configs()
