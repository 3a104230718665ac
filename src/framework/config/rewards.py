"""The reward zoo's one table. Each reward declares here, in one row, how it is built, whether gradients reach the
images through it and which weight files it reads; its options live in the one schema every reward shares
(`RewardConfig`). Validation, `build_reward`, the weight check and the docs all read this table. Importing it loads
no network: builders are named ("module:function") and imported when a reward is built. `register_reward` adds a
reward of your own (docs/extending.md)."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, OmegaConf

from framework.core.errors import FrameworkError, first_line
from framework.core.options import CONF_DIR, options
from framework.core.validation import NON_NEGATIVE, POSITIVE, OneOf, Range, Text, check_fields, valid
from framework.testbed import ENSEMBLE_SIZE, PROXY_SIZES

DTYPES = ("float32", "float16", "bfloat16")
AGGREGATES = ("mean", "wco", "uwo")  # how an ensemble combines its members' normalised scores
IMAGE_FORMATS = ("png", "tensor")  # how a remote reward's images travel
API_KEY_ENV = "REWARD_SERVER_KEY"  # the environment variable of a reward server's API key, on both sides
Weights = list[tuple[str, str, str]]  # (kind "file" | "pretrained", hub id or path, config key) of each weight


@dataclass(frozen=True)
class RewardEntry:
    """`build`: "module:function", called as function(cfg: RewardConfig, dtype) -> Reward. `differentiable`: whether
    gradients reach the images (None: `reward.differentiable` says, for a callable). `weights`: the weights a config
    reads, given the key prefix ("reward"). `network`: it has weight files (so `tiny` and `random_weights` apply).
    `bradley_terry`: its score is a Bradley–Terry utility, σ(s_A − s_B) the probability that A is preferred (GRPO's
    pairwise advantages use that probability instead of a hard win)."""

    build: str
    differentiable: bool | None = True
    weights: Callable[["RewardConfig", str], Weights] = lambda cfg, prefix: []
    network: bool = False
    bradley_terry: bool = False


@dataclass
class RewardConfig:
    name: str = valid(MISSING, OneOf(lambda: tuple(REWARDS)))
    source: str | None = valid(None, Text())  # CLIP model: hub id or local directory (aesthetic, pickscore, clipscore)
    # tokenizer: pickscore's when not `source`'s; imagereward's BERT, hpsv3's Qwen2-VL
    processor: str | None = valid(None, Text())
    # weight file: local path or owner/repo/file (aesthetic MLP, HPS, ImageReward, HPSv3)
    checkpoint: str | None = valid(None, Text())
    # hps: open_clip architecture; imagereward / hpsv3: a BlipConfig / Qwen2VLConfig JSON file (default: the
    # published architecture, shipped)
    arch: str | None = valid(None, Text())
    version: str = valid("v2.1", OneOf(("v2.0", "v2.1")))  # hps
    tiny: bool = False  # random tiny version of the same architecture, built in-process
    # the reward's published full-size network (CLIP ViT-L/14, ViT-H/14, BLIP, Qwen2-VL) with seeded random weights,
    # built in-process: speed and memory as the real reward's, scores meaningless
    random_weights: bool = False
    dtype: str = valid("float32", OneOf(DTYPES))
    jpeg_quality: int = valid(95, Range(1, 100))  # PIL's JPEG quality
    target: str | None = valid(None, Text())  # callable: "package.module:function" taking (images, prompts)
    differentiable: bool = False  # callable: whether gradients flow through `target`
    # remote: a reward server (`python -m framework.serve`), e.g. http://gpu-box:8000; the seconds a request may take,
    # how often a failed one is retried, how images travel (png: 8-bit as saved | tensor: float32, exact), at most
    # how many go in one request (0: the whole batch), and the environment variable holding the server's API key
    # (sent if set; the key itself never enters a config, run.json or W&B)
    url: str | None = valid(None, Text())
    timeout: float = valid(60.0, POSITIVE)
    retries: int = valid(2, Range(0, 10))
    image_format: str = valid("png", OneOf(IMAGE_FORMATS))
    request_batch: int = valid(0, Range(0))
    api_key_env: str = valid(API_KEY_ENV, Text())
    # proxy: the shipped testbed proxy trained on this many comparisons (reward.checkpoint: one you trained)
    comparisons: int = valid(PROXY_SIZES[0], OneOf(PROXY_SIZES))
    # proxy: member k of the shipped ensemble of 1000-comparison proxies (bootstraps; reward=proxy_ensemble)
    member: int | None = valid(None, Range(0, ENSEMBLE_SIZE - 1))
    # ensemble: its members, each a conf/reward name (tiny_hps) or a reward's options ({name: remote, url: ...});
    # each member's score is a z-score on the reference (normalise=base: the run's first `reference_images` base
    # samples; none: raw scores); aggregate: mean | wco (the lowest) | uwo (mean − uwo_lambda · variance)
    members: list[Any] = valid([], Text())
    aggregate: str = valid("mean", OneOf(AGGREGATES))
    uwo_lambda: float = valid(1.0, NON_NEGATIVE)
    normalise: str = valid("base", OneOf(("base", "none")))
    reference_images: int = valid(16, Range(2))
    # Score the images clamped to [0, 1] (true) or as decoded (false); null = the reward's own default: the toy
    # statistics read the raw decoder output as DNO does, every model-based reward, JPEG and callables clamp.
    clamp: bool | None = None
    # Multiplies the score (hps: 0.01 gives the raw cosine of DNO's code); β/γ scale with it. To minimise a
    # statistic use its opposite (darkness for brightness) or a callable.
    scale: float = valid(1.0, POSITIVE)

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
        if (c.name == "ensemble") != bool(c.members):
            yield "reward.members", "reward=ensemble needs reward.members (two or more rewards), and only it reads them"
        elif c.name == "ensemble" and len(c.members) < 2:
            yield "reward.members", "an ensemble needs two or more members"
        elif c.name == "ensemble":
            member_configs(c)  # each member valid, or one error naming it
        if c.member is not None and c.name != "proxy":
            yield "reward.member", "only reward=proxy has ensemble members"
        elif c.member is not None and c.comparisons != PROXY_SIZES[0]:
            yield "reward.member", f"the ensemble's members are proxies of {PROXY_SIZES[0]} comparisons"
        networks = [name for name, entry in REWARDS.items() if entry.network]
        if c.name == "callable" and (not c.target or c.target.count(":") != 1):
            yield "reward.target", "reward=callable needs reward.target='package.module:function'"
        if (c.name == "remote") != bool(c.url):
            yield "reward.url", "reward=remote needs reward.url (its server's address), and only it reads one"
        if c.random_weights and c.name not in networks:
            yield "reward.random_weights", f"only the network rewards ({', '.join(networks)}) have weights"
        elif c.random_weights and c.tiny:
            yield "reward.random_weights", "reward.tiny and reward.random_weights both build random weights: choose one"
        elif c.random_weights and (c.source or c.checkpoint or c.processor):
            yield (
                "reward.random_weights",
                "it builds the network in-process and reads no weights: unset reward.source, reward.processor and "
                f"reward.checkpoint (reward={c.name}_arch does)",
            )


def preset(name: str) -> RewardConfig:
    """The config of conf/reward/<name>.yaml, as `reward=<name>` composes it."""
    path = CONF_DIR / "reward" / f"{name}.yaml"
    if not path.is_file():
        raise FrameworkError(f"no reward config {name!r}; choose from: {', '.join(options('reward'))}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardConfig), OmegaConf.load(path)))


def member_configs(cfg) -> list[RewardConfig]:
    """The configs of an ensemble's members (`reward.members`), each checked as `reward=` is: one error line naming
    the member that is not a valid reward."""
    configs = []
    for k, member in enumerate(cfg.members):
        where = f"reward.members[{k}]"
        try:
            if isinstance(member, str):
                member_cfg = preset(member)
            else:
                node = OmegaConf.merge(OmegaConf.structured(RewardConfig), member)
                check_fields(f"{where}.", node, RewardConfig)
                member_cfg = OmegaConf.to_object(node)
            if member_cfg.name == "ensemble":
                raise FrameworkError("an ensemble cannot be a member of an ensemble")
            for key, why in RewardConfig.relations(member_cfg, None):
                raise FrameworkError(f"{key.replace('reward.', where + '.', 1)}: {why}")
        except FrameworkError as e:
            raise FrameworkError(f"{where}={_shown(member)!r} is not a valid reward: {e}") from None
        except Exception as e:  # OmegaConf's refusal of an unknown key or a wrongly typed value
            raise FrameworkError(f"{where}={_shown(member)!r} is not a valid reward: {first_line(e)}") from None
        configs.append(member_cfg)
    return configs


def _shown(member):
    return OmegaConf.to_container(member) if OmegaConf.is_config(member) else member


def member_labels(cfg) -> list[str]:
    """Each member's name in records (`member_<label>`): its conf/reward name, or its reward's name; a name two
    members share gets the member's index."""
    names = [m if isinstance(m, str) else m["name"] for m in cfg.members]
    return [f"{name}{k}" if names.count(name) > 1 else name for k, name in enumerate(names)]


