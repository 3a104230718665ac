"""Train the testbed: `python -m framework.tools.train_testbed [--out DIR] [--vae-steps N] [--judge-steps N]
[--unet-steps N]`. Stages: an autoencoder (32×32 RGB ↔ 4×16×16 latents), the ground-truth judge, then the UNet and
text encoder with the ε-prediction loss on SD's noise schedule, 10 % empty captions for classifier-free guidance.
Writes a StableDiffusionPipeline directory (safetensors, float16) and judge.safetensors, then reports the judge's
accuracy and the model's ground-truth adherence. Everything is generated procedurally: no data to download.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from framework.core.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer
from framework.models.tiny import sd_scheduler
from framework.testbed import JUDGE_FILE, MODEL_DIR, shapes
from framework.testbed.judge import Judge

MAX_TOKENS = 8  # captions are "a {colour} {shape}": 5 tokens with start/end


def build_components():
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=shapes.SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=shapes.SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return vae, text_encoder, unet


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


def fit(
    stage: str,
    params,
    steps: int,
    peak_lr: float,
    loss_at,
    warmup: int = 100,
    clip: float | None = None,
    log_every: int = 200,
) -> None:
    """The one optimisation loop of every stage: AdamW (torch defaults), linear warm-up, cosine decay."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=peak_lr)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup)
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            print(
                f"[{stage}] step {step}/{steps} loss {loss.item():.5f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


def train_vae(vae: AutoencoderKL, steps: int, batch: int, generator: torch.Generator) -> float:
    """Reconstruction + a small KL term; returns the latent scaling factor (1 / std of latent means)."""

    def loss_at(step):
        x = shapes.sample(batch, generator).images * 2 - 1
        posterior = vae.encode(x).latent_dist
        return F.mse_loss(vae.decode(posterior.sample(generator)).sample, x) + 1e-6 * posterior.kl().mean()

    fit("vae", vae.parameters(), steps, 2e-3, loss_at)
    with torch.no_grad():
        means = vae.encode(shapes.sample(512, generator).images * 2 - 1).latent_dist.mean
    return float(1 / means.std())


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild noise and blur, so the judge also reads generated (slightly imperfect) images."""
    noise = 0.05 * torch.rand(len(images), 1, 1, 1, generator=generator)
    images = images + noise * torch.randn(images.shape, generator=generator)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(len(images), 1, 1, 1, generator=generator) * 0.5
    return (images * (1 - mix) + blurred * mix).clamp(0, 1)


def train_judge(judge: Judge, steps: int, batch: int, generator: torch.Generator) -> None:
    def loss_at(step):
        b = shapes.sample(batch, generator)
        color_logits, shape_logits = judge(augment(b.images, generator))
        return F.cross_entropy(color_logits, b.colors) + F.cross_entropy(shape_logits, b.shapes)

    fit("judge", judge.parameters(), steps, 3e-3, loss_at)


def train_unet(
    vae, text_encoder, unet, tokenizer, scaling: float, steps: int, batch: int, generator: torch.Generator
) -> None:
    alphas = sd_scheduler().alphas_cumprod

    def loss_at(step):
        b = shapes.sample(batch, generator)
        captions = [c if torch.rand(1, generator=generator) > 0.1 else "" for c in b.captions]
        with torch.no_grad():
            latents = vae.encode(b.images * 2 - 1).latent_dist.mean * scaling
        tokens = tokenizer(
            captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        t = torch.randint(0, len(alphas), (batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, text_encoder(tokens)[0]).sample
        return F.mse_loss(pred, noise)

    fit(
        "unet",
        [*unet.parameters(), *text_encoder.parameters()],
        steps,
        1e-3,
        loss_at,
        warmup=200,
        clip=1.0,
        log_every=250,
    )


@torch.no_grad()
def judge_accuracy(judge: Judge, n: int = 2000) -> float:
    b = shapes.sample(n, torch.Generator().manual_seed(12345))
    colors, kinds = judge(b.images)
    return ((colors.argmax(1) == b.colors) & (kinds.argmax(1) == b.shapes)).float().mean().item()


def provenance(args: argparse.Namespace) -> dict:
    """The command that produced the report and its arguments, paths relative to the directory it ran in (the
    repository root): the report ships inside the package, so no path of the machine that trained it."""

    def portable(value):
        return os.path.relpath(value.resolve(), Path.cwd()) if isinstance(value, Path) else str(value)

    options = {k: portable(v) for k, v in vars(args).items()}
    command = " ".join(
        ["python -m framework.tools.train_testbed", *(f"--{k.replace('_', '-')} {v}" for k, v in options.items())]
    )
    return {"command": command, "args": options}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--judge-out", type=Path, default=JUDGE_FILE)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--judge-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seeds", type=int, default=8, help="samples per caption in the final evaluation")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vae, text_encoder, unet = build_components()
    tokenizer = build_clip_tokenizer(max_length=MAX_TOKENS)

    scaling = train_vae(vae, args.vae_steps, args.batch, generator)
    vae.register_to_config(scaling_factor=scaling)
    judge = Judge()
    train_judge(judge, args.judge_steps, 128, generator)
    args.judge_out.parent.mkdir(parents=True, exist_ok=True)
    save_file(judge.state_dict(), args.judge_out)
    train_unet(vae, text_encoder, unet, tokenizer, scaling, args.unet_steps, args.batch, generator)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    minutes = (time.perf_counter() - started) / 60

    from framework.tools.evaluate_testbed import evaluate_adherence

    report = {
        "train_minutes": round(minutes, 1),
        "judge_accuracy": judge_accuracy(judge.eval()),
        **evaluate_adherence(args.out, args.judge_out, seeds=args.eval_seeds),
        **provenance(args),
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "per_caption"}, indent=1))


if __name__ == "__main__":
    main()
