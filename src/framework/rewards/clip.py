"""Rewards on Hugging Face CLIP models: LAION aesthetic, CLIPScore, PickScore."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

from framework.core.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer
from framework.rewards.base import Reward, clip_preprocess

TINY_CLIP = dict(
    text_config=dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
    vision_config=dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    ),
    projection_dim=24,  # not the width: a reward reading the unprojected embedding fails (as with ViT-L/14: 1024 → 768)
)


def tiny_clip_config() -> CLIPConfig:
    """A CLIP with ViT-L/14's structure at toy size (32-px images, width 32, projection 24): same code path."""
    return CLIPConfig(**TINY_CLIP)


class CLIPSimilarity(Reward):
    """`cos_scale · cos(image, text)` on a CLIPModel; text embeddings are cached per prompt (they never change)."""

    def __init__(self, model: CLIPModel, tokenizer, cos_scale: float | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.cos_scale = cos_scale  # None: the model's own logit_scale.exp() (PickScore)
        self._text_cache: dict[str, Tensor] = {}

    def image_embeds(self, images: Tensor) -> Tensor:
        pixels = clip_preprocess(images, self.model.config.vision_config.image_size).to(self.model.dtype)
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tokens = self.tokenizer(
                missing,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
                max_length=self.model.config.text_config.max_position_embeddings,
            )
            # Only the ids: CLIP's text attention is causal and pools at the first end token, which sees no padding,
            # so the padding mask changes nothing (and checking it would read a value back from the device).
            ids = tokens.input_ids.to(self.model.device)
            feats = self.model.get_text_features(input_ids=ids).pooler_output.float()
            self._text_cache.update(zip(missing, F.normalize(feats, dim=-1)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        scale = self.model.logit_scale.exp().float() if self.cos_scale is None else self.cos_scale
        return scale * (self.image_embeds(images) * self.text_embeds(prompts).to(images.device)).sum(-1)

    def _apply(self, fn, recurse=True):  # moving devices invalidates the cached text embeddings
        self._text_cache.clear()
        return super()._apply(fn, recurse)


def aesthetic_mlp(in_features: int) -> nn.Sequential:
    """LAION improved-aesthetic-predictor head; indices match the keys of `sac+logos+ava1-l14-linearMSE.pth`
    (layers.0, .2, .4, .6, .7; dropouts are inert at eval)."""
    return nn.Sequential(
        nn.Linear(in_features, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class AestheticReward(Reward):
    """LAION aesthetic score: MLP on the L2-normalised CLIP image embedding (ViT-L/14 for the real weights)."""

    def __init__(self, vision: CLIPVisionModelWithProjection, mlp_state: dict[str, Tensor]):
        super().__init__()
        self.vision = vision
        self.layers = aesthetic_mlp(mlp_state["layers.0.weight"].shape[1])
        self.layers.load_state_dict({k.removeprefix("layers."): v for k, v in mlp_state.items()})

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = clip_preprocess(images, self.vision.config.image_size).to(self.vision.dtype)
        embeds = F.normalize(self.vision(pixel_values=pixels).image_embeds.float(), dim=-1)
        return self.layers(embeds.to(self.layers[0].weight.dtype)).squeeze(-1).float()


ARCHITECTURES = Path(__file__).parent / "architectures"
# Each reward's published CLIP (HF CLIPConfig files shipped with the package): openai/clip-vit-large-patch14 under
# the LAION aesthetic head and CLIPScore; laion/CLIP-ViT-H-14-laion2B-s32B-b79K, which PickScore_v1 fine-tunes.
PUBLISHED_CLIP = {
    "aesthetic": "clip-vit-large-patch14",
    "clipscore": "clip-vit-large-patch14",
    "pickscore": "clip-vit-huge-patch14",
}


def load_clip(source: str | None, dtype: torch.dtype, vision_only: bool = False, random: CLIPConfig | None = None):
    """CLIPModel, or only its vision tower with projection; `random`: that architecture with seeded random weights
    instead of `source`'s. The projection width lives in the top-level CLIPConfig; the vision sub-config's own
    `projection_dim` is a default (512) that would silently re-initialise the projection of ViT-L/14 (768), so it
    is copied over before loading."""
    from framework.core.weights import load_pretrained

    config = random or load_pretrained(CLIPConfig, source, key="reward.source")
    config.vision_config.projection_dim = config.projection_dim
    if random is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return (CLIPVisionModelWithProjection(config.vision_config) if vision_only else CLIPModel(config)).to(dtype)
    cls, config = (CLIPVisionModelWithProjection, config.vision_config) if vision_only else (CLIPModel, config)
    return load_pretrained(cls, source, key="reward.source", config=config, dtype=dtype)


def random_clip_config(name: str, tiny: bool) -> CLIPConfig | None:
    """The CLIP architecture a random-weight reward `name` builds: the tiny one, or its published one."""
    return tiny_clip_config() if tiny else CLIPConfig.from_json_file(ARCHITECTURES / f"{PUBLISHED_CLIP[name]}.json")


def load_tokenizer(source: str | None, built: bool, key: str):
    """The tokenizer of `source`, or (`built`: a random-weight reward) the CLIP tokenizer built offline."""
    from framework.core.weights import load_pretrained

    return build_clip_tokenizer() if built else load_pretrained(AutoTokenizer, source, key=key)