def is_differentiable(cfg) -> bool:
    """Whether gradients reach the images through reward config `cfg`, known before the reward is built."""
    if cfg.name == "ensemble":
        return all(is_differentiable(member) for member in member_configs(cfg))
    declared = REWARDS[cfg.name].differentiable
    return cfg.differentiable if declared is None else declared


HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # hpsv2's own version map


def hps_checkpoint(cfg) -> str:
    return cfg.checkpoint or f"xswu/HPSv2/{HPS_FILES[cfg.version]}"


IMAGEREWARD_CHECKPOINT = "THUDM/ImageReward/ImageReward.pt"
IMAGEREWARD_TOKENIZER = "bert-base-uncased"  # the tokenizer ImageReward's BLIP loads


HPSV3_CHECKPOINT = "MizzenAI/HPSv3/HPSv3.safetensors"
HPSV3_TOKENIZER = "Qwen/Qwen2-VL-7B-Instruct"  # HPSv3 adds <|Reward|> to it


def _checkpoint_and_tokenizer(checkpoint: str, tokenizer: str):
    def weights(cfg, prefix: str) -> Weights:
        return [
            ("file", cfg.checkpoint or checkpoint, f"{prefix}.checkpoint"),
            ("pretrained", cfg.processor or tokenizer, f"{prefix}.processor"),
        ]

    return weights


