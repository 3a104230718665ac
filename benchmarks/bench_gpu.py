"""The full-size path on a GPU: SD1.5-arch at 512², SDXL-arch, SD3.5-medium-arch, Qwen-Image-arch and FLUX.2-dev-arch
at 1024², CFG 5, η = 1, the HPS-arch reward (ViT-H-14), bfloat16 with random weights (speed and memory do not depend on
their values). Qwen-Image's and FLUX.2's text encoders are offloaded after encoding (model.offload_text_encoder).

    python benchmarks/bench_gpu.py [--model sd15|sdxl|sd35|qwen_image|flux2|all] [--num-steps 50] [--max-batch 16]
                                   [--no-compile]
                                   [--peak-tflops T] [--smoke]                                (make bench-gpu)

a. plain sample and one MIRA / DNO optimisation step at batch 1, timed in the methods' own loop (a run of 2
   optimisation steps minus a run of 1), and the step / sample ratio                 target MIRA ≤ 3.5× (SD1.5)
b. per batch size until memory runs out: per-image MIRA step time (target ≤ 0.3× batch 1 at the best batch),
   peak allocated (SD1.5 ≤ 10 GB and SDXL ≤ 24 GB at batch 1), model FLOP utilisation: the step's FLOPs (torch's
   FLOP counter on the meta device, no recomputation counted) over its time and the device's dense bf16 peak
                                                                                    target ≥ 40 % (SD1.5)
c. the runtime options one at a time (model.vae_checkpointing, unet_checkpointing, channels_last, compile; the text
   encoder kept on the device) and the attention kernel (diffusers' default SDPA vs its classic processor): MIRA step
   time and peak at batch 1
d. the loop a user would write without this framework: diffusers' components, autograd through every step and
   the decoder, nothing checkpointed (Qwen-Image, FLUX.2: our sampler so, the same graph): its peak at the full step
   count, or the most steps that fit
`--smoke` runs every part on the tiny models on the CPU, to check the script itself.
"""

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor
from meta_device import PROMPT, GiB, sample_and_step_flops  # benchmarks/ is the script's directory

from framework.config import ModelConfig
from framework.config.methods import DNOConfig, MIRAConfig
from framework.config.rewards import RewardConfig
from framework.methods import Item, Problem, build_method
from framework.models import load_backbone
from framework.rewards import build_reward

MODELS = {
    "sd15": ("sd", 512),
    "sdxl": ("sdxl", 1024),
    "sd35": ("sd3", 1024),
    "qwen_image": ("qwen_image", 1024),
    "flux2": ("flux2", 1024),
}
OFFLOADED = ("qwen_image", "flux2")  # their LLM encoders (8.3 B, 24 B) leave the device after encoding
OPTIONS = {"vae_checkpointing": False, "unet_checkpointing": True, "channels_last": True, "compile": True}  # ≠ default
# Dense bfloat16 tensor-core peaks (TFLOP/s) by device name; --peak-tflops for any other.
PEAKS = {"H200": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756, "A100": 312, "L40S": 362, "4090": 165}


