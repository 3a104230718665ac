"""Reward zoo: every reward of the registry (framework.config.rewards) built from its config."""

from framework.config.rewards import REWARDS, RewardConfig, is_differentiable
from framework.core.errors import FrameworkError
from framework.core.options import resolve
from framework.rewards.base import Reward, clip_preprocess

__all__ = ["Reward", "build_reward", "clip_preprocess", "load_named_reward"]


def build_reward(cfg: RewardConfig) -> Reward:
    """The reward of a (validated) reward config: built by its registry entry, frozen, with the registry's word on
    whether it is differentiable."""
    import torch

    reward = resolve(REWARDS[cfg.name].build)(cfg, getattr(torch, cfg.dtype))
    reward.name, reward.scale, reward.differentiable = cfg.name, cfg.scale, is_differentiable(cfg)
    if cfg.clamp is not None:
        reward.clamp = cfg.clamp
    return reward.requires_grad_(False).eval()


def load_named_reward(name: str, **overrides) -> Reward:
    """The reward of conf/reward/<name>.yaml (a held-out evaluation reward), with `overrides` of its keys."""
    from dataclasses import replace

    from framework.config import reward_config

    try:
        return build_reward(replace(reward_config(name), **overrides))
    except FrameworkError as e:
        raise FrameworkError(f"eval.rewards={name} (conf/reward/{name}.yaml): {e}") from None
