"""HPSv3 (Ma et al., 2025) on transformers' Qwen2-VL classes, differentiable in the image.

Qwen2-VL-7B-Instruct reads the image and HPSv3's instruction (the official text of the hpsv3 package 1.0.0: its
Visual Quality and Text Alignment criteria, the prompt inside, then "<|Reward|>", a token HPSv3 added) in Qwen2-VL's
chat format, byte for byte the text HPSv3's own code builds (tests/golden/hpsv3_prompt.json). A head (3584 → 1024
→ 16 → 2, ReLUs) maps the last hidden state at the <|Reward|> token to (μ, σ) of its uncertainty-aware ranking
loss, and the score is μ. As in HPSv3's own forward, the
language model gets sequential positions (not M-RoPE's 3-D image positions). Images are resized so that they hold
256 · 28² pixels (448 × 448 for a square; HPSv3's min_pixels = max_pixels), normalised with CLIP's statistics and
cut into Qwen2-VL's 14-px patches (each frame twice: its temporal patch of 2) with torch ops, so that gradients
reach the pixels; the official pipeline does the same resize with PIL on 8-bit images.

The published HPSv3.safetensors holds the whole reward model (under either transformers layout: `model.layers` /
`visual` before 4.52, `model.language_model` / `model.visual` after); its token embeddings have one row per token of
the tokenizer with <|Reward|>, which sets the vocabulary size here.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from framework.core.errors import FrameworkError
from framework.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Reward, load_parts

PUBLISHED_ARCHITECTURE = Path(__file__).parent / "architectures" / "qwen2-vl-7b-instruct.json"
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # HPSv3's min_pixels and max_pixels
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: E501, W291 (hpsv3 1.0.0, dataset/data_collator_qwen.py; trailing spaces included)
ASK = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
# Qwen2-VL-Instruct's chat template for one user turn of an image and a text, with the generation prompt
CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|>{image}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
)


def chat_text(prompt: str, image_tokens: int = 1) -> str:
    """The text HPSv3 scores `prompt` with: its instruction around the prompt, then the question ending in
    <|Reward|>, in Qwen2-VL's chat format, with the image's `image_tokens` placeholder tokens (1: as the chat template
    renders it, before the processor expands it to one per merged patch)."""
    return CHAT.format(image="<|image_pad|>" * image_tokens, text=INSTRUCTION.format(text_prompt=prompt) + ASK)


def resized_size(height: int, width: int, factor: int = 28, pixels: int = PIXELS) -> tuple[int, int]:
    """Qwen2-VL's smart_resize with min_pixels = max_pixels = `pixels`: multiples of `factor`, aspect kept."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def patchify(pixels: Tensor, patch: int, merge: int, temporal: int) -> Tensor:
    """[B, C, H, W] → [B · H/patch · W/patch, C · temporal · patch²] in Qwen2-VL's order (merge windows of
    `merge`² patches contiguous; each still image repeated over the temporal patch)."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // patch // merge, merge, patch, w // patch // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return x.reshape(b * (h // patch) * (w // patch), c * temporal * patch * patch)


def reward_head(width: int) -> nn.Sequential:
    """HPSv3's "ranknet" head; indices match its `rm_head.*` keys."""
    return nn.Sequential(
        nn.Linear(width, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )


class HPSv3Reward(Reward):
    def __init__(self, config: Qwen2VLConfig, tokenizer):
        super().__init__()
        self.model = Qwen2VLModel(config)
        self.head = reward_head(config.text_config.hidden_size)
        self.tokenizer = tokenizer
        self.image_token, self.reward_token = tokenizer.convert_tokens_to_ids(["<|image_pad|>", REWARD_TOKEN])
        vision = config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        height, width = resized_size(*images.shape[-2:], factor=self.patch * self.merge)
        pixels = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(OPENAI_CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD, device=images.device).view(1, 3, 1, 1)
        dtype = self.model.visual.patch_embed.proj.weight.dtype
        patches = patchify((pixels - mean) / std, self.patch, self.merge, self.temporal).to(dtype)
        # The patches' rotary positions and each image's attention span, from the grid on the CPU: left to the vision
        # tower, they would be read back from the device in every block (and could not be on the meta device).
        grid = torch.tensor([[1, height // self.patch, width // self.patch]] * len(images), device="cpu")
        spans = dict(cu_seqlens=get_vision_cu_seqlens(grid), position_ids=get_vision_position_ids(grid, self.merge))
        spans["position_ids"] = spans["position_ids"].to(images.device)
        image_tokens = self.model.visual(patches, grid_thw=grid, **spans).pooler_output  # [B · tokens, width]
        ids, at_reward = self.tokens(prompts, len(image_tokens) // len(images))
        embeds = self.model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == self.image_token)[..., None], image_tokens.to(embeds.dtype))
        # sequential positions, as HPSv3 was trained; right padding comes after every <|Reward|>, so the causal
        # attention never sees it: no mask is needed (and none is built, which would synchronise on the device)
        hidden = self.model.language_model(inputs_embeds=embeds).last_hidden_state
        hidden = hidden[torch.arange(len(ids), device=ids.device), at_reward]  # [B, width]
        return self.head(hidden.to(self.head[0].weight.dtype))[:, 0].float()

    def tokens(self, prompts: list[str], image_tokens: int) -> tuple[Tensor, Tensor]:
        """Token ids [B, L], right-padded: the chat text of each prompt with the image's tokens in place; and the
        position of each one's <|Reward|> token."""
        texts = [chat_text(p, image_tokens) for p in prompts]
        ids = torch.tensor(self.tokenizer(texts, padding=True, padding_side="right").input_ids, device="cpu")
        if ((ids == self.reward_token).sum(1) != 1).any() or ((ids == self.image_token).sum(1) != image_tokens).any():
            raise FrameworkError(
                f"a prompt must not contain {REWARD_TOKEN} or <|image_pad|> (HPSv3 scores at the one, places the "
                "image at the other)"
            )
        device = self.head[0].weight.device
        return ids.to(device), (ids == self.reward_token).int().argmax(1).to(device)

    def load_published(self, state: dict[str, Tensor]) -> "HPSv3Reward":
        """Load HPSv3.safetensors' state dict (either transformers layout; lm_head, unused by the score, ignored)."""
        parts = {"model": {}, "head": {}}
        for key, value in state.items():
            if key.startswith("rm_head."):
                parts["head"][key.removeprefix("rm_head.")] = value
            elif key.startswith(("model.language_model.", "model.visual.")):
                parts["model"][key.removeprefix("model.")] = value
            elif key.startswith("visual."):
                parts["model"][key] = value
            elif key.startswith("model."):
                parts["model"]["language_model." + key.removeprefix("model.")] = value
        load_parts(self, parts, "HPSv3")
        return self


def hpsv3_tokenizer():
    """A byte-level stand-in for Qwen2-VL's tokenizer (tiny and random-weight HPSv3): Qwen's chat and vision tokens
    and <|Reward|>, and the words of HPSv3's fixed text whole, so the token count of its instruction is realistic."""
    from framework.core.tokenizer import QWEN_CHAT, build_byte_tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    words = CHAT.format(image="", text=INSTRUCTION + ASK)
    return build_byte_tokenizer([*specials, REWARD_TOKEN], QWEN_CHAT, "<|endoftext|>", "<|im_end|>", words)


def tiny_config(tokenizer) -> Qwen2VLConfig:
    """Qwen2-VL's structure at toy size (2 vision blocks, 2 language layers, width 32), its special token ids those
    of `tokenizer`."""
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    text |= dict(vocab_size=len(tokenizer), rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2)
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[0], vision_start_token_id=ids[1],
        vision_end_token_id=ids[2],
    )  # fmt: skip


def cast(reward: HPSv3Reward, dtype: torch.dtype) -> HPSv3Reward:
    """The network in `dtype`, the head in float32 (as HPSv3 keeps it, in training and inference)."""
    reward.to(dtype).head.float()
    return reward


def vocabulary_size(state: dict[str, Tensor]) -> int:
    """The rows of the checkpoint's token embedding (HPSv3 resized it to its tokenizer with <|Reward|>)."""
    for key in ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"):
        if key in state:
            return state[key].shape[0]
    raise FrameworkError("reward.checkpoint: not an HPSv3 state dict (no token embedding)")
