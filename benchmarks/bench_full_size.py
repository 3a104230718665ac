"""The full-size path (SD1.5, SDXL, SD3.5-medium, FLUX.1-dev, Qwen-Image and FLUX.2-dev architectures, HPS's
ViT-H-14 reward) measured on any machine, no GPU needed.

    python benchmarks/bench_full_size.py [--model sd15|sdxl|sd35|flux|qwen_image|flux2|all] [--proxy-only | --no-proxy]
                                                                                                        (make bench)

7. peak memory of one MIRA step at full size, bfloat16, CFG 5, counted on the meta device (benchmarks/meta_device.py):
   SD1.5 at 512², SDXL, SD3.5 medium, FLUX.1-dev, Qwen-Image and FLUX.2-dev at 1024², with each memory option, at batch
   1 and more, 50 vs 10 steps; Qwen-Image's and FLUX.2's text encoders offloaded, and what keeping them adds; and the
   naive loop (autograd through the whole chain, no checkpointing)       targets (GiB): SD1.5 ≤ 10, SDXL ≤ 24
8. FLOPs of a plain 50-step sample and of a MIRA step (torch's FLOP counter, meta device): the MFU numerator
9. CPU proxy: SD1.5-arch at 64 px with the HPS-arch reward, one MIRA step end to end at 10 and 50 steps, computed
   for real (fresh process each): seconds and peak RSS growth                                  target ≤ 1.2
10. peak memory of one GRPO update (the loss over the 9 trained steps of a 10-step rollout and its backward, LoRA
   rank 8, CFG 5) at 1024², bfloat16, meta device: SD3.5 medium, FLUX.1-dev and Qwen-Image, batch 1 and 4
"""

import argparse
import time

import torch
from bench_sampler import in_fresh_process, peak_of  # benchmarks/ is the script's directory
from meta_device import (
    LLM_CONDITIONED,
    PROMPT,
    GiB,
    meta_problem,
    peak_grpo_update_memory,
    peak_step_memory,
    sample_and_step_flops,
    text_encoder_bytes,
    weight_bytes,
)

MODELS = {
    "sd15": ("SD1.5-arch 512²", "sd", 512),
    "sdxl": ("SDXL-arch 1024²", "sdxl", 1024),
    "sd35": ("SD3.5-arch 1024²", "sd3", 1024),
    "flux": ("FLUX.1-dev-arch 1024²", "flux", 1024),
    "qwen_image": ("Qwen-Image-arch 1024²", "qwen_image", 1024),
    "flux2": ("FLUX.2-dev-arch 1024²", "flux2", 1024),
}


