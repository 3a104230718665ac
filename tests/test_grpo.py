"""GRPO (framework.methods.grpo) against the published formulas, written out here independently of our sampler: the
SDE step of Flow-GRPO and DDPO's DDIM step, the Gaussian log-probability, the clipped ratio, clipped advantages and
the per-step KL to the base model; and from the CLI on the testbed, the tiny families and a black-box reward."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import interrupted_copy, run_cli, run_nodes
from omegaconf import OmegaConf

from framework.config import ModelConfig
from framework.config.methods import GRPOConfig
from framework.methods.common import draw_noise
from framework.methods.grpo import GRPO, group_advantages
from framework.models import load_backbone
from framework.rewards.base import Reward

PROMPTS = ["a cat", "a red circle"]


class Brightness(Reward):
    def score(self, images, prompts):
        return images.mean((1, 2, 3))


class Constant(Reward):
    """The same reward for every image of a prompt: no group has spread."""

    def score(self, images, prompts):
        return torch.tensor([float(len(p)) for p in prompts])


def grpo(backbone, reward, tmp_path, **options) -> GRPO:
    cfg = GRPOConfig(**dict(rollout_steps=3, group_size=3, prompts_per_epoch=2, lora_rank=2) | options)
    module = GRPO(backbone, reward, OmegaConf.structured(cfg), PROMPTS, 0, tmp_path)
    module._trainer = SimpleNamespace(world_size=1, global_rank=0)  # what rollouts read of their trainer
    for name, parameter in backbone.denoiser.named_parameters():  # a non-zero adapter: θ differs from the base
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(1))
    return module


def published_mean(backbone, x, t_index, pred, eta, num_steps):
    """The mean of one stochastic step from the papers' formulas. Flow-GRPO (eq. 9, σ_t = a√(t/(1−t)), the first
    step's 1−t read at the next t as its code does): x + [v + σ_t²/(2t)(x + (1−t)v)]Δt with Δt = t' − t < 0. DDPO
    (DDIM, Song et al. eq. 12): √ᾱ' x̂0 + √(1−ᾱ'−σ²) ε, σ = η√((1−ᾱ')/(1−ᾱ))√(1−ᾱ/ᾱ')."""
    schedule = backbone.schedule(num_steps)
    _, a, b = schedule[t_index]
    if backbone.flow_matching:
        t, t_next = a, b
        denominator = 1 - (schedule[1][1] if t >= 1 else t)
        std_sde = eta * math.sqrt(t / denominator)
        mean = x + (pred + std_sde**2 / (2 * t) * (x + (1 - t) * pred)) * (t_next - t)
        return mean, std_sde * math.sqrt(t - t_next)
    alpha, alpha_prev = a, b
    sigma = eta * math.sqrt((1 - alpha_prev) / (1 - alpha)) * math.sqrt(1 - alpha / alpha_prev)
    x0 = (x - math.sqrt(1 - alpha) * pred) / math.sqrt(alpha)
    return math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev - sigma**2) * pred, sigma


@pytest.fixture(params=["sd", "sd3"])  # a fresh model per test: each adds its adapter
def backbone(request):
    return load_backbone(ModelConfig(kind=request.param, tiny=True, resolution=32, max_sequence_length=None))


@pytest.mark.parametrize("timesteps", ["first", "window"])
def test_rollout_log_probabilities_and_updates_equal_the_published_formulas(backbone, timesteps, tmp_path):
    """At the first inner step ρ = 1 exactly (the recorded log π equals the recomputed one); after an update moves θ,
    ρ ≠ 1 and the clip is active. Both times the loss and its gradient equal the formulas'. Every step trained, or
    MixGRPO's window of the last two at epoch 1."""
    options = dict(timestep_fraction=1.0, timesteps=timesteps, window_size=2, window_shift_every=1)
    module = grpo(backbone, Brightness(), tmp_path, kl_weight=0.5, clip_range=1e-5, adv_clip_max=0.8, **options)
    epoch = 1
    trained = module.trained_steps(epoch)
    assert trained == ([0, 1, 2] if timesteps == "first" else [1, 2])
    rollout = module.rollout([p for p in PROMPTS for _ in range(3)], list(range(6)), epoch)
    cfg, eta = module.cfg, module.cfg.noise_level
    assert rollout.advantages.abs().max() <= 0.8 + 1e-6 and rollout.advantages.abs().max() > 0.5  # clipped

    def log_density(x_next, mean, std):
        return (-((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean((1, 2, 3))

    def step_terms(j, i, adapters=True):
        """Mean and std of sampler step i from the rollout's j-th recorded x_t."""
        x, t = rollout.x[j], backbone.schedule(cfg.rollout_steps)[i][0]
        if adapters:
            pred, _ = backbone.predict_branches(x, t, rollout.cond, cfg.guidance_scale)
        else:
            with torch.no_grad(), backbone.adapters_disabled():
                pred, _ = backbone.predict_branches(x, t, rollout.cond, cfg.guidance_scale)
        return published_mean(backbone, x, i, pred, eta, cfg.rollout_steps)

    with torch.no_grad():  # log π_old from the formulas, at the rollout's θ
        old = [log_density(rollout.x_next[j], *step_terms(j, i)) for j, i in enumerate(trained)]

    def reference_loss():
        """Mean over steps of mean over images of max(−Aρ, −A clip(ρ)) + β KL; log π and the KL are means over the
        latent's entries."""
        total = 0
        for j, i in enumerate(trained):
            mean, std = step_terms(j, i)
            ratio = torch.exp(log_density(rollout.x_next[j], mean, std) - old[j])
            a = rollout.advantages
            policy = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)).mean()
            kl = ((mean - step_terms(j, i, adapters=False)[0]) ** 2).mean((1, 2, 3)).mean() / (2 * std**2)
            total = total + (policy + cfg.kl_weight * kl) / len(trained)
        return total

    def compare(first: bool):
        steps, ours, clipped = module.steps(epoch), 0, 0
        for j, i in enumerate(trained):
            loss, stats = module.step_loss(rollout, j, steps[i])
            if first:
                assert stats["approx_kl"] == 0 and stats["clip_fraction"] == 0  # ρ = 1 exactly
            clipped += stats["clip_fraction"]
            ours = ours + loss / len(trained)
        theirs = reference_loss()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        grads = torch.autograd.grad(ours, module.trainable)
        assert sum(g.abs().sum() for g in grads) > 0
        for g, r in zip(grads, torch.autograd.grad(theirs, module.trainable)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        return clipped

    compare(first=True)
    with torch.no_grad():  # an update: θ moves away from the rollout's
        for parameter in module.trainable:
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    assert compare(first=False) > 0  # the clip acts


def test_the_mixgrpo_window_slides_and_only_its_steps_are_stochastic(tmp_path):
    """Window of 2 of 4 steps moving 1 step every 2 epochs, up to the last step; at epoch 2 (window 1–2) step 0 is
    the deterministic step of the formulas (η = 0) from the rollout's x_T, and step 3 is deterministic too."""
    backbone = load_backbone(ModelConfig(kind="sd3", tiny=True, resolution=32, max_sequence_length=None))
    options = dict(timesteps="window", window_size=2, window_shift_every=2, rollout_steps=4)
    module = grpo(backbone, Brightness(), tmp_path, **options)
    assert [module.window(e) for e in (0, 1, 2, 3, 4, 9)] == [(0, 2), (0, 2), (1, 3), (1, 3), (2, 4), (2, 4)]
    assert [step.std > 0 for step in module.steps(2)] == [False, True, True, False]
    prompts, seeds = [p for p in PROMPTS for _ in range(3)], list(range(6))
    rollout = module.rollout(prompts, seeds, 2)
    x_T, _ = draw_noise(backbone, module.rollout_sampler, seeds)
    t = backbone.schedule(4)[0][0]
    with torch.no_grad():
        pred, _ = backbone.predict_branches(x_T, t, rollout.cond, module.cfg.guidance_scale)
    torch.testing.assert_close(rollout.x[0], published_mean(backbone, x_T, 0, pred, 0.0, 4)[0])


def test_a_reward_constant_within_every_group_gives_no_policy_gradient(tmp_path):
    backbone = load_backbone(ModelConfig(kind="sd", tiny=True, resolution=32))
    module = grpo(backbone, Constant(), tmp_path, kl_weight=0.0)
    rollout = module.rollout([p for p in PROMPTS for _ in range(3)], list(range(6)), 0)
    assert torch.equal(rollout.advantages, torch.zeros(6))
    loss, _ = module.step_loss(rollout, 0, module.steps(0)[0])
    assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, module.trainable))


def test_advantages_per_group_over_the_batch_and_pairwise():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    group = group_advantages(rewards, 3, "group", global_std=False, clip=5.0)
    torch.testing.assert_close(group[:3], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4))
    batch = group_advantages(rewards, 3, "batch", global_std=True, clip=100.0)
    torch.testing.assert_close(batch, (rewards - rewards.mean()) / (rewards.std() + 1e-4))
    # win rates within each group (ties ½): [0, ½, 1] and [¼, ¼, 1], then standardised per group
    pairwise = group_advantages(rewards, 3, "pairwise", global_std=False, clip=5.0)
    wins = torch.tensor([[0.0, 0.5, 1.0], [0.25, 0.25, 1.0]])
    expected = (wins - wins.mean(1, keepdim=True)) / (wins.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(pairwise, expected.flatten())
    # a Bradley–Terry reward at scale 2: i's win over j is σ((r_i − r_j)/2)
    soft = group_advantages(rewards[:3], 3, "pairwise", global_std=False, clip=5.0, bradley_terry=2.0)
    s = lambda gap: 1 / (1 + math.exp(-gap / 2))  # noqa: E731
    wins = torch.tensor([s(-1) + s(-2), s(1) + s(-1), s(2) + s(1)]) / 2
    torch.testing.assert_close(soft, (wins - wins.mean()) / (wins.std() + 1e-4))


def test_grpo_on_the_testbed_from_the_cli_and_a_bad_batch_is_refused(tmp_path):
    """The testbed model (an ε-UNet: DDIM η > 0 rollouts) and the brightness reward; the flow families and a black-box
    reward run in tests/test_flow.py."""
    args = ["method=grpo", "method.train_steps=2", "method.group_size=2", "method.rollout_steps=3"]
    args += ["method.num_steps=4", "method.lora_rank=2", "method.sample_every=1", "prompts.limit=1", "logger=none"]
    result = run_cli(*args, run_dir=tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "samples" / "step000001.png").is_file()
    with open(tmp_path / "run" / "train" / "version_0" / "metrics.csv") as f:
        header = f.readline()
    assert all(k in header for k in ("train/clip_fraction", "train/kl_base", "train/zero_spread", "train/reward_std"))
    refused = run_cli(*args, "method.prompts_per_epoch=3", "trainer.devices=2", run_dir=tmp_path / "bad")
    assert refused.returncode == 2 and "method.prompts_per_epoch=3 is not valid" in refused.stderr
    window = run_cli(*args, "method.timesteps=window", "method.window_size=4", run_dir=tmp_path / "bad")
    assert window.returncode == 2 and "method.window_size=4 is not valid" in window.stderr


# the testbed model: its images' rewards spread within a group (a tiny random model's barely do, and Adam turns the
# rounding of near-zero gradients into sign flips)
GRPO_RUN = ["method=grpo", "method.rollout_steps=3", "method.num_steps=3", "method.group_size=2"]
GRPO_RUN += ["method.prompts_per_epoch=2", "method.lora_rank=2", "method.lr=0.01", "method.sample_every=0"]
GRPO_RUN += ["prompts=inline", "prompts.prompts=[a red circle,a blue square]", "logger=none"]


def adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "pytorch_lora_weights.safetensors")


