"""LoRA fine-tuning and sampling-time methods: exact endpoints (init, α, p), truncated gradients, save/load, resume."""

import csv
import json
import math

import pytest
import torch
from conftest import REBATCHED, interrupted_copy, run_cli, run_nodes

from framework.config import ModelConfig
from framework.config.families import UNET_LORA
from framework.config.methods import AIGConfig, DRaFTConfig, LoRAScaleConfig
from framework.config.rewards import RewardConfig
from framework.methods import Item, Problem, build_method
from framework.methods.aig import aig_gamma
from framework.methods.draft import DRaFT
from framework.models import load_backbone
from framework.models.lora import adapters_disabled, add_lora, load_lora, save_lora
from framework.rewards import build_reward

ITEM = Item(0, 0, "a cat", 11)


@pytest.fixture(scope="module")
def brightness():
    return build_reward(RewardConfig(name="brightness"))


def fresh_backbone(trained: bool):
    """A tiny SD with an adapter: zero B as initialised, or random B as if trained."""
    backbone = load_backbone(ModelConfig(kind="sd", tiny=True, resolution=32))
    params = add_lora(backbone.unet, UNET_LORA, rank=4)
    if trained:
        generator = torch.Generator().manual_seed(0)
        for p in params:
            p.data = 0.3 * torch.randn(p.shape, generator=generator)
    return backbone


@pytest.fixture(scope="module")
def tuned():
    return fresh_backbone(trained=True)


def sample(backbone, reward, cfg):
    return build_method(cfg, reward).run(Problem(backbone, reward, ITEM, cfg))[0]


def test_at_initialisation_samples_equal_the_base_and_kl_is_zero(brightness):
    backbone = fresh_backbone(trained=False)
    result = sample(backbone, brightness, LoRAScaleConfig(num_steps=3, adapter="-"))
    assert torch.equal(result.final_image, result.base_image)
    with torch.enable_grad():
        module = loss_module(backbone, brightness, DRaFTConfig(num_steps=3, k=2, kl_weight=1.0))
        _, _, kl = module.losses(["a cat"], [5])
    assert kl.item() == 0


def test_lora_scale_and_aig_endpoints_are_exact(tuned, brightness):
    common = dict(num_steps=4, adapter="-")
    base = sample(tuned, brightness, LoRAScaleConfig(alpha=0.0, **common))
    full = sample(tuned, brightness, LoRAScaleConfig(alpha=1.0, **common))
    assert torch.equal(base.final_image, base.base_image)
    assert not torch.equal(full.final_image, full.base_image)  # the adapter does change the samples
    assert torch.equal(sample(tuned, brightness, AIGConfig(p=0.0, **common)).final_image, full.final_image)
    assert torch.equal(sample(tuned, brightness, AIGConfig(p=math.inf, **common)).final_image, base.final_image)
    middle = sample(tuned, brightness, AIGConfig(p=1.0, **common)).final_image
    assert not torch.equal(middle, full.final_image) and not torch.equal(middle, base.final_image)


def test_path_kl_of_adapted_sampling_is_the_sum_of_its_gaussian_step_kls(tuned, brightness):
    """Independent of the c²/(2 std²) weights: each step's two Gaussian means from `Step.update`, same std."""
    from framework.methods.common import draw_noise, sampler_options
    from framework.models.sampling import sample as run_sampler
    from framework.models.sampling import sampler_steps

    cfg = LoRAScaleConfig(num_steps=3, eta=1.0, adapter="-")
    kl = sample(tuned, brightness, cfg).info["kl"]
    x_T, noises = draw_noise(tuned, cfg, [ITEM.seed])
    cond = tuned.encode([ITEM.prompt])
    expected = 0.0
    with torch.no_grad():
        traj = run_sampler(tuned, cond, x_T, noises, **sampler_options(cfg))
        for x, step, pred in zip(traj.x, sampler_steps(tuned, 3, 1.0), traj.predictions):
            with tuned.adapters_disabled():
                base, _ = tuned.predict_branches(x, step.t, cond, cfg.guidance_scale)
            mean_tuned, mean_base = step.update(x, pred)[1], step.update(x, base)[1]
            expected += float((mean_tuned - mean_base).square().sum() / (2 * step.std**2))
    assert kl > 0 and kl == pytest.approx(expected, rel=1e-4)  # float32 sums of the same terms in another order
    assert sample(tuned, brightness, LoRAScaleConfig(num_steps=3, eta=1.0, alpha=0.0, adapter="-")).info["kl"] == 0
    assert sample(tuned, brightness, AIGConfig(num_steps=3, eta=1.0, p=math.inf, adapter="-")).info["kl"] == 0
    assert "kl" not in sample(tuned, brightness, LoRAScaleConfig(num_steps=3, eta=0.0, adapter="-")).info


