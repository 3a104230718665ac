import pytest
import torch
from conftest import noise_like

from framework.config import ModelConfig
from framework.core.errors import FrameworkError
from framework.core.tokenizer import build_clip_tokenizer
from framework.models import load_backbone
from framework.models.sampling import sample


def images_of(backbone, seed=0):
    x_T = noise_like((2, *backbone.latent_shape()), seed)
    with torch.no_grad():
        cond = backbone.encode(["a red circle", "a photo of a dog"])
        return backbone.decode(sample(backbone, cond, x_T, num_steps=4, guidance_scale=5.0).latents)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_save_pretrained_then_model_source_dir_gives_the_same_images(kind, tmp_path, tiny_sd, tiny_sdxl):
    in_memory = {"sd": tiny_sd, "sdxl": tiny_sdxl}[kind]
    in_memory.pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    loaded = load_backbone(ModelConfig(kind=kind, source=str(tmp_path / "pipe"), resolution=64))
    assert loaded.unet is not in_memory.unet
    assert loaded.is_sdxl == (kind == "sdxl")
    torch.testing.assert_close(images_of(loaded), images_of(in_memory), rtol=0, atol=1e-6)


def test_images_depend_on_prompt_and_noise(tiny_backbone):
    a, b = images_of(tiny_backbone, seed=0), images_of(tiny_backbone, seed=1)
    assert (a - b).abs().max() > 1e-3
    assert (a[0] - a[1]).abs().max() > 1e-4  # rows of a batch stay distinct


def test_sdxl_conditioning_has_pooled_embeds_and_time_ids(tiny_sdxl):
    cond = tiny_sdxl.encode(["a cat", "a dog"])
    assert cond.pooled.shape == (2, 32) and cond.time_ids.shape == (2, 6)
    assert cond.time_ids[0].tolist() == [64, 64, 0, 0, 64, 64]
    assert torch.count_nonzero(cond.uncond_embeds) == 0  # SDXL: force_zeros_for_empty_prompt, as diffusers does
    assert cond.select([0, 0, 1]).embeds.shape[0] == 3 and torch.equal(cond.select([1, 1]).embeds[1], cond.embeds[1])


def test_missing_local_directory_is_one_clear_error(tmp_path):
    with pytest.raises(FrameworkError, match=r"model\.source: directory '.*nope' not found"):
        load_backbone(ModelConfig(kind="sd", source=str(tmp_path / "nope")))


def test_hub_id_not_in_cache_says_how_to_provide_it():
    with pytest.raises(
        FrameworkError,
        match=r"'CompVis/stable-diffusion-v1-4' are not in the local Hugging Face "
        r"cache.*model\.source to a local path",
    ):
        load_backbone(ModelConfig(kind="sd", source="CompVis/stable-diffusion-v1-4"))


def test_directory_missing_a_weight_file_names_the_problem(tmp_path, tiny_sd):
    tiny_sd.pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FrameworkError, match=r"model\.source: cannot load '.*pipe'"):
        load_backbone(ModelConfig(kind="sd", source=str(tmp_path / "pipe")))


def test_rebuilt_tokenizer_gives_real_clip_token_ids():
    import open_clip

    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    # Known ids of OpenAI CLIP: <start>=49406, "a"=320, "cat"=2368, <end>=49407.
    assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    reference = open_clip.get_tokenizer("ViT-H-14")
    for text in ["a red circle and a blue square", "An astronaut, riding a horse! 42"]:
        ids = tokenizer(text).input_ids
        assert reference([text])[0][: len(ids)].tolist() == ids


def test_every_family_row_names_what_exists_and_its_adapter_layers_match_the_denoiser():
    """The families' table is the one place of their facts: each row's pipeline is a diffusers class, its backbone
    and tiny builder import, its full-size architecture ships exactly when it names one, and its LoRA targets match
    layers of the denoiser its tiny pipeline builds (the flow families' regex and the UNet's names alike)."""
    import re

    import diffusers

    from framework.config.families import FAMILIES
    from framework.core.options import resolve
    from framework.models import Backbone, build_tiny
    from framework.models.full_size import ARCHITECTURES

    shipped = {p.name for p in ARCHITECTURES.iterdir() if p.is_dir()}
    assert shipped == {f.architecture for f in FAMILIES.values() if f.architecture}
    for kind, family in FAMILIES.items():
        assert hasattr(diffusers, family.pipeline), kind
        assert issubclass(resolve(family.backbone), Backbone), kind
        assert (family.full_size is None) == (family.architecture is None), kind
        assert family.flow_matching == (family.max_text_tokens is not None), kind
        if kind in ("sd", "sd3", "qwen_image"):  # one of each kind of target list (the others share them)
            pipe = build_tiny(kind, 32)
            names = [n for n, m in (pipe.unet if kind == "sd" else pipe.transformer).named_modules()]
            targets = family.lora_targets
            if isinstance(targets, str):
                hits = [n for n in names if re.fullmatch(targets, n)]
            else:
                hits = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
            assert len(hits) >= 6, (kind, hits)