def test_a_killed_grpo_run_resumes_to_the_same_adapter(tmp_path):
    """Only the step-2 checkpoint of a 4-epoch run survives: the rerun restores adapter and optimiser from it and, the
    epochs' prompts and noises deriving from (seed, epoch, row), trains epochs 2 and 3 into the same adapter."""
    args = [*GRPO_RUN, "method.train_steps=4", "method.save_every=2"]
    full = run_cli(*args, run_dir=tmp_path / "full")
    assert full.returncode == 0, full.stderr
    resumed = tmp_path / "resumed"
    interrupted_copy(tmp_path / "full", resumed, 2)
    result = run_cli(*args, run_dir=resumed)
    assert result.returncode == 0, result.stderr
    a, b = adapter(tmp_path / "full"), adapter(resumed)
    assert a.keys() == b.keys() and max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-4  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_two_nodes_train_the_same_grpo_adapter_as_one_process(tmp_path):
    """Each of 2 "nodes" samples one prompt group; rewards are gathered for the global std and DDP averages the
    gradients, so the adapter equals the single-process one to the rounding of other batch shapes. Adam turns that
    rounding into a visible step on the few entries whose gradient is near zero (its first steps are ±lr whatever
    the gradient's size), so the comparison is over all entries: on average they agree to 10⁻³ of the adapter's
    size (measured: 2·10⁻⁵ of it). Advantages from each node's own rewards, without the gather, miss by 0.16 of it."""
    args = [*GRPO_RUN, "method.train_steps=2", "method.save_every=2"]
    one = run_cli(*args, run_dir=tmp_path / "one")
    nodes = run_nodes(*args, run_dir=tmp_path / "nodes")
    assert one.returncode == 0, one.stderr
    assert [node.returncode for node in nodes] == [0, 0], nodes[0].stderr + nodes[1].stderr
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "nodes")
    trained = torch.cat([a[k].flatten() for k in a if "lora_B" in k]).abs().mean()
    assert trained > 1e-3  # it trained
    assert torch.cat([(a[k] - b[k]).flatten() for k in a]).abs().mean() < 1e-3 * trained


def test_grpo_fine_tunes_the_tiny_unets_on_a_black_box_reward_from_the_cli(tmp_path):
    """SD1.x and SDXL (DDIM at η > 0, DDPO's policy) on JPEG compressibility, which has no gradient: a diffusers-format
    UNet adapter that moved, then every item sampled with it."""
    import json

    args = ["--multirun", "model=tiny_sd,tiny_sdxl", "method=grpo", "reward=jpeg", "method.train_steps=1"]
    args += ["method.group_size=4", "method.prompts_per_epoch=1", "method.rollout_steps=2", "method.num_steps=2"]
    args += ["method.lora_rank=2", "method.lr=0.01", "prompts=inline", "prompts.prompts=[a cat]", "logger=none"]
    result = run_cli(*args, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(tmp_path.glob("*/summary.json"))
    assert len(runs) == 2
    for summary in runs:
        assert json.loads(summary.read_text())["num_ok"] == 1
        weights = adapter(summary.parent)
        assert all(k.startswith("unet.") for k in weights)
        assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0  # one update moved it
