"""The full-size random-weight architectures (model=sd15_arch, sdxl_arch, sd35_arch, flux_arch, qwen_image_arch,
flux2_arch; reward=*_arch), checked on the meta device: parameter counts against the published checkpoints' and every
tensor shape of the sampler's path, without memory or compute."""

import pytest
import torch

from framework.config import ModelConfig
from framework.config.rewards import RewardConfig
from framework.models import Cond, load_backbone
from framework.rewards import build_reward

# Parameters of the released checkpoints (diffusers / transformers / open_clip counts of the published weights).
PUBLISHED_MODELS = {
    "sd": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    # SD3.5 medium: MMDiT-X "2.5 B" (Stability's count, which includes the 384² positional-embedding table, a buffer
    # in diffusers), CLIP-L with its 768² projection, SDXL's CLIP-G, the T5 v1.1 XXL encoder "4.7 B"
    "sd3": {"transformer": 2.5e9, "text_encoder": 123_060_480 + 768 * 768, "text_encoder_2": 694_659_840},
    # FLUX.1-dev: the hub's 11.9 B transformer ("12B" on the model card), CLIP-L's text tower, T5 v1.1 XXL's encoder
    "flux": {"transformer": 11.9e9, "text_encoder": 123_060_480},
}
T5_XXL_ENCODER = 4.7e9
# (published figure, its precision): the model cards' "20B" MMDiT (Qwen-Image) and "32B" transformer (FLUX.2-dev),
# the hub's counts of Qwen2.5-VL-7B-Instruct (8.29 B) and Mistral-Small-3.1-24B-Instruct (24.0 B), which the
# pipelines load whole (vision towers included)
PUBLISHED_LLM_CONDITIONED = {
    "qwen_image": {"transformer": (20e9, 1e9), "text_encoder": (8.29e9, 0.01e9)},
    "flux2": {"transformer": (32e9, 1e9), "text_encoder": (24.0e9, 0.1e9)},
}
SIDE = {"sd": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
CLIP_L, CLIP_L_TEXT = 427_616_513, 123_060_480  # openai/clip-vit-large-patch14, and its text tower
AESTHETIC_HEAD = (768 + 1) * 1024 + (1024 + 1) * 128 + (128 + 1) * 64 + (64 + 1) * 16 + (16 + 1)  # LAION's MLP
VIT_L16 = 304_326_632 - (1024 * 1000 + 1000)  # timm's vit_large_patch16_224 less its 1000-class head
BERT_BASE = 109_482_240 - (768 * 768 + 768) - 2 * 768  # bert-base-uncased less its pooler and token-type embeddings
PUBLISHED_REWARDS = {
    "hps": 986.11e6,  # open_clip's ViT-H-14 (its model table: 986.11 M)
    "pickscore": 986.11e6,  # the same ViT-H/14 as a transformers CLIPModel
    "clipscore": CLIP_L,
    # the vision tower with projection: CLIP ViT-L/14 less its text tower, text projection and logit scale
    "aesthetic": CLIP_L - CLIP_L_TEXT - 768 * 768 - 1 + AESTHETIC_HEAD,
    # BLIP's ViT-L/16 and BERT-base (2 added tokens), with a cross-attention block per layer from the 1024-wide image
    # tokens, and LAION's head on 768
    "imagereward": VIT_L16
    + BERT_BASE
    + 2 * 768
    + 12 * (2 * (768 * 768 + 768) + 2 * (1024 * 768 + 768) + 2 * 768)
    + AESTHETIC_HEAD,
    # Qwen2-VL-7B-Instruct (the hub's 8,291,375,616) without its LM head, and HPSv3's 3584 → 1024 → 16 → 2 head
    "hpsv3": 8_291_375_616 - 152_064 * 3584 + (3584 + 1) * 1024 + (1024 + 1) * 16 + (16 + 1) * 2,
}


def count(module: torch.nn.Module, buffers: bool = False) -> int:
    return sum(p.numel() for p in module.parameters()) + (sum(b.numel() for b in module.buffers()) if buffers else 0)


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3", "flux"])
def meta_backbone(request):
    with torch.device("meta"):
        backbone = load_backbone(ModelConfig(kind=request.param, random_weights=True, resolution=SIDE[request.param]))
    backbone.kind = request.param
    return backbone


def test_full_size_models_have_the_published_parameter_counts(meta_backbone):
    for name, published in PUBLISHED_MODELS[meta_backbone.kind].items():
        total = count(getattr(meta_backbone.pipe, name), buffers=name == "transformer")
        assert total == pytest.approx(published, rel=0.02 if name == "transformer" else 0.01), name
    t5 = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}.get(meta_backbone.kind)
    if t5:
        assert count(getattr(meta_backbone.pipe, t5)) == pytest.approx(T5_XXL_ENCODER, rel=0.02)