def _pretrained(cfg, prefix: str) -> Weights:
    sources = [(cfg.source, "source"), (cfg.processor, "processor")]
    return [("pretrained", spec, f"{prefix}.{key}") for spec, key in sources if spec]


def _aesthetic_weights(cfg, prefix: str) -> Weights:
    return [("file", cfg.checkpoint or "", f"{prefix}.checkpoint"), *_pretrained(cfg, prefix)]


def _checkpoint_if_set(cfg, prefix: str) -> Weights:
    return [("file", cfg.checkpoint, f"{prefix}.checkpoint")] if cfg.checkpoint else []


def _hps_weights(cfg, prefix: str) -> Weights:
    return [("file", hps_checkpoint(cfg), f"{prefix}.checkpoint")]


BUILDERS = "framework.rewards.builders"
REWARDS: dict[str, RewardEntry] = {
    "aesthetic": RewardEntry(f"{BUILDERS}:aesthetic", weights=_aesthetic_weights, network=True),
    "hps": RewardEntry(f"{BUILDERS}:hps", weights=_hps_weights, network=True),
    "pickscore": RewardEntry(f"{BUILDERS}:pickscore", weights=_pretrained, network=True),
    "clipscore": RewardEntry(f"{BUILDERS}:clipscore", weights=_pretrained, network=True),
    "imagereward": RewardEntry(
        f"{BUILDERS}:imagereward",
        weights=_checkpoint_and_tokenizer(IMAGEREWARD_CHECKPOINT, IMAGEREWARD_TOKENIZER),
        network=True,
    ),
    "hpsv3": RewardEntry(
        f"{BUILDERS}:hpsv3", weights=_checkpoint_and_tokenizer(HPSV3_CHECKPOINT, HPSV3_TOKENIZER), network=True
    ),
    "jpeg": RewardEntry(f"{BUILDERS}:jpeg", differentiable=False),
    **{name: RewardEntry(f"{BUILDERS}:statistic") for name in ("brightness", "darkness", "contrast", "saturation")},
    "judge": RewardEntry(f"{BUILDERS}:judge"),
    "proxy": RewardEntry(f"{BUILDERS}:proxy", weights=_checkpoint_if_set, bradley_terry=True),
    "callable": RewardEntry(f"{BUILDERS}:user_callable", differentiable=None),
    "remote": RewardEntry(f"{BUILDERS}:remote", differentiable=False),
    "ensemble": RewardEntry(f"{BUILDERS}:ensemble", differentiable=None),
}


def register_reward(name: str, entry: RewardEntry) -> None:
    """Add a reward of your own (e.g. from the module your own entry point imports): `reward.name=<name>` then builds
    it with `entry.build`; a conf/reward/<name>.yaml on Hydra's search path makes it `reward=<name>`."""
    REWARDS[name] = entry


def required_weights(cfg, prefix: str) -> Weights:
    """Every weight `build_reward(cfg)` reads; none for a reward built in-process (tiny or random weights)."""
    if cfg.name == "ensemble":
        members = member_configs(cfg)
        return [w for k, m in enumerate(members) for w in required_weights(m, f"{prefix}.members[{k}]")]
    return [] if cfg.tiny or cfg.random_weights else REWARDS[cfg.name].weights(cfg, prefix)
