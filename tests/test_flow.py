"""Flow-matching backbones (SD3, FLUX.1, Qwen-Image, FLUX.2): the Euler sampler against diffusers' pipelines, the
stochastic step's maths, LoRA files the pipelines load, and every method end to end from the CLI on the tiny models."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REBATCHED, run_cli
from torch.distributions import Normal, kl_divergence

from framework.config import ModelConfig
from framework.config.families import FAMILIES
from framework.core.errors import FrameworkError
from framework.core.options import resolve
from framework.models import Backbone, Cond, build_tiny, load_backbone
from framework.models import tiny as tiny_builders
from framework.models.flow import FlowMatchingBackbone
from framework.models.qwen_image import QwenImageBackbone
from framework.models.sampling import kl_weights, num_noises, sample, sampler_steps

PROMPTS = ["a cat", "a red circle and a blue square"]


def tiny(kind: str) -> FlowMatchingBackbone:
    """A fresh tiny flow model of `kind` at 32 px, reading 64 text tokens."""
    return load_backbone(ModelConfig(kind=kind, tiny=True, resolution=32, max_sequence_length=64))


@pytest.fixture(scope="module")
def tiny_sd3():
    return tiny("sd3")


@pytest.fixture(scope="module")
def tiny_flux():
    return tiny("flux")


@pytest.fixture(scope="module")
def tiny_qwen_image():
    return tiny("qwen_image")


@pytest.fixture(scope="module")
def tiny_flux2():
    return tiny("flux2")


@pytest.fixture(scope="module")
def tiny_flux2_klein():
    return tiny("flux2_klein")


@pytest.fixture(scope="module")
def tiny_klein_distilled():
    """FLUX.2 klein step-distilled (as FLUX.2-klein-4B): no guidance input and no CFG, so w is ignored."""
    pipe = build_tiny("flux2_klein", 32)
    pipe.register_to_config(is_distilled=True)
    return resolve(FAMILIES["flux2_klein"].backbone)(pipe, 32, 64)


@pytest.fixture(scope="module")
def tiny_schnell():
    """FLUX without a guidance input and with a static schedule, as FLUX.1-schnell."""
    return FlowMatchingBackbone(tiny_builders.tiny_flux(32, guidance_embeds=False), 32, 64)


def noise(backbone, n=2, seed=0):
    return torch.randn((n, *backbone.latent_shape()), generator=torch.Generator().manual_seed(seed))


def pipeline_images(backbone, x_T, steps, guidance_scale, prompts=PROMPTS):
    """The backbone's diffusers pipeline called as a user would, from the latents x_T (packed where the pipeline
    takes them packed), at guidance w: Qwen-Image's true CFG with the model card's negative prompt, the others'
    guidance_scale."""
    pipe = copy.copy(backbone.pipe)
    pipe.set_progress_bar_config(disable=True)
    latents, guidance = x_T.clone(), {"guidance_scale": guidance_scale}
    if backbone.is_flux or isinstance(backbone, QwenImageBackbone):
        latents = pipe._pack_latents(latents, len(x_T), *x_T.shape[1:])
    if isinstance(backbone, QwenImageBackbone):
        guidance = {"true_cfg_scale": guidance_scale, "negative_prompt": " " if guidance_scale > 1 else None}
    return pipe(
        prompt=prompts,
        latents=latents,
        num_inference_steps=steps,
        output_type="pt",
        height=backbone.height,
        width=backbone.width,
        max_sequence_length=backbone.max_sequence_length,
        **guidance,
    ).images


@pytest.mark.parametrize(
    "model, guidance_scale, steps",
    [
        ("sd3", 5.0, 6),
        ("sd3", 0.5, 6),
        ("sd3", 0.0, 6),
        ("flux", 3.5, 6),
        ("flux", 0.5, 6),
        ("schnell", 0.0, 6),
        ("qwen_image", 4.0, 6),
        ("qwen_image", 4.0, 3),
        ("qwen_image", 0.5, 3),
        ("flux2", 4.0, 6),
        ("flux2", 2.5, 3),
        ("flux2_klein", 4.0, 6),
        ("flux2_klein", 0.5, 3),
        ("klein_distilled", 4.0, 3),
    ],
)
def test_eta0_matches_the_diffusers_pipeline(model, guidance_scale, steps, request):
    """Same components, initial latents and steps: our Euler sampler + decode against StableDiffusion3Pipeline /
    FluxPipeline (packed latents, guidance embedding, image-size shift) / QwenImagePipeline (chat template, masks of
    prompts of different lengths, norm-rescaled true CFG, 3-D VAE) / Flux2Pipeline and Flux2KleinPipeline (three
    hidden layers, 4-axis positions, batch-normalised patchified latents, empirical shift) called as a user would;
    below w = 1 too, where the CFG pipelines sample without their negative branch and FLUX feeds w to its guidance
    embedding."""
    backbone = request.getfixturevalue(f"tiny_{model}")
    x_T = noise(backbone)
    with torch.no_grad():
        traj = sample(backbone, backbone.encode(PROMPTS), x_T, num_steps=steps, guidance_scale=guidance_scale)
        ours = backbone.postprocess(backbone.decode(traj.latents))
        reference = pipeline_images(backbone, x_T, steps, guidance_scale)
        other_prompts = sample(
            backbone, backbone.encode(["a dog"] * 2), x_T, num_steps=steps, guidance_scale=guidance_scale
        )
        other = backbone.postprocess(backbone.decode(other_prompts.latents))
    assert ours.shape == reference.shape == (2, 3, 32, 32)
    assert (
        (ours - reference).abs().max().item() <= 1e-5
    )  # same float32 ops in another order (our step vs the scheduler's): ~1e-7 each, 6 steps and a decode
    assert ours.std() > 0.01  # a real image, not a constant
    assert (ours - other).abs().max() > 1e-3  # and one that depends on the prompt: the comparison can see encoding


@pytest.mark.parametrize(
    "model, guidance_scale", [("sd3", 5.0), ("flux", 3.5), ("qwen_image", 4.0), ("flux2", 4.0), ("flux2_klein", 4.0)]
)
def test_non_square_images_match_the_diffusers_pipeline(model, guidance_scale):
    """model.height × model.width = 32 × 48: latents, packing, position ids, image-size shift and decode of a
    non-square image, against the pipeline asked for the same size."""
    config = ModelConfig(kind=model, tiny=True, height=32, width=48, max_sequence_length=64)
    backbone = load_backbone(config)
    x_T = noise(backbone)
    with torch.no_grad():
        traj = sample(backbone, backbone.encode(PROMPTS), x_T, num_steps=3, guidance_scale=guidance_scale)
        ours = backbone.postprocess(backbone.decode(traj.latents))
        reference = pipeline_images(backbone, x_T, 3, guidance_scale)
    assert ours.shape == reference.shape == (2, 3, 32, 48)
    assert (ours - reference).abs().max().item() <= 1e-5


def test_schedule_is_the_pipelines_shifted_one(tiny_sd3, tiny_flux):
    """SD3.5's static shift 3 and FLUX-dev's image-size shift μ: σ starts at 1, ends at 0, t = 1000·σ."""
    sd3 = tiny_sd3.schedule(4)
    shift = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731
    smallest = shift(1 / 1000)  # of the shifted training sigmas, which the spacing runs down to, then shifted again
    spaced = [1 - i * (1 - smallest) / 3 for i in range(4)]
    assert [a for _, a, _ in sd3] == pytest.approx([shift(s) for s in spaced], rel=1e-5)
    for schedule in (sd3, tiny_flux.schedule(4)):
        assert schedule[0][1] == 1.0 and schedule[-1][2] == 0.0
        assert all(t == pytest.approx(1000 * s, rel=1e-6) for t, s, _ in schedule)
        assert all(a > b for _, a, b in schedule)


def test_qwen_image_schedule_is_its_exponentially_shifted_linspace_ending_at_the_terminal_sigma(tiny_qwen_image):
    """Qwen-Image's σ in closed form: linspace(1, 1/n, n) shifted by σ' = e^μ / (e^μ + 1/σ − 1), μ linear in the
    image's 64 tokens between (256, 0.5) and (8192, 0.9), then stretched so the last σ is 0.02, then 0 appended."""
    n = 4
    mu = 0.5 + (64 - 256) * (0.9 - 0.5) / (8192 - 256)
    shifted = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (1 - i * (1 - 1 / n) / (n - 1) for i in range(n))]
    scale = (1 - shifted[-1]) / (1 - 0.02)
    expected = [1 - (1 - s) / scale for s in shifted] + [0.0]
    schedule = tiny_qwen_image.schedule(n)
    assert [s for _, s, _ in schedule] + [schedule[-1][2]] == pytest.approx(expected, rel=1e-5)
    assert schedule[-1][1] == pytest.approx(0.02, rel=1e-5)


