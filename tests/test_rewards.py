"""Each real loader on a tiny checkpoint written in the real file format, checked against an independent score."""

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import noise_like, run_cli
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

from framework.config.rewards import RewardConfig
from framework.core.errors import FrameworkError
from framework.core.tokenizer import build_clip_tokenizer
from framework.rewards import build_reward, clip_preprocess
from framework.rewards.hps import TINY_ARCH

GOLDEN_DIR = Path(__file__).parent / "golden"

PROMPTS = ["a cat", "a red circle"]


@pytest.fixture
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()


def assert_differentiable(scores, images):
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_aesthetic_loads_laion_mlp_state_dict(clip_dir, tmp_path, images):
    torch.manual_seed(4)
    shapes = {0: (1024, 24), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}  # LAION's keys; 24 = projection
    state = {}
    for i, shape in shapes.items():
        state[f"layers.{i}.weight"] = torch.randn(shape) / shape[1] ** 0.5
        state[f"layers.{i}.bias"] = torch.randn(shape[0])
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = build_reward(
        RewardConfig(
            name="aesthetic", source=str(clip_dir), checkpoint=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
        )
    )
    scores = reward(images, PROMPTS)
    # Independent: the vision tower's pooled output through the visual projection (width 32 → 24), normalised, then
    # the five affine maps of the state dict, no activations.
    clip = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=clip_preprocess(images, 32)).pooler_output
        assert pooled.shape[-1] == 32 and clip.config.projection_dim == 24
        h = F.normalize(clip.visual_projection(pooled), dim=-1)
        for i in shapes:
            h = F.linear(h, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
    torch.testing.assert_close(scores.detach(), h.squeeze(-1), rtol=1e-4, atol=1e-5)
    assert_differentiable(scores, images)


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_clip_similarity_rewards_load_hf_directories(name, clip_dir, tmp_path, images):
    processor_dir = tmp_path / "processor"
    build_clip_tokenizer().save_pretrained(processor_dir)
    reward = build_reward(RewardConfig(name=name, source=str(clip_dir), processor=str(processor_dir)))
    scores = reward(images, PROMPTS)
    # Independent: the model's own forward gives logits_per_image = logit_scale.exp() · cos.
    clip = CLIPModel.from_pretrained(clip_dir)
    tokens = build_clip_tokenizer()(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = clip(**tokens, pixel_values=clip_preprocess(images, 32)).logits_per_image.diagonal()
    expected = logits if name == "pickscore" else 100 * logits / clip.logit_scale.exp()
    torch.testing.assert_close(scores.detach(), expected, rtol=1e-4, atol=1e-4)
    assert_differentiable(scores, images)


def test_hps_loads_state_dict_checkpoint_through_open_clip(tmp_path, images):
    torch.manual_seed(5)
    model = open_clip.create_model(TINY_ARCH)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "HPS_tiny.pt")
    reward = build_reward(RewardConfig(name="hps", arch=TINY_ARCH, checkpoint=str(tmp_path / "HPS_tiny.pt")))
    scores = reward(images, PROMPTS)
    with torch.no_grad():  # Independent: open_clip's forward returns normalised features.
        tokens = open_clip.get_tokenizer(TINY_ARCH)(PROMPTS)
        image_features, text_features, _ = model(clip_preprocess(images, 32), tokens)
    torch.testing.assert_close(scores.detach(), 100 * (image_features * text_features).sum(-1), rtol=1e-4, atol=1e-4)
    assert_differentiable(scores, images)


def _imagereward_reference(state, images, tokens, heads):
    """ImageReward's score computed from its published key layout by hand: BLIP's pre-norm ViT (LayerNorm ε 1e-6,
    exact GELU), BERT's post-norm layers (ε 1e-12) each attending to the prompt under its padding mask and then to
    every image token, the [CLS] state through the five affine maps, normalised by (0.16717…, 1.03334…)."""

    def attention(x, context, weights, n_heads, mask=None):
        (wq, bq), (wk, bk), (wv, bv) = weights
        split = lambda t: t.unflatten(-1, (n_heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(F.linear(x, wq, bq)), split(F.linear(context, wk, bk)), split(F.linear(context, wv, bv))
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
        return (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)

    w = lambda prefix: (state[f"{prefix}.weight"], state[f"{prefix}.bias"])  # noqa: E731
    norm = lambda x, prefix, eps: F.layer_norm(x, x.shape[-1:], *w(prefix), eps=eps)  # noqa: E731
    v = "blip.visual_encoder"
    x = F.conv2d(clip_preprocess(images, 32), *w(f"{v}.patch_embed.proj"), stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([state[f"{v}.cls_token"].expand(len(x), -1, -1), x], 1) + state[f"{v}.pos_embed"]
    for i in range(2):
        b = f"{v}.blocks.{i}"
        h = norm(x, f"{b}.norm1", 1e-6)
        qkv = w(f"{b}.attn.qkv")
        x = x + F.linear(attention(h, h, [(qkv[0].chunk(3)[j], qkv[1].chunk(3)[j]) for j in range(3)], heads[0]),
                         *w(f"{b}.attn.proj"))  # fmt: skip
        x = x + F.linear(F.gelu(F.linear(norm(x, f"{b}.norm2", 1e-6), *w(f"{b}.mlp.fc1"))), *w(f"{b}.mlp.fc2"))
    image_tokens = norm(x, f"{v}.norm", 1e-6)
    t = "blip.text_encoder"
    ids, mask = tokens.input_ids, tokens.attention_mask
    e = (
        state[f"{t}.embeddings.word_embeddings.weight"][ids]
        + state[f"{t}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    x = norm(e, f"{t}.embeddings.LayerNorm", 1e-12)
    for i in range(2):
        b = f"{t}.encoder.layer.{i}"
        for part, context, m in (("attention", None, mask), ("crossattention", image_tokens, None)):
            qkv = [w(f"{b}.{part}.self.{n}") for n in ("query", "key", "value")]
            out = F.linear(
                attention(x, x if context is None else context, qkv, heads[1], m), *w(f"{b}.{part}.output.dense")
            )
            x = norm(out + x, f"{b}.{part}.output.LayerNorm", 1e-12)
        out = F.linear(F.gelu(F.linear(x, *w(f"{b}.intermediate.dense"))), *w(f"{b}.output.dense"))
        x = norm(out + x, f"{b}.output.LayerNorm", 1e-12)
    h = x[:, 0]
    for i in (0, 2, 4, 6, 7):
        h = F.linear(h, *w(f"mlp.layers.{i}"))
    return (h.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def _imagereward_layout(vocab: int) -> dict[str, tuple]:
    """The tensor shapes of ImageReward.pt's keys for the tiny architecture (vision width 48, text width 32)."""
    v, t = "blip.visual_encoder", "blip.text_encoder"
    shapes = {
        f"{v}.cls_token": (1, 1, 48),
        f"{v}.pos_embed": (1, 17, 48),
        f"{v}.patch_embed.proj.weight": (48, 3, 8, 8),
    }
    shapes |= {
        f"{t}.embeddings.word_embeddings.weight": (vocab, 32),
        f"{t}.embeddings.position_embeddings.weight": (64, 32),
    }
    shapes |= {"blip.vision_proj.weight": (256, 48), "blip.text_proj.weight": (256, 32)}  # unused by the score
    layers = {f"{v}.patch_embed.proj": (48, None), f"{v}.norm": (48, 0), f"{t}.embeddings.LayerNorm": (32, 0)}
    vision = {"norm1": (48, 0), "norm2": (48, 0), "attn.qkv": (144, 48), "attn.proj": (48, 48), "mlp.fc1": (64, 48)}
    vision["mlp.fc2"] = (48, 64)
    text = {
        f"{part}.{name}": (32, 32)
        for part in ("attention", "crossattention")
        for name in ("self.query", "output.dense")
    }
    text |= {"attention.self.key": (32, 32), "attention.self.value": (32, 32), "crossattention.self.key": (32, 48)}
    text |= {"crossattention.self.value": (32, 48), "attention.output.LayerNorm": (32, 0), "output.LayerNorm": (32, 0)}
    text |= {"crossattention.output.LayerNorm": (32, 0), "intermediate.dense": (37, 32), "output.dense": (32, 37)}
    for i in range(2):
        layers |= {f"{v}.blocks.{i}.{name}": shape for name, shape in vision.items()}
        layers |= {f"{t}.encoder.layer.{i}.{name}": shape for name, shape in text.items()}
    head = {0: (1024, 32), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    layers |= {f"mlp.layers.{i}": shape for i, shape in head.items()}
    for name, (out, inp) in layers.items():  # weight and bias of a linear layer, or of a LayerNorm (inp 0)
        shapes[f"{name}.bias"] = (out,)
        if inp is not None:  # the convolution's weight is set above
            shapes[f"{name}.weight"] = (out, inp) if inp else (out,)
    return shapes


@pytest.mark.parametrize("file_format", [".pt", ".safetensors"])
def test_imagereward_loads_the_published_checkpoint_layout(tmp_path, images, file_format):
    """A checkpoint in ImageReward.pt's key layout (BLIP's timm-style ViT, BLIP's BERT, `mlp.layers.*`, plus the
    unused contrastive projections and position-id buffer) at toy size; the score equals the hand computation, for
    the .pt read with weights_only and for the safetensors file the conversion command writes."""
    from framework.core.tokenizer import build_bert_tokenizer
    from framework.rewards.imagereward import convert, tiny_config

    tokenizer = build_bert_tokenizer("a cat red circle")
    tokenizer.save_pretrained(tmp_path / "bert")
    config = tiny_config(len(tokenizer))
    config.to_json_file(tmp_path / "blip.json")
    g = torch.Generator().manual_seed(6)
    shapes = _imagereward_layout(len(tokenizer))
    state = {
        k: torch.randn(shape, generator=g) / (shape[-1] ** 0.5 if len(shape) > 1 else 3) for k, shape in shapes.items()
    }
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # BLIP saved the buffer
    torch.save(state, tmp_path / "ImageReward.pt")
    checkpoint = tmp_path / f"ImageReward{file_format}"
    if file_format == ".safetensors":
        convert(tmp_path / "ImageReward.pt", checkpoint)
    reward = build_reward(
        RewardConfig(name="imagereward", checkpoint=str(checkpoint), arch=str(tmp_path / "blip.json"),
                     processor=str(tmp_path / "bert"))
    )  # fmt: skip
    prompts = ["a cat", "a red circle with a long name"]  # the second one padded less: the mask matters
    scores = reward(images, prompts)
    tokens = tokenizer(prompts, padding="max_length", max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = _imagereward_reference(state, images, tokens, heads=(4, 4))
    torch.testing.assert_close(scores.detach(), expected, rtol=1e-4, atol=1e-5)
    assert (expected[0] - expected[1]).abs() > 1e-3  # the images and prompts matter at this scale
    assert_differentiable(scores, images)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(FrameworkError, match=r"not an ImageReward state dict \(text: 1 weights missing, e\.g\. enc"):
        build_reward(RewardConfig(name="imagereward", checkpoint=str(tmp_path / "broken.pt"),
                                  arch=str(tmp_path / "blip.json"), processor=str(tmp_path / "bert")))  # fmt: skip


@pytest.mark.parametrize("name", ["aesthetic", "hps", "pickscore", "clipscore", "imagereward", "hpsv3"])
def test_tiny_rewards_are_finite_and_differentiable(name, images):
    reward = build_reward(RewardConfig(name=name, tiny=True))
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and reward.differentiable
    assert_differentiable(scores, images)


def test_hps_versions_resolve_to_the_files_hpsv2_names(tmp_path, monkeypatch):
    """A Hugging Face cache holding hpsv2's real v2.0 file (HPS_v2_compressed.pt, hpsv2's version map) serves
    reward.version=v2.0; v2.1's file is another."""
    from huggingface_hub import constants

    from framework.config.rewards import required_weights
    from framework.core.weights import resolve_file, unavailable

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--xswu--HPSv2" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--xswu--HPSv2" / "refs").mkdir()
    (tmp_path / "models--xswu--HPSv2" / "refs" / "main").write_text("a" * 40)
    (snapshot / "HPS_v2_compressed.pt").write_bytes(b"x")
    [(kind, spec, key)] = required_weights(RewardConfig(name="hps", version="v2.0"), "reward")
    assert unavailable(kind, spec) is None and resolve_file(spec, key=key) == snapshot / "HPS_v2_compressed.pt"
    [(kind, spec, key)] = required_weights(RewardConfig(name="hps", version="v2.1"), "reward")
    assert spec == "xswu/HPSv2/HPS_v2.1_compressed.pt" and unavailable(kind, spec) == "not in the Hugging Face cache"


def test_missing_weight_files_are_named_with_how_to_provide_them(clip_dir):
    with pytest.raises(FrameworkError, match=r"reward\.checkpoint: weight file 'weights/sac\+logos.*' not found"):
        build_reward(
            RewardConfig(name="aesthetic", source=str(clip_dir), checkpoint="weights/sac+logos+ava1-l14-linearMSE.pth")
        )
    # hpsv2's own file names: v2.0 is HPS_v2_compressed.pt (no ".0"), v2.1 HPS_v2.1_compressed.pt
    with pytest.raises(FrameworkError, match=r"'HPS_v2_compressed\.pt' of 'xswu/HPSv2' is not available offline"):
        build_reward(RewardConfig(name="hps", version="v2.0"))
    with pytest.raises(FrameworkError, match=r"'HPS_v2\.1_compressed\.pt' of 'xswu/HPSv2' is not available offline"):
        build_reward(RewardConfig(name="hps", version="v2.1"))
    with pytest.raises(FrameworkError, match=r"'ImageReward\.pt' of 'THUDM/ImageReward' is not available offline"):
        build_reward(RewardConfig(name="imagereward"))
    with pytest.raises(FrameworkError, match=r"'HPSv3\.safetensors' of 'MizzenAI/HPSv3' is not available offline"):
        build_reward(RewardConfig(name="hpsv3"))
    with pytest.raises(FrameworkError, match=r"reward\.source: weights for 'yuvalkirstain/PickScore_v1' are not in"):
        build_reward(RewardConfig(name="pickscore", source="yuvalkirstain/PickScore_v1", processor=str(clip_dir)))


def test_unsafe_or_corrupt_checkpoints_are_refused(tmp_path):
    import collections

    torch.save({"state_dict": collections.Counter(a=1)}, tmp_path / "pickled.pt")  # needs full unpickling
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    for name in ("pickled.pt", "corrupt.pt"):
        with pytest.raises(FrameworkError, match=rf"reward\.checkpoint: cannot load '.*{name}'.*weights_only=True"):
            build_reward(RewardConfig(name="hps", arch=TINY_ARCH, checkpoint=str(tmp_path / name)))


def test_corrupt_or_foreign_proxy_checkpoints_are_one_line(tmp_path):
    from safetensors.torch import save_file

    from framework.rewards.proxy import ProxyNet

    (tmp_path / "corrupt.safetensors").write_bytes(b"not a checkpoint")
    save_file({"weight": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    state = ProxyNet().state_dict() | {"text.weight": torch.zeros(3, 3)}
    save_file(state, tmp_path / "reshaped.safetensors")
    whys = {
        "corrupt": "not a safetensors file",
        "foreign": r"14 of its weights missing \(e\.g\. \['image\.0\.weight'\]\), 1 unexpected",
        "reshaped": r"size mismatch for text\.weight",
    }
    for name, why in whys.items():
        path = tmp_path / f"{name}.safetensors"
        with pytest.raises(FrameworkError, match=rf"^'{path}' is not a proxy reward written by .*train_proxy: {why}"):
            build_reward(RewardConfig(name="proxy", checkpoint=str(path)))


def test_the_imagereward_conversion_command_refuses_bad_files_with_one_line(tmp_path):
    from pathlib import PurePosixPath

    from conftest import call_main

    from framework.rewards.imagereward import main

    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    torch.save({"weight": torch.zeros(2), "blip.note": "no tensor"}, tmp_path / "foreign.pt")
    torch.save({"blip.x": PurePosixPath("a")}, tmp_path / "pickled.pt")  # needs full unpickling
    out = str(tmp_path / "out.safetensors")
    cases = {
        ("corrupt.pt", out): f"error: cannot read '{tmp_path / 'corrupt.pt'}' with torch.load(weights_only=True): ",
        ("pickled.pt", out): f"error: cannot read '{tmp_path / 'pickled.pt'}' with torch.load(weights_only=True): ",
        ("foreign.pt", out): f"error: '{tmp_path / 'foreign.pt'}' is not ImageReward.pt: it holds no blip.* weights",
        ("foreign.pt",): "error: the following arguments are required: target (see --help)",
    }
    for args, line in cases.items():
        result = call_main(main, *[str(tmp_path / args[0]), *args[1:]])
        assert result.returncode == 2 and result.stderr.startswith(line) and result.stderr.count("\n") == 1, args
    assert not (tmp_path / "out.safetensors").exists()


def test_jpeg_prefers_a_flat_image_and_is_not_differentiable():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reward = build_reward(RewardConfig(name="jpeg"))
    scores = reward(torch.cat([flat, noise]).requires_grad_(), PROMPTS)
    assert not reward.differentiable and not scores.requires_grad
    assert scores[0] > scores[1] and scores[1] < -5  # kB: a 64² noise JPEG at q95 is several kB


def test_toy_rewards_closed_forms():
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    grey = torch.full((1, 3, 8, 8), 0.25)
    score = lambda name, x: build_reward(RewardConfig(name=name))(x, ["p"]).item()  # noqa: E731
    assert score("brightness", grey) == pytest.approx(0.25) and score("darkness", grey) == pytest.approx(-0.25)
    assert score("saturation", red) == pytest.approx(1.0) and score("saturation", grey) == pytest.approx(0.0)
    assert score("contrast", grey) == pytest.approx(0.0) and score("brightness", red) == pytest.approx(1 / 3)


def test_toy_rewards_read_raw_pixels_model_rewards_clamp_and_scale_multiplies():
    """DNO's reading: a toy statistic scores the decoder's raw output, overshoot included, and keeps its gradient
    at saturated pixels; a model-based reward sees the clamped image (what is saved); `scale` multiplies."""
    over = torch.full((1, 3, 32, 32), 1.5, requires_grad=True)
    raw, clamped = (build_reward(RewardConfig(name="brightness", clamp=c)) for c in (None, True))
    assert raw(over, ["p"]).item() == pytest.approx(1.5) and clamped(over, ["p"]).item() == pytest.approx(1.0)
    (grad,) = torch.autograd.grad(raw(over, ["p"]).sum(), over)
    assert grad.abs().min() > 0
    clip = build_reward(RewardConfig(name="clipscore", tiny=True))
    assert clip(over, ["a cat"]).item() == pytest.approx(clip(torch.ones(1, 3, 32, 32), ["a cat"]).item(), rel=1e-6)
    hps, hps_cos = (build_reward(RewardConfig(name="hps", tiny=True, scale=s)) for s in (1.0, 0.01))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hps_cos(images, PROMPTS), 0.01 * hps(images, PROMPTS))


def test_callable_reward_sees_detached_images_unless_declared_differentiable(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def grad_flag(images, prompts):\n    return [float(images.requires_grad)] * len(images)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images = torch.rand(2, 3, 8, 8).requires_grad_()
    black_box = build_reward(RewardConfig(name="callable", target="my_scores:grad_flag"))
    assert not black_box.differentiable and black_box(images, PROMPTS).tolist() == [0.0, 0.0]
    with pytest.raises(FrameworkError, match="reward.target='my_scores:nope'"):
        build_reward(RewardConfig(name="callable", target="my_scores:nope"))


def test_preprocessing_matches_clip_image_processor():
    """Our differentiable torch preprocessing against transformers' PIL-based CLIPImageProcessor."""
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    for size in [(64, 96), (300, 400), (512, 512)]:
        smooth = F.interpolate(noise_like((1, 3, 16, 16)).sigmoid(), size=size, mode="bicubic").clamp(0, 1)
        array = (smooth[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        reference = processor(Image.fromarray(array), return_tensors="pt").pixel_values
        ours = clip_preprocess(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255, 224)
        assert ours.shape == reference.shape == (1, 3, 224, 224)
        assert (ours - reference).abs().mean() < 0.01  # PIL's and torch's bicubic kernels differ slightly


def test_missing_tokenizer_names_the_key_that_was_used(tmp_path):
    """Without reward.processor the tokenizer comes from reward.source, and the error says so."""
    with pytest.raises(FrameworkError, match=r"^reward\.source: directory"):
        build_reward(RewardConfig(name="clipscore", source=str(tmp_path / "missing")))


@pytest.mark.parametrize("layout", ["transformers>=4.52", "transformers<4.52"])
def test_hpsv3_loads_the_published_checkpoint_layout(tmp_path, layout):
    """A reward-model state dict as HPSv3 saves it (Qwen2-VL with the <|Reward|> row added, `rm_head.*`, an unused
    `lm_head`), under either transformers layout; the score equals transformers' own Qwen2-VL pipeline: its
    processor (patches, image-token expansion, right padding), Qwen2VLModel's forward at HPSv3's sequential
    positions, μ of the head at <|Reward|>."""
    from safetensors.torch import save_file
    from transformers import (
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from framework.rewards.hpsv3 import hpsv3_tokenizer, reward_head, tiny_config

    tokenizer = hpsv3_tokenizer()
    tokenizer.save_pretrained(tmp_path / "qwen2-vl")
    config = tiny_config(tokenizer)
    config.to_json_file(tmp_path / "qwen2-vl.json")
    torch.manual_seed(7)
    model, head = Qwen2VLForConditionalGeneration(config).eval(), reward_head(32).eval()
    state = {k: v for k, v in model.state_dict().items()} | {f"rm_head.{k}": v for k, v in head.state_dict().items()}
    if layout == "transformers<4.52":  # model.layers / visual, as saved before the language model had its own prefix
        state = {
            k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
            for k, v in state.items()
        }
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "HPSv3.safetensors")
    reward = build_reward(
        RewardConfig(name="hpsv3", checkpoint=str(tmp_path / "HPSv3.safetensors"), arch=str(tmp_path / "qwen2-vl.json"),
                     processor=str(tmp_path / "qwen2-vl"))
    )  # fmt: skip
    images = torch.rand(2, 3, 448, 448, generator=torch.Generator().manual_seed(1)).requires_grad_()  # 256 tokens
    official = json.loads((GOLDEN_DIR / "hpsv3_prompt.json").read_text())["texts"]  # HPSv3's own code's texts
    prompts = sorted(official, key=len)[:2]  # of two lengths
    scores = reward(images, prompts)

    pixels = 448 * 448
    processor = Qwen2VLProcessor(
        Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels), tokenizer, Qwen2VLVideoProcessor()
    )
    texts = [official[p] for p in prompts]
    batch = processor(text=texts, images=list(images.detach()), padding=True, padding_side="right",
                      do_rescale=False, return_tensors="pt")  # fmt: skip
    mask = batch.attention_mask
    positions = ((mask.cumsum(-1) - 1).clamp(min=0))[None].expand(3, -1, -1)
    with torch.no_grad():
        hidden = model.model(
            input_ids=batch.input_ids, attention_mask=mask, pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw, position_ids=positions,
        ).last_hidden_state  # fmt: skip
        expected = head(hidden[batch.input_ids == tokenizer.convert_tokens_to_ids("<|Reward|>")])[:, 0]
    assert (mask == 0).any()  # the shorter prompt is padded
    torch.testing.assert_close(scores.detach(), expected, rtol=1e-4, atol=1e-5)
    assert_differentiable(scores, images)


def test_hpsv3_scores_the_text_of_hpsv3s_own_code_byte_for_byte():
    """tests/golden/hpsv3_prompt.json: the official collator's message rendered by Qwen2-VL's chat template
    (tests/golden/hpsv3_prompt.py), for the golden images' prompts; with the Text Alignment criteria."""
    from framework.rewards.hpsv3 import chat_text

    official = json.loads((GOLDEN_DIR / "hpsv3_prompt.json").read_text())
    assert official["source"].startswith("hpsv3==1.0.0 QWen2VLDataCollator")
    for prompt, text in official["texts"].items():
        assert chat_text(prompt) == text
        assert "**Text Alignment:**" in text and text.count("<|Reward|>") == 1


def test_a_prompt_holding_hpsv3s_special_tokens_is_one_line():
    reward = build_reward(RewardConfig(name="hpsv3", tiny=True))
    for prompt in ("a cat <|Reward|>", "a cat <|image_pad|>"):
        with pytest.raises(FrameworkError, match=r"^a prompt must not contain <\|Reward\|> or <\|image_pad\|>"):
            reward(torch.rand(1, 3, 32, 32), [prompt])


def test_hpsv3_resizes_as_qwen2_vl_does_with_its_pixel_budget():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from framework.rewards.hpsv3 import PIXELS, resized_size

    for size in [(512, 512), (1024, 768), (64, 64), (448, 448), (300, 1000), (1344, 768)]:
        assert resized_size(*size) == smart_resize(*size, factor=28, min_pixels=PIXELS, max_pixels=PIXELS), size


METHODS_OF_EACH_KIND = {
    "dno": ["method.opt_steps=2", "method.lr=0.1"],  # follows reward gradients through the sampler
    "best_of_n": ["method.n=3"],  # scores candidates, no gradients
    "draft": ["method.train_steps=1", "method.train_batch_size=1", "method.lora_rank=2", "method.sample_every=0"],
}


@pytest.mark.parametrize("method", sorted(METHODS_OF_EACH_KIND))
@pytest.mark.parametrize("reward", ["tiny_imagereward", "tiny_hpsv3"])
def test_imagereward_and_hpsv3_drive_every_kind_of_method_from_the_cli(reward, method, tmp_path):
    """Noise optimisation (gradients through the sampler), Best-of-N (a black-box use) and DRaFT (gradients into a
    LoRA): every item finishes and records its scores; DNO's optimisation moves the score."""
    import json

    run_dir = tmp_path / "run"
    args = ["model=tiny_sd", "model.resolution=32", f"method={method}", "method.num_steps=2", f"reward={reward}"]
    args += [*METHODS_OF_EACH_KIND[method], "logger=none", "prompts=inline", "prompts.prompts=[a red circle]"]
    result = run_cli(*args, run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "items" / "p0000_s000" / "record.json").read_text())
    assert record["status"] == "ok" and all(map(math.isfinite, (record["base_reward"], record["final_reward"])))
    if method == "dno":
        assert len(record["steps"]) == 2 and record["final_reward"] != record["base_reward"]
