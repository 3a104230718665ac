"""How each reward of the registry (framework.config.rewards) is built from its config: real weights from local
paths or the Hugging Face cache (never downloaded), or a tiny or full-size network with random weights."""

from framework.config.rewards import (
    HPSV3_CHECKPOINT,
    HPSV3_TOKENIZER,
    IMAGEREWARD_CHECKPOINT,
    IMAGEREWARD_TOKENIZER,
    RewardConfig,
    hps_checkpoint,
)
from framework.core.errors import FrameworkError, first_line
from framework.rewards.base import Reward


def _weight_file(cfg: RewardConfig, default: str | None = None):
    from framework.core.weights import resolve_file

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
        raise FrameworkError(
            f"reward.checkpoint: cannot load '{path}' (safetensors or torch.load with weights_only=True): "
            f"{first_line(e)}"
        ) from e


def _state_dict(path):
    import torch
    from safetensors.torch import load_file

    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True, map_location="cpu")


def _random_clip(cfg: RewardConfig):
    """The CLIP architecture of a random-weight reward config, None for one that reads weights."""
    from framework.rewards.clip import random_clip_config

    return random_clip_config(cfg.name, cfg.tiny) if cfg.tiny or cfg.random_weights else None


def aesthetic(cfg: RewardConfig, dtype) -> Reward:
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


def _clip_similarity(cfg: RewardConfig, dtype, cos_scale: float | None) -> Reward:
    from framework.rewards.clip import CLIPSimilarity, load_clip, load_tokenizer

    key = "reward.processor" if cfg.processor else "reward.source"
    random = _random_clip(cfg)
    tokenizer = load_tokenizer(cfg.processor or cfg.source, random is not None, key=key)
    return CLIPSimilarity(load_clip(cfg.source, dtype, random=random), tokenizer, cos_scale)


def pickscore(cfg: RewardConfig, dtype) -> Reward:
    return _clip_similarity(cfg, dtype, cos_scale=None)  # logit_scale.exp() · cos


def clipscore(cfg: RewardConfig, dtype) -> Reward:
    return _clip_similarity(cfg, dtype, cos_scale=100.0)


def hps(cfg: RewardConfig, dtype) -> Reward:
    from framework.rewards.hps import TINY_ARCH, load_hps

    if cfg.tiny or cfg.random_weights:
        return load_hps(TINY_ARCH if cfg.tiny else cfg.arch or "ViT-H-14", None, dtype)
    path = _weight_file(cfg, default=hps_checkpoint(cfg))
    return _load_checkpoint(path, lambda p: load_hps(cfg.arch or "ViT-H-14", p, dtype))


def imagereward(cfg: RewardConfig, dtype) -> Reward:
    import torch
    from transformers import AutoTokenizer, BlipConfig

    from framework.core.tokenizer import build_bert_tokenizer
    from framework.core.weights import load_pretrained
    from framework.rewards.imagereward import PUBLISHED_ARCHITECTURE, ImageReward, tiny_config

    if cfg.tiny or cfg.random_weights:
        tokenizer = build_bert_tokenizer("a photo of the cat dog red blue green circle square")
        config = tiny_config(len(tokenizer)) if cfg.tiny else BlipConfig.from_json_file(PUBLISHED_ARCHITECTURE)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            reward = ImageReward(config, tokenizer)
            for layer in reward.head:  # variance-preserving, so scores differ visibly between images and prompts
                if isinstance(layer, torch.nn.Linear):
                    torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
        return reward.to(dtype)
    # The weight file first: it is the part users most often lack.
    state = _load_checkpoint(_weight_file(cfg, default=IMAGEREWARD_CHECKPOINT), _state_dict)
    tokenizer = load_pretrained(AutoTokenizer, cfg.processor or IMAGEREWARD_TOKENIZER, key="reward.processor")
    try:
        config = BlipConfig.from_json_file(cfg.arch or PUBLISHED_ARCHITECTURE)
    except (OSError, ValueError) as e:
        raise FrameworkError(f"reward.arch: cannot read a BlipConfig JSON file from '{cfg.arch}': {first_line(e)}")
    return ImageReward(config, tokenizer).load_published(state).to(dtype)