def flow_sde_step(x, v, sigma, sigma_next, eta, sigma_after_first):
    """Flow-GRPO's Euler–Maruyama step written out independently: (mean, std)."""
    dt = sigma_next - sigma
    denominator = 1 - (sigma_after_first if sigma == 1 else sigma)
    s = eta * math.sqrt(sigma / denominator)
    score_term = s**2 / (2 * sigma) * (x + (1 - sigma) * v)
    return x + (v + score_term) * dt, s * math.sqrt(-dt)


@pytest.mark.parametrize("sigma, sigma_next", [(0.6, 0.45), (1.0, 0.9), (0.1, 0.0)])
def test_girsanov_weight_is_the_closed_form_kl_of_one_stochastic_euler_step(sigma, sigma_next):
    """Two velocities at the same x_t: the steps N(μ_i, std²I) differ by c·Δv, so KL = c²‖Δv‖²/(2 std²), torch's
    Normal KL of the two steps; the step itself is the SDE's Euler–Maruyama step (first step σ = 1 included)."""
    eta, first = 0.7, sigma == 1
    sigma_after_first = sigma_next if first else 0.9
    x = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v1, v2 = (torch.randn(16, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (1, 2))
    schedule = [(1000.0, 1.0, sigma_after_first), (1000 * sigma, sigma, sigma_next)]
    if first:
        schedule[1] = (1000 * sigma_next, sigma_next, 0.0)
    backbone = SimpleNamespace(flow_matching=True, schedule=lambda n: schedule)
    step = sampler_steps(backbone, 2, eta)[0 if first else 1]
    mean1, std = flow_sde_step(x, v1, sigma, sigma_next, eta, sigma_after_first)
    mean2, _ = flow_sde_step(x, v2, sigma, sigma_next, eta, sigma_after_first)
    torch.testing.assert_close(step.update(x, v1)[1], mean1)
    assert step.std == pytest.approx(std, rel=1e-12) and step.std > 0
    torch.testing.assert_close(step.update(x, v1)[0], x - sigma * v1)  # x̂0 of a velocity
    kl = kl_divergence(Normal(mean1, std), Normal(mean2, std)).sum()
    (weight,) = kl_weights([step])
    assert (weight * (v1 - v2).square().sum()).item() == pytest.approx(kl.item(), rel=1e-9)


class GaussianFlow(Backbone):
    """Exact velocity of data x0 ~ N(0, s0² I) under x_σ = (1−σ)x0 + σε: v = (σ − (1−σ)s0²)·x / ((1−σ)²s0² + σ²)."""

    flow_matching = True

    def __init__(self, like: FlowMatchingBackbone, s0: float):
        super().__init__()
        self.scheduler, self.s0, self.like = like.scheduler, s0, like

    @property
    def device(self):
        return torch.device("cpu")

    def schedule(self, num_steps):
        return self.like.schedule(num_steps)

    def predict_branches(self, x, t, cond, guidance_scale):
        sigma = t / 1000
        v = (sigma - (1 - sigma) * self.s0**2) * x / ((1 - sigma) ** 2 * self.s0**2 + sigma**2)
        return v, v


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_the_stochastic_sampler_keeps_the_flows_marginals(tiny_sd3, eta):
    """On a Gaussian whose velocity is exact, ODE and SDE sampling (any noise level) end at the data variance s0², to
    3 % (the estimate's own standard error is √(2/n) = 1 %)."""
    backbone, n, steps = GaussianFlow(tiny_sd3, s0=0.5), 20000, 400
    generator = torch.Generator().manual_seed(1)
    x_T = torch.randn((n, 1), generator=generator)
    noises = torch.randn((num_noises(steps, eta), n, 1), generator=generator) if eta > 0 else None
    cond = Cond(torch.zeros(n, 1))
    x0 = sample(backbone, cond, x_T, noises, num_steps=steps, eta=eta).latents
    assert x0.var().item() == pytest.approx(0.25, rel=0.03)
    assert abs(x0.mean().item()) < 0.02


def test_noise_gradients_reach_the_initial_noise_and_every_xi(tiny_flux):
    """DNO's variables on a flow model: x_1 and every ξ_t of the stochastic sampler get gradients."""
    x_T = noise(tiny_flux, n=1).requires_grad_()
    noises = torch.randn((3, 1, *tiny_flux.latent_shape()), generator=torch.Generator().manual_seed(2))
    noises.requires_grad_()
    traj = sample(tiny_flux, tiny_flux.encode(["a cat"]), x_T, noises, num_steps=3, eta=0.7, checkpoint=True)
    tiny_flux.decode(traj.latents).mean().backward()
    assert x_T.grad.abs().sum() > 0
    assert all(noises.grad[i].abs().sum() > 0 for i in range(3))


def test_resolution_not_divisible_by_the_patches_is_one_clear_error():
    with pytest.raises(FrameworkError, match="model.resolution=34 is not valid; it must be a multiple of 4"):
        load_backbone(ModelConfig(kind="sd3", tiny=True, resolution=34, max_sequence_length=8))


@pytest.mark.parametrize("model", ["sd3", "flux", "qwen_image", "flux2", "flux2_klein"])
def test_save_pretrained_then_model_source_dir_gives_the_same_images(model, request, tmp_path):
    backbone = request.getfixturevalue(f"tiny_{model}")
    backbone.pipe.save_pretrained(tmp_path)
    loaded = load_backbone(ModelConfig(kind=model, source=str(tmp_path), resolution=32, max_sequence_length=64))
    x_T = noise(backbone, n=1)
    with torch.no_grad():
        images = [b.decode(sample(b, b.encode(["a cat"]), x_T, num_steps=2).latents) for b in (backbone, loaded)]
    torch.testing.assert_close(images[0], images[1])


def test_missing_flux_weights_say_how_to_provide_them():
    with pytest.raises(FrameworkError, match="model.source: weights for 'black-forest-labs/FLUX.1-schnell' are not in"):
        load_backbone(ModelConfig(kind="flux", source="black-forest-labs/FLUX.1-schnell"))


COMMON = ["prompts=inline", "prompts.prompts=[a cat]", "logger=none", "method.num_steps=2"]
NOISE = ["method.opt_steps=2", "method.num_permutations=2"]


KINDS = ("sd3", "flux", "qwen_image", "flux2")


def sweep(directory, *overrides, models=f"model={','.join(f'tiny_{k}' for k in KINDS)}") -> dict[tuple[str, str], dict]:
    """`--multirun` over the tiny flow models; (model kind, method) → that job's summary and run directory."""
    result = run_cli("--multirun", models, *COMMON, *overrides, f"hydra.sweep.dir={directory}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {}
    for summary in directory.glob("*/summary.json"):
        config = yaml.safe_load((summary.parent / ".hydra" / "config.yaml").read_text())
        runs[(config["model"]["kind"], config["method"]["name"])] = json.loads(summary.read_text()) | {
            "dir": summary.parent
        }
    return runs


def test_every_method_runs_end_to_end_on_the_tiny_flow_models_from_the_cli(tmp_path):
    """Noise optimisation (DNO, DNO-ZO, MIRA, MIRA-DPO), Best-of-N and base; DRaFT trains a transformer LoRA, which
    LoRA scaling and AIG then load; GRPO trains one on JPEG compressibility: every item finishes on SD3, FLUX.1,
    Qwen-Image and FLUX.2."""
    # lr: one step must move the 8-bit images of every tiny model (FLUX.2's moves least)
    draft = ["method.train_steps=1", "method.train_batch_size=1", "method.lora_rank=2", "method.kl_weight=0.1"]
    draft += ["method.lr=0.01"]
    grpo = ["method.train_steps=1", "method.group_size=2", "method.prompts_per_epoch=1", "method.rollout_steps=2"]
    grpo += ["method.num_steps=2", "method.lora_rank=2", "method.sample_every=0"]
    sweeps = [
        (tmp_path / "draft", ["method=draft", "reward=brightness", *draft]),
        (tmp_path / "grpo", ["method=grpo", "reward=jpeg", *grpo]),  # online RL on a black-box reward
        (tmp_path / "noise", ["method=dno,dno_zo,mira,mira_dpo", "reward=brightness", *NOISE]),
        (tmp_path / "sampling", ["method=base,best_of_n", "reward=jpeg", "method.eta=0.5"]),
    ]
    runs = {}
    for directory, overrides in sweeps:
        runs |= sweep(directory, *overrides)
    for kind in KINDS:  # `++`: the sweep's primary config (the default method) has no adapter key
        adapter = f"++method.adapter={runs[(kind, 'draft')]['dir']}/adapter"
        runs |= sweep(
            tmp_path / kind, "method=lora_scale,aig", "reward=brightness", adapter, models=f"model=tiny_{kind}"
        )
    methods = ("dno", "dno_zo", "mira", "mira_dpo", "base", "best_of_n", "draft", "grpo", "lora_scale", "aig")
    assert set(runs) == {(kind, method) for kind in KINDS for method in methods}
    for (kind, method), summary in runs.items():
        assert summary["num_ok"] == summary["num_items"] == 1, (kind, method, summary["items"])
        assert math.isfinite(summary["final_reward_mean"]), (kind, method)
    for kind in KINDS:  # the optimisers moved the image; DRaFT's adapter changed the model
        for method in ("dno", "mira", "draft"):
            summary = runs[(kind, method)]
            assert summary["final_reward_mean"] != summary["base_reward_mean"], (kind, method)


@pytest.mark.parametrize("kind", ["sd3", "flux", "qwen_image", "flux2", "flux2_klein"])
def test_a_transformer_lora_loads_in_the_pipeline_and_samples_as_ours(kind, tmp_path):
    """Our adapter file (attention and MLP projections of every block, the text stream's too) is what
    `load_lora_weights` of StableDiffusion3Pipeline / FluxPipeline / QwenImagePipeline / Flux2Pipeline /
    Flux2KleinPipeline reads; the pipeline then samples as we do."""
    from framework.config.families import TRANSFORMER_LORA
    from framework.models.lora import WEIGHT_NAME, add_lora, save_lora

    ours = tiny(kind)
    with torch.no_grad():
        for parameter in add_lora(ours.denoiser, TRANSFORMER_LORA, rank=2, seed=1):
            parameter.normal_(std=0.2, generator=torch.Generator().manual_seed(parameter.numel()))
    adapted = {name.rsplit(".lora_", 1)[0] for name, _ in ours.denoiser.named_parameters() if "lora_" in name}
    text_mlp = "txt_mlp" if kind == "qwen_image" else "ff_context"
    assert any(name.endswith("attn.add_q_proj") for name in adapted) and any(text_mlp in n for n in adapted)
    assert "proj_out" not in adapted  # the final projection is not an MLP layer
    single = {"flux": ["proj_mlp"], "flux2": ["attn.to_qkv_mlp_proj", "attn.to_out"]}.get(kind.removesuffix("_klein"))
    for layer in single or []:  # FLUX's fused single-stream layers
        assert f"single_transformer_blocks.0.{layer}" in adapted
    save_lora(ours, tmp_path)
    pipe = build_tiny(kind, 32)
    pipe.load_lora_weights(str(tmp_path), weight_name=WEIGHT_NAME)
    theirs = resolve(FAMILIES[kind].backbone)(pipe, 32, 64)
    x_T = noise(ours)
    with torch.no_grad():
        cond = ours.encode(PROMPTS)
        ours_images = ours.postprocess(ours.decode(sample(ours, cond, x_T, num_steps=3, guidance_scale=3.0).latents))
        with ours.adapters_disabled():
            base = ours.postprocess(ours.decode(sample(ours, cond, x_T, num_steps=3, guidance_scale=3.0).latents))
        reference = pipeline_images(theirs, x_T, 3, 3.0)
    assert (ours_images - reference).abs().max().item() <= 1e-5  # as above, with the pipeline's own LoRA loading
    assert (ours_images - base).abs().max().item() > 1e-3  # the adapter is not a no-op


def test_mira_with_girsanov_weights_on_a_flow_model_climbs_and_starts_at_zero_drift(tiny_flux):
    """MIRA's velocity surrogate with the per-step KL weights of the stochastic Euler sampler (η = 0.7)."""
    from framework.config.methods import MIRAConfig
    from framework.config.rewards import RewardConfig
    from framework.methods import Item, Problem, build_method
    from framework.rewards import build_reward

    reward = build_reward(RewardConfig(name="brightness"))
    cfg = MIRAConfig(num_steps=3, eta=0.7, opt_steps=4, lr=0.05, beta=1.0, weighting="girsanov")
    (result,) = build_method(cfg, reward).run(Problem(tiny_flux, reward, Item(0, 0, "a cat", 3), cfg))
    assert result.steps[0]["regulariser"] == 0.0 and result.steps[-1]["regulariser"] > 0
    assert result.final_reward > result.base_reward


@pytest.mark.parametrize("kind", ["sd3", "flux", "qwen_image", "flux2"])
def test_offloading_the_text_encoders_encodes_once_and_changes_nothing(kind):
    """`offload_text_encoders` keeps the run's prompts' encodings and drops the encoders: any batch of those prompts
    (repeats, any order) is encoded as the encoders would (to the rounding of another batch shape; Qwen-Image's
    prompts of different lengths padded, their masks marking the padding), an unknown prompt is one clear error."""
    backbone = tiny(kind)
    batch = [PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    expected = backbone.encode(batch)
    x, t = noise(backbone, n=1), backbone.schedule(4)[1][0]
    with torch.no_grad():  # the shortest prompt alone: after offloading it is padded to the longest one's length
        velocity = backbone.predict(x, t, backbone.encode(PROMPTS[:1]), guidance_scale=4.0)
    size = sum(p.numel() for p in backbone.parameters())
    backbone.offload_text_encoders([*PROMPTS, PROMPTS[0]], torch.device("cpu"), batch=1)
    assert len(backbone.text_encoders) == 0 and backbone.pipe.text_encoder is None
    assert sum(p.numel() for p in backbone.parameters()) < size
    got = backbone.encode(batch)
    for field in ("embeds", "uncond_embeds", "pooled", "uncond_pooled", "mask", "uncond_mask"):
        if getattr(expected, field) is None:
            assert getattr(got, field) is None
        else:
            torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=0, atol=REBATCHED)
    with torch.no_grad():
        offloaded = backbone.predict(x, t, backbone.encode(PROMPTS[:1]), guidance_scale=4.0)
    torch.testing.assert_close(offloaded, velocity, rtol=0, atol=REBATCHED)
    with pytest.raises(FrameworkError, match="model.offload_text_encoder"):
        backbone.encode(["a dog"])


def test_a_run_with_offloaded_text_encoders_equals_one_without(tmp_path, monkeypatch):
    """`model.offload_text_encoder=true` offloads once, with the run's prompts, and the run's result is unchanged."""
    calls = []
    offload = FlowMatchingBackbone.offload_text_encoders
    monkeypatch.setattr(
        FlowMatchingBackbone,
        "offload_text_encoders",
        lambda self, prompts, *a, **k: calls.append(list(prompts)) or offload(self, prompts, *a, **k),
    )
    args = ["model=tiny_sd3", *COMMON, "method=dno", "reward=brightness", *NOISE]
    plain, offloaded = (
        run_cli(*args, *extra, run_dir=tmp_path / name)
        for name, extra in (("plain", []), ("offloaded", ["model.offload_text_encoder=true"]))
    )
    assert plain.returncode == offloaded.returncode == 0, plain.stderr + offloaded.stderr
    assert calls == [["a cat"]]  # the offloaded run only
    rewards = [
        json.loads((tmp_path / d / "summary.json").read_text())["final_reward_mean"] for d in ("plain", "offloaded")
    ]
    assert rewards[0] == rewards[1]


def test_channels_last_converts_each_of_qwen_images_3d_and_2d_convolutions_and_changes_no_image(tiny_qwen_image):
    config = ModelConfig(kind="qwen_image", tiny=True, resolution=32, max_sequence_length=64, channels_last=True)
    backbone = load_backbone(config)
    layers = list(backbone.vae.modules())
    conv3d = next(m for m in layers if isinstance(m, torch.nn.Conv3d))
    conv2d = next(m for m in layers if isinstance(m, torch.nn.Conv2d))
    assert conv3d.weight.is_contiguous(memory_format=torch.channels_last_3d) and conv3d.weight.dim() == 5
    assert conv2d.weight.is_contiguous(memory_format=torch.channels_last)
    x_T = noise(backbone, n=1)
    with torch.no_grad():
        images = [
            b.decode(sample(b, b.encode(["a cat"]), x_T, num_steps=2).latents) for b in (backbone, tiny_qwen_image)
        ]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-5)  # other kernels, the same maths


def test_qwen_image_conditions_on_the_prompt_after_the_templates_34_tokens(tiny_qwen_image):
    """Qwen-Image drops its template's first 34 tokens (the system turn and "<|im_start|>user\\n") by index. The tiny
    tokenizer knows the template's words whole, as Qwen2.5's vocabulary does, so that prefix is 34 tokens here too
    and the conditioning starts at the prompt's first token: the encoder's last hidden state from there, computed
    from the template's text. A drop of 33 or 35 would keep a template token or lose a prompt token."""
    pipe, prompt = tiny_qwen_image.pipe, "a red circle"
    prefix, suffix = pipe.prompt_template_encode.split("{}")
    start = len(pipe.tokenizer(prefix).input_ids)
    ids = pipe.tokenizer(prefix + prompt + suffix, return_tensors="pt").input_ids
    assert start == 34 and pipe.tokenizer.decode(ids[0, start:]) == prompt + suffix
    with torch.no_grad():
        reference = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, start:]
        embeds = tiny_qwen_image.encode([prompt]).embeds[0]
        assert embeds.shape == reference.shape
        torch.testing.assert_close(embeds, reference, rtol=1e-5, atol=1e-6)
        for wrong in (33, 35):  # the comparison sees an index off by one
            pipe.prompt_template_encode_start_idx = wrong
            try:
                assert tiny_qwen_image.encode([prompt]).embeds.shape[1] != len(reference)
            finally:
                pipe.prompt_template_encode_start_idx = start


