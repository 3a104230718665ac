"""ImageReward (Xu et al., 2023) on transformers' BLIP classes.

The image goes through BLIP's ViT-L/16 (224 px, CLIP normalisation); the prompt (BERT wordpieces, padded to 35
tokens) through BLIP's BERT, whose every layer cross-attends to all image tokens; the [CLS] state goes through an
MLP of five affine maps (LAION's aesthetic head: the dropouts sit where activations would) and is normalised by
the training set's mean and standard deviation. Differentiable in the image.

The published `ImageReward.pt` is a plain state dict in BLIP's own key layout (`blip.visual_encoder.blocks.0.attn.
qkv.weight`, `blip.text_encoder.encoder.layer.0.crossattention.self.key.weight`, `mlp.layers.0.weight`, ...). It is
read with `torch.load(weights_only=True)` (tensors only, no code) or from a safetensors copy of it
(`python -m framework.rewards.imagereward ImageReward.pt ImageReward.safetensors`) and renamed to transformers'
layout here; the BLIP text encoder has the same names in both, the vision tower is renamed module by module.
"""

import re
import sys
from pathlib import Path

import torch
from torch import Tensor
from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from framework.core.errors import FrameworkError, first_line
from framework.rewards.base import Reward, clip_preprocess, load_parts
from framework.rewards.clip import ARCHITECTURES, aesthetic_mlp

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's normalisation of the head's output
MAX_LENGTH = 35  # prompts are padded / truncated to 35 BERT tokens
PUBLISHED_ARCHITECTURE = ARCHITECTURES / "imagereward-blip-large.json"  # ViT-L/16 at 224 px, BERT-base (+2 tokens)

# BLIP's timm-style ViT names → transformers' BlipVisionModel names (the text encoder's names are the same in both).
_VISION_NAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def tiny_config(vocab_size: int) -> BlipConfig:
    """ImageReward's structure at toy size: 32-px images, a vision width (48) unlike the text width (32), so the
    cross-attention's key/value projections must map between them as ViT-L's 1024 → BERT's 768 do."""
    vision = BlipVisionConfig(
        image_size=32, patch_size=8, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        layer_norm_eps=1e-6, initializer_range=0.02,
    )  # fmt: skip
    text = BlipTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        encoder_hidden_size=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, sep_token_id=3,
        eos_token_id=3,
    )  # fmt: skip
    return BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict())


class ImageReward(Reward):
    def __init__(self, config: BlipConfig, tokenizer):
        super().__init__()
        self.vision = BlipVisionModel(config.vision_config)
        self.text = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.head = aesthetic_mlp(config.text_config.hidden_size)
        self.tokenizer = tokenizer
        self._tokens: dict[str, tuple[Tensor, Tensor]] = {}

    def tokens(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask [B, 35], cached per prompt (tokenising is a CPU cost paid once)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._tokens]
        if missing:
            t = self.tokenizer(
                missing, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
            )
            self._tokens.update((p, (ids, mask)) for p, ids, mask in zip(missing, t.input_ids, t.attention_mask))
        device = self.head[0].weight.device
        ids, mask = (torch.stack([self._tokens[p][i] for p in prompts]).to(device) for i in (0, 1))
        return ids, mask

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        dtype = self.head[0].weight.dtype
        image_tokens = self.vision(pixel_values=clip_preprocess(images, self.vision.config.image_size).to(dtype))
        ids, mask = self.tokens(prompts)
        # BERT's additive padding mask, built here: left to transformers, it checks on the device whether there is
        # any padding (a synchronisation per call, and impossible on the meta device of the memory benchmarks).
        padding = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        # No mask for the cross-attention: every image token is attended to.
        text = self.text(input_ids=ids, attention_mask=padding, encoder_hidden_states=image_tokens.last_hidden_state)
        return (self.head(text.last_hidden_state[:, 0]).squeeze(-1).float() - MEAN) / STD

    def load_published(self, state: dict[str, Tensor]) -> "ImageReward":
        """Load a state dict in ImageReward.pt's layout; every weight the score uses must be there (the projections
        of BLIP's contrastive pre-training and the text pooler, unused by the score, are ignored)."""
        parts = {"vision": {}, "text": {}, "head": {}}
        for key, value in state.items():
            if key.startswith("blip.visual_encoder."):
                name = key.removeprefix("blip.visual_encoder.")
                for pattern, replacement in _VISION_NAMES:
                    name = re.sub(pattern, replacement, name)
                parts["vision"][name] = value
            elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids") and ".pooler." not in key:
                parts["text"][key.removeprefix("blip.text_encoder.")] = value
            elif key.startswith("mlp.layers."):
                parts["head"][key.removeprefix("mlp.layers.")] = value
        load_parts(self, parts, "ImageReward")
        return self


def convert(source: Path, target: Path) -> None:
    """Write ImageReward.pt's tensors to a safetensors file (same keys), reading it without unpickling code; a file
    that is not ImageReward.pt, or a target that cannot be written, is one error line."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from framework.core.atomic import replaced

    try:
        state = torch.load(source, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        raise FrameworkError(f"cannot read '{source}' with torch.load(weights_only=True): {first_line(e)}") from None
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, Tensor)} if isinstance(state, dict) else {}
    if not any(str(key).startswith("blip.") for key in tensors):
        raise FrameworkError(f"'{source}' is not ImageReward.pt: it holds no blip.* weights")
    if not target.parent.is_dir():
        raise FrameworkError(f"cannot write '{target}': its directory does not exist")
    with replaced(target) as tmp:
        save_file(tensors, tmp)


def main() -> None:
    from framework.core.errors import ArgumentParser, guarded, process_error_log

    parser = ArgumentParser(prog="python -m framework.rewards.imagereward", description=convert.__doc__.split(";")[0])
    parser.add_argument("source", type=Path, help="ImageReward.pt")
    parser.add_argument("target", type=Path, help="the safetensors file to write, e.g. ImageReward.safetensors")
    args = parser.parse_args()
    code, _ = guarded(lambda: convert(args.source, args.target), process_error_log())
    if code == 0:
        print(f"wrote {args.target}")
    sys.exit(code)


if __name__ == "__main__":
    main()