def hpsv3(cfg: RewardConfig, dtype) -> Reward:
    import torch
    from transformers import AutoTokenizer, Qwen2VLConfig
    from transformers.initialization import no_init_weights

    from framework.core.weights import load_pretrained
    from framework.rewards import hpsv3 as h

    if cfg.tiny or cfg.random_weights:
        tokenizer = h.hpsv3_tokenizer()
        config = h.tiny_config(tokenizer) if cfg.tiny else Qwen2VLConfig.from_json_file(h.PUBLISHED_ARCHITECTURE)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            reward = h.HPSv3Reward(config, tokenizer)
        return h.cast(reward, dtype)
    state = _load_checkpoint(_weight_file(cfg, default=HPSV3_CHECKPOINT), _state_dict)
    tokenizer = load_pretrained(AutoTokenizer, cfg.processor or HPSV3_TOKENIZER, key="reward.processor")
    if h.REWARD_TOKEN not in tokenizer.get_vocab():  # HPSv3 added it to Qwen2-VL's tokenizer
        tokenizer.add_special_tokens({"additional_special_tokens": [h.REWARD_TOKEN]})
    try:
        config = Qwen2VLConfig.from_json_file(cfg.arch or h.PUBLISHED_ARCHITECTURE)
    except (OSError, ValueError) as e:
        raise FrameworkError(f"reward.arch: cannot read a Qwen2VLConfig JSON file from '{cfg.arch}': {first_line(e)}")
    config.text_config.vocab_size = h.vocabulary_size(state)
    if len(tokenizer) > config.text_config.vocab_size:
        raise FrameworkError(f"reward.processor: its {len(tokenizer)} tokens do not fit HPSv3's embedding")
    with no_init_weights():  # every weight comes from the checkpoint (7 B parameters: no random draw to pay for)
        reward = h.HPSv3Reward(config, tokenizer)
    return h.cast(reward.load_published(state), dtype)


def jpeg(cfg: RewardConfig, dtype) -> Reward:
    from framework.rewards.simple import JpegCompressibility

    return JpegCompressibility(cfg.jpeg_quality)


def statistic(cfg: RewardConfig, dtype) -> Reward:
    from framework.rewards.simple import ImageStatistic

    return ImageStatistic(cfg.name)


def judge(cfg: RewardConfig, dtype) -> Reward:
    from framework.rewards.judge import JudgeReward
    from framework.testbed.judge import load_judge

    return JudgeReward(load_judge()).to(dtype)


def proxy(cfg: RewardConfig, dtype) -> Reward:
    from framework.rewards.proxy import load_proxy
    from framework.testbed import proxy_file

    return load_proxy(_weight_file(cfg) if cfg.checkpoint else proxy_file(cfg.comparisons, cfg.member)).to(dtype)


def ensemble(cfg: RewardConfig, dtype) -> Reward:
    from framework.config.rewards import member_configs, member_labels
    from framework.rewards import build_reward
    from framework.rewards.ensemble import EnsembleReward

    members = dict(zip(member_labels(cfg), map(build_reward, member_configs(cfg))))
    return EnsembleReward(members, cfg.aggregate, cfg.uwo_lambda)


def remote(cfg: RewardConfig, dtype) -> Reward:
    from framework.rewards.remote import RemoteReward

    return RemoteReward(cfg.url, cfg.timeout, cfg.retries, cfg.image_format, cfg.request_batch, cfg.api_key_env)


def user_callable(cfg: RewardConfig, dtype) -> Reward:
    from framework.rewards.simple import CallableReward

    try:
        return CallableReward(cfg.target)
    except (ImportError, AttributeError, ValueError) as e:
        raise FrameworkError(f"reward.target={cfg.target!r} cannot be imported as 'package.module:function': {e}")