@pytest.mark.parametrize("kind, layers", [("flux2", (10, 20, 30)), ("flux2_klein", (9, 18, 27))])
def test_flux2_conditions_on_three_intermediate_layers_of_a_deeper_encoder(kind, layers, request):
    """FLUX.2-dev reads its Mistral-3 encoder at hidden layers 10, 20, 30 and klein its Qwen3 encoder at 9, 18, 27,
    concatenated along the features. The tiny encoders are deeper than that, so the last layer is not one of them:
    the conditioning equals those layers of the encoder run on the same tokens, and not the last layer's."""
    backbone = request.getfixturevalue(f"tiny_{kind}")
    encoder, calls = backbone.pipe.text_encoder, []  # the prompt's call, then klein's negative prompt's
    hook = encoder.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            embeds = backbone.encode(["a red circle"]).embeds
    finally:
        hook.remove()
    assert encoder.config.get_text_config().num_hidden_layers > layers[-1]
    with torch.no_grad():
        tokens = {key: calls[0][key] for key in ("input_ids", "attention_mask")}
        hidden = encoder(**tokens, output_hidden_states=True)
    concat = lambda ks: torch.cat([hidden.hidden_states[k] for k in ks], dim=-1)  # noqa: E731
    torch.testing.assert_close(embeds, concat(layers), rtol=1e-5, atol=1e-6)
    assert (embeds - concat((*layers[:2], -1))).abs().max() > 1e-3