def test_full_size_models_map_shapes_through_the_sampler_path(meta_backbone):
    """Prompt encoding, a CFG-guided prediction at the native latent size and a decode to the native resolution."""
    kind, latent = meta_backbone.kind, meta_backbone.latent_shape()
    side = SIDE[kind]
    assert latent == (16 if kind in ("sd3", "flux") else 4, side // 8, side // 8)
    cond = meta_backbone.encode(["a photo of a cat", "a dog"])
    # SDXL: both encoders' hidden states, concatenated; SD3: both CLIPs' padded to T5's width, then T5's 256 tokens;
    # FLUX.1-dev: T5's 512 tokens, and no negative branch (guidance is an embedding)
    shape = {"sd": (2, 77, 768), "sdxl": (2, 77, 2048), "sd3": (2, 77 + 256, 4096), "flux": (2, 512, 4096)}[kind]
    assert cond.embeds.shape == shape
    assert cond.uncond_embeds is None if kind == "flux" else cond.uncond_embeds.shape == shape
    if kind != "sd":
        assert cond.pooled.shape == (2, {"sdxl": 1280, "sd3": 2048, "flux": 768}[kind])
    if kind == "sdxl":
        assert cond.time_ids.shape == (2, 6)
    x = torch.zeros(2, *latent, device="meta")
    pred, pred_cond = meta_backbone.predict_branches(x, 981, cond, guidance_scale=5.0)
    assert pred.shape == pred_cond.shape == x.shape
    assert meta_backbone.decode(x).shape == (2, 3, side, side)


@pytest.mark.parametrize("name", sorted(PUBLISHED_REWARDS))
def test_full_size_rewards_have_the_published_parameter_counts_and_score_images(name):
    with torch.device("meta"):
        reward = build_reward(RewardConfig(name=name, random_weights=True))
        scores = reward(torch.zeros(3, 3, 512, 512), ["a cat", "a dog", "a cat"])
    assert count(reward) == pytest.approx(PUBLISHED_REWARDS[name], rel=0.01)
    assert scores.shape == (3,)


def _image_and_gradient(**options):
    """A tiny SD sample through the checkpointed sampler and the gradient of its brightness w.r.t. x_T."""
    from framework.config.methods import DNOConfig
    from framework.methods import Item, Problem

    backbone = load_backbone(ModelConfig(kind="sd", tiny=True, resolution=32, **options))
    reward = build_reward(RewardConfig(name="brightness"))
    problem = Problem(backbone, reward, Item(0, 0, "a cat", 0), DNOConfig(num_steps=3))
    x_T, noises = problem.noise()
    x_T.requires_grad_()
    with torch.enable_grad():
        images, _ = problem.render(x_T, noises, checkpoint=True)
        problem.score(images).sum().backward()
    return backbone, images.detach(), x_T.grad


@pytest.fixture(scope="module")
def default_image_and_gradient():
    return _image_and_gradient()[1:]


@pytest.mark.parametrize(
    "option, in_effect",
    [
        ("vae_checkpointing", lambda b, on: b.vae.decoder.gradient_checkpointing == on),
        ("unet_checkpointing", lambda b, on: b.unet.is_gradient_checkpointing == on),
        ("channels_last", lambda b, on: b.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == on),
    ],
)
def test_runtime_options_take_effect_and_change_no_image_or_gradient(option, in_effect, default_image_and_gradient):
    default = getattr(ModelConfig, option)
    backbone, images, grad = _image_and_gradient(**{option: not default})
    assert in_effect(backbone, not default)
    # other kernels for the same maths (memory formats, recomputation): float32 rounding of a 3-step sample and its
    # backward through the decoder
    assert torch.allclose(images, default_image_and_gradient[0], atol=1e-5)
    assert torch.allclose(grad, default_image_and_gradient[1], atol=1e-6, rtol=1e-4)


def test_compile_traces_the_checkpointed_sampler_and_its_backward(monkeypatch, default_image_and_gradient):
    """model.compile=true through dynamo and AOTAutograd: the aot_eager backend stands in for inductor, whose C++
    build of the UNet takes minutes on a CPU (benchmarks/bench_gpu.py measures inductor itself)."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="aot_eager"))
    backbone, images, grad = _image_and_gradient(compile=True)
    assert backbone.unet._compiled_call_impl is not None
    assert torch.allclose(images, default_image_and_gradient[0], atol=1e-5)
    assert torch.allclose(grad, default_image_and_gradient[1], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_cpu_proxy_runs_a_mira_step_on_sd15_arch_with_the_hps_arch_reward(tmp_path):
    """The full-size path end to end on a CPU: SD1.5's networks at 64 px, the CLI, MIRA's loop, the VAE backward
    and the full ViT-H-14 reward (benchmarks/bench_full_size.py measures it at 10 and 50 steps)."""
    import json

    from conftest import run_cli

    args = ["model=sd15_arch", "model.resolution=64", "reward=hps_arch", "method=mira", "method.num_steps=2"]
    result = run_cli(*args, "method.opt_steps=1", "prompts.limit=1", "logger=none", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    (record_file,) = tmp_path.glob("items/*/record.json")
    record = json.loads(record_file.read_text())
    assert record["status"] == "ok" and len(record["steps"]) == 1
    step = record["steps"][0]
    assert step["grad_norm"] > 0 and step["regulariser"] == 0  # a gradient reached the noise; z = z0 at step 0
    assert record["compute"]["evals"] == 2 * 2 + 2  # the step: forward and recompute of 2 steps; the final sample


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=sd15", "model.random_weights=true"], "model.source='stable-diffusion-v1-5/stable-diffusion-v1-5' is"),
        (["model=sd15_arch", "model.tiny=true"], "model.random_weights=True is not valid; model.tiny and"),
        (["reward=pickscore", "reward.random_weights=true"], "reward.random_weights=True is not valid; it builds"),
        (["reward=jpeg", "reward.random_weights=true"], "reward.random_weights=True is not valid; only the network"),
    ],
)
def test_random_weight_configs_that_contradict_themselves_are_refused(overrides, message):
    from conftest import compose

    from framework.core.errors import FrameworkError
    from framework.core.validation import validate

    with pytest.raises(FrameworkError, match=message.replace("(", r"\(")):
        validate(compose(*overrides))


@pytest.mark.parametrize("kind", sorted(PUBLISHED_LLM_CONDITIONED))
def test_qwen_image_and_flux2_at_full_size_have_the_published_sizes_and_map_shapes(kind):
    """Parameter counts within the published figures' precision, then a guided prediction at 1024² and a decode.
    Their LLM encoders read values (masks, rotary positions) that the meta device lacks, so the prompt's encodings
    stand in as the offloaded state with the pipelines' shapes."""
    with torch.device("meta"):
        backbone = load_backbone(ModelConfig(kind=kind, random_weights=True, resolution=1024, dtype="bfloat16"))
    for name, (published, precision) in PUBLISHED_LLM_CONDITIONED[kind].items():
        assert abs(count(getattr(backbone.pipe, name)) - published) <= precision / 2, name
    width = {"qwen_image": 3584, "flux2": 3 * 5120}[kind]  # Qwen2.5-VL's last layer; three Mistral layers
    assert backbone.transformer.config.joint_attention_dim == width
    latent = backbone.latent_shape()
    assert latent == {"qwen_image": (16, 128, 128), "flux2": (128, 64, 64)}[kind]
    embeds = torch.zeros(2, 12 if kind == "qwen_image" else 512, width, device="meta", dtype=torch.bfloat16)
    cond = Cond(embeds, embeds if kind == "qwen_image" else None)
    x = torch.zeros(2, *latent, device="meta")
    pred, pred_cond = backbone.predict_branches(x, 981.0, cond, guidance_scale=4.0)
    assert pred.shape == pred_cond.shape == x.shape
    assert backbone.decode(x).shape == (2, 3, 1024, 1024)


def test_meta_memory_counts_new_storage_and_not_views_of_tensors_that_exist():
    """The accounting behind bench_full_size's memory tables: a linear layer's forward allocates its output only;
    the transposed weight it computes with (and saves for backward) is a view of the weight, which already exists."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "meta_device.py"
    spec = importlib.util.spec_from_file_location("meta_device", path)
    meta_device = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta_device)
    with torch.device("meta"):
        layer = torch.nn.Linear(1024, 4096)
        x = torch.zeros(8, 1024, requires_grad=True)
    with meta_device.TensorMemory() as memory:
        y = layer(x)
        y.view(-1)  # a view of a tensor made inside: counted once
    assert memory.peak == 8 * 4096 * 4  # float32 output; not the 16 MiB weight