class Bench:
    def __init__(self, kind: str, resolution: int, num_steps: int, smoke: bool):
        self.kind, self.resolution, self.num_steps, self.smoke = kind, resolution, num_steps, smoke
        self.device = "cpu" if smoke else "cuda"
        self.reward = self._built(
            lambda: build_reward(RewardConfig(name="hps", tiny=smoke, random_weights=not smoke, dtype="bfloat16"))
        )

    def _built(self, build):
        with torch.device(self.device):  # random initialisation on the GPU: seconds, not minutes
            return build()

    def backbone(self, **options):
        size = dict(tiny=True, resolution=64) if self.smoke else dict(random_weights=True, resolution=self.resolution)
        offload = options.pop("offload_text_encoder", self.kind in OFFLOADED)
        backbone = self._built(lambda: load_backbone(ModelConfig(kind=self.kind, dtype="bfloat16", **size, **options)))
        if offload:
            backbone.offload_text_encoders([PROMPT], torch.device(self.device))
        return backbone

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def seconds(self, fn, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    @staticmethod
    def attempt(fn):
        """fn(), or None if the device runs out of memory (its cache then emptied for the next attempt)."""
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None

    def peak(self, fn) -> float:
        """Peak allocated GiB during fn() (0 on the CPU)."""
        if self.device != "cuda":
            fn()
            return 0.0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() / GiB

    def problem(self, backbone, cfg, batch: int) -> Problem:
        return Problem(backbone, self.reward, [Item(i, 0, PROMPT, i) for i in range(batch)], cfg)

    def run(self, backbone, cfg, batch: int) -> None:
        with torch.enable_grad():
            results = build_method(cfg, self.reward).run(self.problem(backbone, cfg, batch))
        assert all(hasattr(r, "steps") for r in results), results  # no item failed (non-finite loss)

    def step(self, backbone, cfg_class, batch: int = 1) -> tuple[float, float]:
        """(Seconds, peak allocated GiB) of one optimisation step in the method's own loop: a run of 2 steps minus a
        run of 1 (after a run of 1 that warms up, compiles and gives the peak)."""
        runs = {n: cfg_class(num_steps=self.num_steps, opt_steps=n) for n in (1, 2)}
        memory = self.peak(lambda: self.run(backbone, runs[1], batch))
        two, one = (self.seconds(lambda n=n: self.run(backbone, runs[n], batch), 1) for n in (2, 1))
        return two - one, memory

    def sample_seconds(self, backbone, batch: int = 1) -> float:
        problem = self.problem(backbone, MIRAConfig(num_steps=self.num_steps, batch_size=batch), batch)
        x_T, noises = problem.noise()
        rows = list(range(batch))
        problem.sample_and_score(x_T, noises, rows)  # warm-up
        return self.seconds(lambda: problem.sample_and_score(x_T, noises, rows))

    def naive_step(self, backbone, steps: int) -> None:
        """Diffusers' UNet (or transformer), scheduler and VAE with autograd through the whole chain, nothing
        checkpointed."""
        if self.kind in OFFLOADED:  # autograd through our sampler and decoder, nothing checkpointed: the same graph
            problem = self.problem(backbone, MIRAConfig(num_steps=steps), 1)
            x_T, noises = problem.noise()
            images, _ = problem.render(x_T.requires_grad_(), noises, checkpoint=False)
            (-problem.score(images).sum()).backward()
            return
        pipe, cond = backbone.pipe, backbone.encode([PROMPT])
        latents = torch.randn(1, *backbone.latent_shape(), device=self.device, requires_grad=True)
        if backbone.flow_matching:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            scheduler.set_timesteps(steps)
            for t in scheduler.timesteps:
                v_u, v_c = pipe.transformer(
                    torch.cat([latents, latents]).to(pipe.transformer.dtype),
                    timestep=t.expand(2).to(self.device),
                    encoder_hidden_states=torch.cat([cond.uncond_embeds, cond.embeds]),
                    pooled_projections=torch.cat([cond.uncond_pooled, cond.pooled]),
                ).sample.chunk(2)
                latents = scheduler.step(v_u + 5.0 * (v_c - v_u), t, latents).prev_sample
            z = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(z.to(pipe.vae.dtype)).sample
            (-self.reward((image.float() / 2 + 0.5).clamp(0, 1), [PROMPT]).sum()).backward()
            return
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        added = None
        if backbone.is_sdxl:
            added = {
                "text_embeds": torch.cat([cond.uncond_pooled, cond.pooled]),
                "time_ids": cond.time_ids.repeat(2, 1),
            }
        for t in scheduler.timesteps:
            eps_u, eps_c = pipe.unet(
                torch.cat([latents, latents]).to(pipe.unet.dtype),
                t,
                encoder_hidden_states=torch.cat([cond.uncond_embeds, cond.embeds]),
                added_cond_kwargs=added,
            ).sample.chunk(2)
            latents = scheduler.step(eps_u + 5.0 * (eps_c - eps_u), t, latents, eta=1.0).prev_sample
        image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        (-self.reward((image.float() / 2 + 0.5).clamp(0, 1), [PROMPT]).sum()).backward()

    def naive(self) -> str:
        """The naive loop's peak at the full step count, or the most steps that fit (bisection)."""
        backbone = self.backbone(vae_checkpointing=False)

        def fits(steps: int) -> float | None:
            return self.attempt(lambda: self.peak(lambda: self.naive_step(backbone, steps)))

        full = fits(self.num_steps)
        if full is not None:
            return f"{full:.1f} GiB at {self.num_steps} steps"
        low, high = 0, self.num_steps  # fits(low), not fits(high)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) is not None else (low, mid)
        return f"out of memory at {self.num_steps} steps; at most {low} steps fit"


def device_peak_flops(requested: float | None) -> float | None:
    if requested:
        return requested * 1e12
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((tflops * 1e12 for key, tflops in PEAKS.items() if key in name), None)


def bench_model(name: str, args) -> None:
    kind, resolution = MODELS[name]
    bench = Bench(kind, resolution, args.num_steps, args.smoke)
    backbone = bench.backbone()
    print(f"\n{f'tiny {kind}, CPU (smoke)' if args.smoke else f'{name}-arch {resolution}²'}, {args.num_steps} steps")
    step_flops = None if args.smoke else sample_and_step_flops(kind, resolution, args.num_steps)[1]
    peak_flops = device_peak_flops(args.peak_tflops)
    print("b. batch   per-image MIRA step   vs batch 1   peak allocated   MFU")
    batch, alone = 1, None
    while batch <= args.max_batch:
        measured = bench.attempt(lambda: bench.step(backbone, MIRAConfig, batch))
        if measured is None:
            print(f"   {batch:5}   out of memory")
            break
        seconds, memory = measured
        per_image = seconds / batch
        alone = alone or (per_image, memory)
        mfu = f"{step_flops / per_image / peak_flops:.0%}" if step_flops and peak_flops else "n/a"
        print(f"   {batch:5}   {per_image:15.2f} s   {per_image / alone[0]:10.2f}   {memory:10.1f} GiB   {mfu}")
        batch *= 2
    alone = alone or (float("nan"), float("nan"))  # not even batch 1 fits with the defaults: see c.
    sample, dno = bench.sample_seconds(backbone), bench.attempt(lambda: bench.step(backbone, DNOConfig)[0])
    mira = alone[0]
    print(
        f"a. plain sample {sample:.2f} s; MIRA step {mira:.2f} s ({mira / sample:.2f}× the sample); "
        + ("DNO step: out of memory" if dno is None else f"DNO step {dno:.2f} s ({dno / sample:.2f}×)")
    )
    print(
        f"c. option (one at a time)          MIRA step     peak\n   {'defaults':32} {mira:7.2f} s  {alone[1]:7.1f} GiB"
    )
    variants = [(f"{key}={value}".lower(), {key: value}) for key, value in OPTIONS.items()]
    variants = [v for v in variants if not (args.no_compile and "compile" in v[1])]
    if kind in ("sd", "sdxl"):  # the flow models' joint attention has no pre-SDPA processor to compare with
        variants.append(("classic attention", {}))
    if kind in OFFLOADED:
        variants.append(("text encoder kept on the device", {"offload_text_encoder": False}))
    backbone = None  # free the device for the variants
    for label, options in variants:
        variant = bench.backbone(**options)
        if label == "classic attention":  # diffusers' processor before SDPA: the attention matrix materialised
            variant.unet.set_attn_processor(AttnProcessor())
            variant.vae.set_attn_processor(AttnProcessor())
        measured = bench.attempt(lambda: bench.step(variant, MIRAConfig))
        shown = "out of memory" if measured is None else f"{measured[0]:7.2f} s  {measured[1]:7.1f} GiB"
        print(f"   {label:32} {shown}")
        variant = None
    print(f"d. naive loop (diffusers' components, no checkpointing): {bench.naive()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for minutes)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script only")
    args = parser.parse_args()
    if args.smoke:
        args.num_steps, args.max_batch, args.no_compile = 2, 2, True
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (benchmarks/bench_full_size.py runs on any machine)")
    else:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in MODELS if args.model == "all" else [args.model]:
        bench_model(name, args)


if __name__ == "__main__":
    main()
