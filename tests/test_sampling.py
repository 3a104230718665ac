import copy

import pytest
import torch
from conftest import noise_like

from framework.models.sampling import sample

PROMPTS = ["a cat", "a red circle and a blue square"]


def ours_and_pipelines(backbone, num_steps: int, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Our sampler + decode, and diffusers' own pipeline call, from the same noise and steps at the backbone's size."""
    x_T = noise_like((2, *backbone.latent_shape()))
    pipe = copy.copy(backbone.pipe)
    pipe.scheduler = backbone.scheduler
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        traj = sample(backbone, backbone.encode(PROMPTS), x_T, num_steps=num_steps, guidance_scale=guidance_scale)
        ours = backbone.postprocess(backbone.decode(traj.latents))
        reference = pipe(
            PROMPTS,
            latents=x_T.clone(),
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=0.0,
            output_type="pt",
            height=backbone.height,
            width=backbone.width,
        ).images
    return ours, reference


@pytest.mark.parametrize("guidance_scale", [5.0, 0.5, 0.0])
def test_eta0_matches_diffusers_pipeline(tiny_backbone, guidance_scale):
    """Same components, noise and steps: our sampler + decode against diffusers' own pipeline call; below w = 1,
    where the pipeline drops the negative branch (SD-Turbo samples at guidance_scale=0), too."""
    ours, reference = ours_and_pipelines(tiny_backbone, 8, guidance_scale)
    # the pipeline also normalises and denormalises the image: float32 rounding of 8 steps, CFG and a decode
    assert (ours - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_non_square_images_match_diffusers_pipeline(kind):
    """model.height × model.width = 64 × 96: the latent shape and SDXL's size conditioning (time ids) of a
    non-square image, against the pipeline asked for the same size."""
    from framework.config import ModelConfig
    from framework.models import load_backbone

    backbone = load_backbone(ModelConfig(kind=kind, tiny=True, height=64, width=96))
    ours, reference = ours_and_pipelines(backbone, 4, 5.0)
    assert ours.shape == reference.shape == (2, 3, 64, 96)
    assert (ours - reference).abs().max().item() <= 1e-4  # as the square comparison above


@pytest.mark.parametrize("final_step_noise", [True, False])
def test_eta_positive_matches_diffusers_scheduler_steps(tiny_sd, final_step_noise):
    """η > 0 with explicit ξ: against DDIMScheduler.step(..., eta, variance_noise=ξ) on the same ε̂; without final
    step noise the last step is diffusers' step at η = 0 (DNO's sampler), and one ξ fewer is taken."""
    steps, eta = 6, 0.7
    cond = tiny_sd.encode(PROMPTS[:1])
    x_T, noises = noise_like((1, *tiny_sd.latent_shape())), noise_like((steps, 1, *tiny_sd.latent_shape()), 1)
    used = noises if final_step_noise else noises[:-1]
    with torch.no_grad():
        ours = sample(
            tiny_sd, cond, x_T, used, num_steps=steps, eta=eta, guidance_scale=5.0, final_step_noise=final_step_noise
        )
        scheduler = copy.deepcopy(tiny_sd.scheduler)
        scheduler.set_timesteps(steps)
        x = x_T
        for i, t in enumerate(scheduler.timesteps):
            last_plain = i == steps - 1 and not final_step_noise
            x = scheduler.step(
                tiny_sd.predict(x, int(t), cond, 5.0),
                t,
                x,
                eta=0.0 if last_plain else eta,
                variance_noise=None if last_plain else noises[i],
            ).prev_sample
    torch.testing.assert_close(ours.latents, x, rtol=1e-5, atol=1e-4)  # our step vs the scheduler's float32 ops
    assert ours.timesteps == scheduler.timesteps.tolist() and len(ours.predictions) == steps


def test_eta_positive_needs_one_noise_per_step(tiny_sd):
    cond = tiny_sd.encode(PROMPTS[:1])
    with pytest.raises(ValueError, match="one noise per stochastic step"):
        sample(tiny_sd, cond, noise_like((1, *tiny_sd.latent_shape())), num_steps=3, eta=1.0)


def grads(backbone, **options):
    steps = 5
    cond = backbone.encode(PROMPTS[:1])
    x_T = noise_like((1, *backbone.latent_shape())).requires_grad_()
    noises = noise_like((steps, 1, *backbone.latent_shape()), 1).requires_grad_()
    traj = sample(backbone, cond, x_T, noises, num_steps=steps, eta=1.0, guidance_scale=5.0, **options)
    backbone.decode(traj.latents).mean().backward()
    return x_T.grad, noises.grad


def test_checkpointed_and_plain_gradients_agree(tiny_sd):
    with torch.enable_grad():
        plain, checkpointed = grads(tiny_sd, checkpoint=False), grads(tiny_sd, checkpoint=True)
    for a, b in zip(plain, checkpointed):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)  # recomputation reorders reductions in backward


def test_truncated_backprop_gives_zero_gradient_to_early_steps(tiny_sd):
    with torch.enable_grad():
        x_grad, noise_grad = grads(tiny_sd, checkpoint=True, grad_steps=2)
    assert x_grad is None or x_grad.abs().sum() == 0
    per_step = noise_grad.flatten(1).abs().sum(1)
    assert torch.all(per_step[:3] == 0) and torch.all(per_step[3:] > 0)


def test_checkpointing_recomputes_model_calls(tiny_sd):
    """The evaluation counter sees what checkpointing costs: one extra model call per step in backward."""
    with torch.enable_grad():
        before = tiny_sd.num_evals
        grads(tiny_sd, checkpoint=False)
        plain = tiny_sd.num_evals - before
        grads(tiny_sd, checkpoint=True)
        assert tiny_sd.num_evals - before - plain == 2 * plain