def test_aig_schedules():
    assert [aig_gamma("power", i, 4, p=2.0) for i in range(4)] == [0, 1 / 16, 1 / 4, 9 / 16]
    assert [aig_gamma("linear", i, 4) for i in range(4)] == [0, 0.25, 0.5, 0.75]
    assert [aig_gamma("step", i, 4, f=0.5) for i in range(4)] == [0, 0, 1, 1]
    assert aig_gamma("power", 0, 4, p=0.0) == 1 and aig_gamma("power", 3, 4, p=math.inf) == 0


def loss_module(backbone, reward, cfg) -> DRaFT:
    """DRaFT's loss alone, without a trainer."""
    module = DRaFT.__new__(DRaFT)
    torch.nn.Module.__init__(module)
    module.backbone, module.reward, module.cfg = backbone, reward, cfg
    return module


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (DRaFTConfig(num_steps=4, k=1, checkpoint=False), [False, False, False, True]),
        (DRaFTConfig(num_steps=4, variant="lv", lv_samples=2), [False] * 4 + [True, True]),
    ],
    ids=["draft_k1", "draft_lv"],
)
def test_only_the_last_step_is_differentiated(tuned, brightness, cfg, expected):
    """DRaFT-K (K=1): gradients through the last sampler step only; DRaFT-LV: through its n re-noised last steps."""
    grad_enabled, original = [], tuned.predict_branches
    tuned.predict_branches = lambda *a, **k: (grad_enabled.append(torch.is_grad_enabled()), original(*a, **k))[1]
    try:
        with torch.enable_grad():
            loss, reward, _ = loss_module(tuned, brightness, cfg).losses(["a cat"], [5])
            loss.backward()
    finally:
        del tuned.predict_branches
    assert grad_enabled == expected and torch.isfinite(loss) and 0 < reward.item() < 1
    grads = [p.grad for p in tuned.unet.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    tuned.unet.zero_grad(set_to_none=True)


def test_adapter_save_then_load_reproduces_samples(tuned, brightness, tmp_path):
    cfg = LoRAScaleConfig(num_steps=3, adapter=str(tmp_path))
    save_lora(tuned, tmp_path)
    reloaded = load_backbone(ModelConfig(kind="sd", tiny=True, resolution=32))
    load_lora(reloaded.unet, tmp_path)
    torch.testing.assert_close(
        sample(reloaded, brightness, cfg).final_image, sample(tuned, brightness, cfg).final_image, rtol=0, atol=1e-6
    )


def test_our_adapter_loads_with_the_diffusers_pipeline_and_changes_its_samples_as_ours(tuned, tmp_path):
    """StableDiffusionPipeline.load_lora_weights reads our adapter file; the pipeline's own sample with it equals our
    sampler's (η = 0, same latents) and differs from the pipeline's sample without it."""
    from framework.models.lora import WEIGHT_NAME
    from framework.models.sampling import sample as run_sampler
    from framework.models.tiny import tiny_sd

    save_lora(tuned, tmp_path)
    pipe = tiny_sd(32)  # the same seeded weights as `tuned` without its adapter
    pipe.scheduler = tuned.scheduler
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn((1, *tuned.latent_shape()), generator=torch.Generator().manual_seed(5))
    options = dict(num_inference_steps=4, guidance_scale=5.0, eta=0.0, output_type="pt", height=32, width=32)
    with torch.no_grad():
        base = pipe(["a cat"], latents=x_T.clone(), **options).images
        pipe.load_lora_weights(str(tmp_path), weight_name=WEIGHT_NAME)
        theirs = pipe(["a cat"], latents=x_T.clone(), **options).images
        ours = tuned.postprocess(
            tuned.decode(run_sampler(tuned, tuned.encode(["a cat"]), x_T, num_steps=4, guidance_scale=5.0).latents)
        )
    assert (theirs - ours).abs().max().item() <= 1e-4  # the pipeline's own loop and image post-processing: float32
    assert (theirs - base).abs().max().item() > 1e-2


def test_a_lora_saved_by_a_diffusers_training_script_loads_as_the_pipeline_loads_it(tmp_path):
    """The format diffusers' LoRA training scripts write (pipeline keys, no metadata, rank from the shapes): our
    loader and the pipeline's give the same UNet."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from framework.models.lora import WEIGHT_NAME
    from framework.models.tiny import tiny_sd

    trained = tiny_sd(32).unet
    trained.add_adapter(LoraConfig(r=3, lora_alpha=3, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    layers = get_peft_model_state_dict(trained)
    layers = {
        k: 0.2 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
        for i, (k, v) in enumerate(sorted(layers.items()))
    }
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=layers, weight_name=WEIGHT_NAME)
    pipe = tiny_sd(32)
    pipe.load_lora_weights(str(tmp_path), weight_name=WEIGHT_NAME)
    ours = load_backbone(ModelConfig(kind="sd", tiny=True, resolution=32))
    load_lora(ours.unet, tmp_path)
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    text = torch.randn((1, 77, ours.unet.config.cross_attention_dim), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, mine = (unet(x, 500, encoder_hidden_states=text).sample for unet in (pipe.unet, ours.unet))
        with adapters_disabled(ours.unet):
            plain = ours.unet(x, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)  # one UNet call, LoRA merged the same way
    assert (mine - plain).abs().max() > 1e-3


def train_log(run_dir, key="train/loss"):
    """Per-step values over every attempt's train/version_*/metrics.csv (a resumed run adds a version)."""
    values = {}
    for path in sorted((run_dir / "train").glob("version_*/metrics.csv")):
        with open(path) as f:
            values |= {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}
    return values


def test_draft_cli_trains_checkpoints_and_resumes_on_the_same_loss_curve(tmp_path):
    args = [
        "method=draft",
        "model=tiny_sd",
        "model.resolution=32",
        "method.num_steps=3",
        "method.train_steps=4",
        "method.save_every=2",
        "method.sample_every=2",
        "method.train_batch_size=2",
        "method.lora_rank=4",
        "method.lr=0.01",
        "prompts=inline",
        "prompts.prompts=[a cat,a dog]",
        "logger=none",
    ]
    full = run_cli(*args, run_dir=tmp_path / "full")
    assert full.returncode == 0, full.stderr
    assert (tmp_path / "full" / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "full" / "samples" / "step000002.png").exists()
    # An interrupted run: only the step-2 checkpoint exists. The rerun resumes from it and trains steps 2 and 3.
    resumed = tmp_path / "resumed"
    interrupted_copy(tmp_path / "full", resumed, 2)
    result = run_cli(*args, run_dir=resumed)
    assert result.returncode == 0, result.stderr
    before, after = train_log(tmp_path / "full"), train_log(resumed)
    assert sorted(after) == [2, 3] and sorted(before) == [0, 1, 2, 3]
    assert [after[s] for s in (2, 3)] == pytest.approx([before[s] for s in (2, 3)], rel=1e-5)
    finals = [
        json.loads((d / "items" / "p0000_s000" / "record.json").read_text())["final_reward"]
        for d in (tmp_path / "full", resumed)
    ]
    assert finals[0] == pytest.approx(finals[1], abs=1e-6)
    # Rerunning a finished run reuses its adapter: nothing is retrained and the training log is kept.
    again = run_cli(*args, run_dir=tmp_path / "full")
    assert again.returncode == 0, again.stderr
    assert train_log(tmp_path / "full") == before
    assert "Epoch" not in again.stdout + again.stderr  # no training loop ran


def test_two_nodes_train_the_same_adapter_as_one_process(tmp_path):
    """DRaFT on 2 "nodes" (torchrun, one process each): each takes half of every global batch and DDP averages the
    gradients, so the adapter equals the single-process one up to the rounding of other batch shapes and of the
    all-reduce's summation order."""
    from safetensors.torch import load_file

    args = [
        "method=draft",
        "model=tiny_sd",
        "model.resolution=32",
        "method.num_steps=3",
        "method.train_steps=3",
        "method.save_every=3",
        "method.sample_every=0",
        "method.train_batch_size=2",
        "method.lora_rank=4",
        "method.lr=0.01",
        "prompts=inline",
        "prompts.prompts=[a cat,a dog]",
        "logger=none",
    ]
    one = run_cli(*args, run_dir=tmp_path / "one")
    nodes = run_nodes(*args, run_dir=tmp_path / "nodes")
    assert one.returncode == 0, one.stderr
    assert [node.returncode for node in nodes] == [0, 0], nodes[0].stderr + nodes[1].stderr
    a, b = (load_file(tmp_path / d / "adapter" / "pytorch_lora_weights.safetensors") for d in ("one", "nodes"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < REBATCHED
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # it did train
    assert len(list((tmp_path / "nodes" / "items").glob("*/record.json"))) == 2  # then sampled, sharded too


def test_draft_raises_the_training_reward_on_the_testbed(tmp_path):
    result = run_cli(
        "method=draft",
        "reward=brightness",
        "method.num_steps=5",
        "method.train_steps=16",
        "method.lr=2e-3",
        "method.save_every=16",
        "method.sample_every=8",
        "prompts.limit=4",
        run_dir=tmp_path / "run",
    )
    assert result.returncode == 0, result.stderr
    # W&B (offline): the training run holds the periodic sample grids, next to the evaluation run
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))) == 2
    rewards = list(train_log(tmp_path / "run", "train/reward").values())
    assert len(rewards) == 16 and sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.02
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_reward_mean"] > summary["base_reward_mean"]