def memory_table(num_steps: int, models: list[str]) -> None:
    print("7. peak memory of a MIRA step (weights + the step's own tensors), bfloat16, meta device")
    print(f"   {'model':18} {'options':44} {'batch':>5} {'steps':>5} {'weights':>9} {'step':>9} {'total':>9}")
    rows = [
        ({}, 1, num_steps),
        ({}, 1, 10),
        ({"vae_checkpointing": False}, 1, 10),
        ({"unet_checkpointing": True}, 1, 10),
        ({}, 4, 10),
        ({"unet_checkpointing": True}, 4, 10),
    ]
    for label, kind, resolution in (MODELS[name] for name in models):
        # The largest models: the rows that matter at their size (the step-count and VAE rows of the others hold for
        # them too; Qwen-Image's VAE cannot be checkpointed), as each accounting takes minutes.
        llm_rows = [r for r in rows if r[2] == 10 and "vae_checkpointing" not in r[0]]
        for options, batch, steps in llm_rows if kind in LLM_CONDITIONED else rows:
            problem = meta_problem(kind, resolution, batch, steps, **options)
            weights, step = weight_bytes(problem), peak_step_memory(problem)
            if (options, batch, steps) == ({}, 1, 10):
                one_step = step
            shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
            print(
                f"   {label:18} {shown:44} {batch:5} {steps:5} {weights / GiB:6.1f}GiB {step / GiB:6.1f}GiB "
                f"{(weights + step) / GiB:6.1f}GiB"
            )
        if kind in LLM_CONDITIONED:  # their rows above are offloaded (model.offload_text_encoder=true)
            encoder = text_encoder_bytes(kind)
            print(
                f"   {label:18} rows above with the text encoder offloaded; kept on the device it adds "
                f"{encoder / GiB:.1f} GiB (batch 1, 10 steps: {(weights + encoder + one_step) / GiB:.1f} GiB)"
            )
        # The naive loop keeps every step's activations: its memory is affine in the step count.
        at = {s: peak_step_memory(meta_problem(kind, resolution, 1, s, vae_checkpointing=False), False) for s in (2, 4)}
        per_step = (at[4] - at[2]) / 2
        naive = {s: weights + at[2] + (s - 2) * per_step for s in (1, num_steps)}
        fits = {card: int((card * GiB - weights - at[2]) // per_step) + 2 for card in (24, 80, 141)}
        print(
            f"   {label:18} naive loop: {naive[1] / GiB:.1f} GiB at 1 step, +{per_step / GiB:.2f} GiB per step, "
            f"{naive[num_steps] / GiB:.0f} GiB at {num_steps}; fits 24 GiB up to {max(fits[24], 0)} steps, "
            f"80 GiB up to {max(fits[80], 0)}, 141 GiB up to {max(fits[141], 0)}"
        )


GRPO_MODELS = ("sd35", "flux", "qwen_image")


def grpo_memory_table(models: list[str]) -> None:
    print("\n10. peak memory of a GRPO update (weights + the update's own tensors), bfloat16, meta device")
    print(f"   {'model':22} {'options':26} {'batch':>5} {'weights':>9} {'update':>9} {'total':>9}")
    for label, kind, resolution in (MODELS[name] for name in GRPO_MODELS if name in models):
        for options, batch in (({}, 1), ({"unet_checkpointing": True}, 1), ({"unet_checkpointing": True}, 4)):
            problem = meta_problem(kind, resolution, batch, 10, **options)
            weights, update = weight_bytes(problem), peak_grpo_update_memory(problem)
            shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
            print(
                f"   {label:22} {shown:26} {batch:5} {weights / GiB:6.1f}GiB {update / GiB:6.1f}GiB "
                f"{(weights + update) / GiB:6.1f}GiB"
            )


def flop_table(num_steps: int, models: list[str]) -> None:
    print(f"\n8. FLOPs at batch 1, {num_steps} steps (model FLOPs: no recomputation counted)")
    for label, kind, resolution in (MODELS[name] for name in models):
        sample, step = sample_and_step_flops(kind, resolution, num_steps)
        print(f"   {label:18} plain sample {sample / 1e12:7.1f} TFLOP   MIRA step {step / 1e12:7.1f} TFLOP")


def _proxy_child(num_steps: int, resolution: int, queue) -> None:
    from framework.config import ModelConfig
    from framework.config.methods import MIRAConfig
    from framework.config.rewards import RewardConfig
    from framework.methods import Item, Problem, build_method
    from framework.models import load_backbone
    from framework.rewards import build_reward

    backbone = load_backbone(ModelConfig(kind="sd", random_weights=True, resolution=resolution))
    reward = build_reward(RewardConfig(name="hps", random_weights=True))
    cfg = MIRAConfig(num_steps=num_steps, opt_steps=1, beta=1.0)
    method = build_method(cfg, reward)

    def one_step():
        with torch.enable_grad():
            (result,) = method.run(Problem(backbone, reward, Item(0, 0, PROMPT, 0), cfg))
        assert result.steps[0]["grad_norm"] > 0

    start = time.perf_counter()
    peak, baseline = peak_of(one_step, "cpu")
    queue.put((time.perf_counter() - start, peak, baseline))


def cpu_proxy(resolution: int) -> None:
    print(f"\n9. CPU proxy: SD1.5-arch at {resolution} px, HPS-arch reward (float32), one MIRA step + final sample")
    measured = {s: in_fresh_process(_proxy_child, s, resolution) for s in (10, 50)}
    for steps, (seconds, peak, baseline) in measured.items():
        print(
            f"   {steps:2} steps: {seconds:6.1f} s, peak RSS {peak / GiB:.2f} GiB ({baseline / GiB:.2f} GiB loaded, "
            f"+{(peak - baseline) / GiB:.2f} GiB in the step)"
        )
    ratio = measured[50][1] / measured[10][1]
    growth = (measured[50][1] - measured[50][2]) / (measured[10][1] - measured[10][2])
    print(f"   peak memory 50 / 10 steps: {ratio:.2f} (the step's own growth: {growth:.2f})   target ≤ 1.2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all", help="the models of tables 7 and 8")
    parser.add_argument("--proxy-resolution", type=int, default=64)
    parser.add_argument("--proxy-only", action="store_true")
    parser.add_argument("--no-proxy", action="store_true")
    parser.add_argument("--grpo-only", action="store_true", help="table 10 only")
    args = parser.parse_args()
    models = list(MODELS) if args.model == "all" else [args.model]
    if args.grpo_only:
        return grpo_memory_table(models)
    if not args.proxy_only:
        memory_table(args.num_steps, models)
        flop_table(args.num_steps, models)
        grpo_memory_table(models)
    if not args.no_proxy:
        cpu_proxy(args.proxy_resolution)


if __name__ == "__main__":
    main()
