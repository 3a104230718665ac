"""The reward zoo's one table. Each reward declares here, in one row, how it is built, whether gradients reach the
images through it and which weight files it reads; its options live in the one schema every reward shares
(`RewardConfig`). Validation, `build_reward`, the weight check and the docs all read this table. Importing it loads
no network: builders are named ("module:function") and imported when a reward is built. `register_reward` adds a
reward of your own (docs/extending.md)."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from omegaconf import MISSING

from framework.core.validation import POSITIVE, OneOf, Range, Text, valid
from framework.testbed import PROXY_SIZES

DTYPES = ("float32", "float16", "bfloat16")
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
    # Score the images clamped to [0, 1] (true) or as decoded (false); null = the reward's own default: the toy
    # statistics read the raw decoder output as DNO does, every model-based reward, JPEG and callables clamp.
    clamp: bool | None = None
    # Multiplies the score (hps: 0.01 gives the raw cosine of DNO's code); β/γ scale with it. To minimise a
    # statistic use its opposite (darkness for brightness) or a callable.
    scale: float = valid(1.0, POSITIVE)

    @staticmethod
    def relations(c, run) -> Iterator[tuple[str, str]]:
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


def is_differentiable(cfg) -> bool:
    """Whether gradients reach the images through reward config `cfg`, known before the reward is built."""
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
}


def register_reward(name: str, entry: RewardEntry) -> None:
    """Add a reward of your own (e.g. from the module your own entry point imports): `reward.name=<name>` then builds
    it with `entry.build`; a conf/reward/<name>.yaml on Hydra's search path makes it `reward=<name>`."""
    REWARDS[name] = entry


def required_weights(cfg, prefix: str) -> Weights:
    """Every weight `build_reward(cfg)` reads; none for a reward built in-process (tiny or random weights)."""
    return [] if cfg.tiny or cfg.random_weights else REWARDS[cfg.name].weights(cfg, prefix)
