"""Reward zoo: build any reward from its config (real weights from local paths or the HF cache, or tiny)."""

from framework.config import RewardConfig, reward_config
from framework.errors import FrameworkError
from framework.rewards.base import Reward, clip_preprocess
from framework.rewards.simple import CallableReward, ImageStatistic, JpegCompressibility

__all__ = ["Reward", "build_reward", "clip_preprocess"]


def _weight_file(cfg: RewardConfig, default: str | None = None):
    from framework.weights import resolve_file

    spec = cfg.checkpoint or default
    if spec is None:
        raise FrameworkError(f"reward.checkpoint is not set: reward {cfg.name} needs its weight file")
    return resolve_file(spec, key="reward.checkpoint")


def _load_checkpoint(path, load):
    """Run `load(path)`; a file that is corrupt, or that needs unsafe unpickling, becomes one clear error."""
    import pickle

    try:
        return load(path)
    except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FrameworkError(
            f"reward.checkpoint: cannot load '{path}' (safetensors or torch.load with weights_only=True): {first_line}"
        ) from e


def _state_dict(path):
    import torch
    from safetensors.torch import load_file

    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True, map_location="cpu")


def _random_clip(cfg: RewardConfig):
    """The CLIP architecture of a random-weight reward config, None for one that reads weights."""
    from framework.rewards.clip import random_clip_config

    return random_clip_config(cfg.name, cfg.tiny) if cfg.tiny or cfg.random_weights else None


def _aesthetic(cfg: RewardConfig, dtype) -> Reward:
    import torch

    from framework.rewards.clip import AestheticReward, aesthetic_mlp, load_clip

    random = _random_clip(cfg)
    # The MLP file first: it is the part users most often lack.
    state = None if random else _load_checkpoint(_weight_file(cfg), _state_dict)
    vision = load_clip(cfg.source, dtype, vision_only=True, random=random)
    if random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = {f"layers.{k}": v for k, v in aesthetic_mlp(vision.config.projection_dim).state_dict().items()}
    return AestheticReward(vision, state).to(dtype)


def _clip_similarity(cos_scale):
    def build(cfg: RewardConfig, dtype) -> Reward:
        from framework.rewards.clip import CLIPSimilarity, load_clip, load_tokenizer

        key = "reward.processor" if cfg.processor else "reward.source"
        random = _random_clip(cfg)
        tokenizer = load_tokenizer(cfg.processor or cfg.source, random is not None, key=key)
        return CLIPSimilarity(load_clip(cfg.source, dtype, random=random), tokenizer, cos_scale)

    return build


def _hps_checkpoint(cfg: RewardConfig) -> str:
    return cfg.checkpoint or f"xswu/HPSv2/HPS_{cfg.version}_compressed.pt"


def _hps(cfg: RewardConfig, dtype) -> Reward:
    from framework.rewards.hps import TINY_ARCH, load_hps

    if cfg.tiny or cfg.random_weights:
        return load_hps(TINY_ARCH if cfg.tiny else cfg.arch or "ViT-H-14", None, dtype)
    path = _weight_file(cfg, default=_hps_checkpoint(cfg))
    return _load_checkpoint(path, lambda p: load_hps(cfg.arch or "ViT-H-14", p, dtype))


def _judge(cfg: RewardConfig, dtype) -> Reward:
    from framework.rewards.judge import JudgeReward
    from framework.testbed.judge import load_judge

    return JudgeReward(load_judge()).to(dtype)


def _callable(cfg: RewardConfig, dtype) -> Reward:
    try:
        return CallableReward(cfg.target, cfg.differentiable)
    except (ImportError, AttributeError, ValueError) as e:
        raise FrameworkError(f"reward.target={cfg.target!r} cannot be imported as 'package.module:function': {e}")


BUILDERS = {
    "aesthetic": _aesthetic,
    "hps": _hps,
    "pickscore": _clip_similarity(cos_scale=None),  # logit_scale.exp() · cos
    "clipscore": _clip_similarity(cos_scale=100.0),
    "jpeg": lambda cfg, dtype: JpegCompressibility(cfg.jpeg_quality),
    **{name: (lambda cfg, dtype, name=name: ImageStatistic(name)) for name in ImageStatistic.STATISTICS},
    "judge": _judge,
    "callable": _callable,
}


def build_reward(cfg: RewardConfig) -> Reward:
    from framework.models import DTYPES

    reward = BUILDERS[cfg.name](cfg, DTYPES[cfg.dtype])
    reward.name, reward.scale = cfg.name, cfg.scale
    if cfg.clamp is not None:
        reward.clamp = cfg.clamp
    return reward.requires_grad_(False).eval()


def required_weights(cfg: RewardConfig, prefix: str) -> list[tuple[str, str, str]]:
    """(kind, spec, config key) of every weight `build_reward(cfg)` reads: kind "file" (a weight file) or
    "pretrained" (a save_pretrained directory or hub id)."""
    if cfg.tiny or cfg.random_weights:
        return []
    pretrained = [("pretrained", cfg.source, f"{prefix}.source")] if cfg.source else []
    if cfg.name == "aesthetic":
        return [("file", cfg.checkpoint or "", f"{prefix}.checkpoint"), *pretrained]
    if cfg.name == "hps":
        return [("file", _hps_checkpoint(cfg), f"{prefix}.checkpoint")]
    if cfg.name in ("pickscore", "clipscore"):
        return pretrained + ([("pretrained", cfg.processor, f"{prefix}.processor")] if cfg.processor else [])
    return []


def load_named_reward(name: str) -> Reward:
    try:
        return build_reward(reward_config(name))
    except FrameworkError as e:
        raise FrameworkError(f"eval.rewards={name} (conf/reward/{name}.yaml): {e}") from None
