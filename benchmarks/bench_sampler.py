"""Speed and memory ratios of the sampler and of a DNO step, measured in one run (no absolute-time claims).

    python benchmarks/bench_sampler.py [--repeats 5]     (make bench)

1. our sampler (encode + DDIM + decode) vs diffusers' pipeline call on the same components      target ≤ 1.0
2. one DNO optimisation step (checkpointed) vs one plain sample, at 10 and 50 sampler steps     target ≤ 4.0
3. peak memory of a DNO step at 50 vs 10 steps (fresh process each; CPU: peak RSS; CUDA: max allocated), and
   the bytes autograd holds for backward at 50 vs 10 steps                                     target ≤ 1.2
4. a MIRA item vs a DNO item with the same budget (same model evaluations)                    target ≤ 1.05
"""

import argparse
import copy
import multiprocessing as mp
import os
import statistics
import time

import torch

import framework  # noqa: F401  (torchvision workaround)
from framework.config import ModelConfig
from framework.config.methods import DNOConfig
from framework.config.rewards import RewardConfig
from framework.methods import Item, Problem
from framework.models import load_backbone
from framework.rewards import build_reward


def seconds(fn) -> float:
    """Wall time of one call, the GPU's queue drained."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired(fn_a, fn_b, repeats: int) -> tuple[float, float, float]:
    """Median ratio a/b over interleaved pairs (robust to the machine's speed drifting during the run), and the
    median seconds of each."""
    fn_a(), fn_b()  # warm-up
    pairs = [(seconds(fn_a), seconds(fn_b)) for _ in range(repeats)]
    return (
        statistics.median(a / b for a, b in pairs),
        statistics.median(a for a, _ in pairs),
        statistics.median(b for _, b in pairs),
    )


def setup(device: str, num_steps: int):
    backbone = load_backbone(ModelConfig(kind="sd", tiny=True, resolution=64)).to(device)
    reward = build_reward(RewardConfig(name="brightness"))
    problem = Problem(backbone, reward, Item(0, 0, "a photo of a cat", 0), DNOConfig(num_steps=num_steps))
    return backbone, problem


def dno_step(problem: Problem, x_T, noises, optimizer) -> None:
    with torch.enable_grad():
        images, _ = problem.render(x_T, noises, checkpoint=True)
        loss = -problem.score(images).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([x_T, noises], 1.0)
        optimizer.step()


def sampler_vs_pipeline(device: str, repeats: int) -> tuple[float, float, float]:
    backbone, problem = setup(device, 10)
    x_T, noises = problem.noise([0])
    pipe = copy.copy(backbone.pipe)
    pipe.scheduler = backbone.scheduler
    pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def ours():
        problem.cond = backbone.encode(["a photo of a cat"])  # encoding is part of a pipeline call too
        problem.render(x_T, noises)

    @torch.no_grad()
    def theirs():
        pipe(
            "a photo of a cat",
            latents=x_T,
            num_inference_steps=10,
            guidance_scale=5.0,
            eta=1.0,
            output_type="pt",
            height=64,
            width=64,
        )

    return paired(ours, theirs, repeats)


def step_vs_sample(device: str, num_steps: int, repeats: int) -> tuple[float, float, float]:
    _, problem = setup(device, num_steps)
    x_T, noises = (t.requires_grad_() for t in problem.noise([0]))
    optimizer = torch.optim.AdamW([x_T, noises], lr=0.01)
    render = torch.no_grad()(lambda: problem.render(x_T, noises))
    return paired(lambda: dno_step(problem, x_T, noises, optimizer), render, repeats)


def mira_vs_dno(device: str, repeats: int) -> tuple[float, float, float]:
    """A whole MIRA item (β > 0, 5 optimisation steps) vs the same DNO item: the surrogate reuses ε̂."""
    from framework.config.methods import MIRAConfig
    from framework.methods import build_method

    backbone, problem = setup(device, 10)
    common = dict(num_steps=10, opt_steps=5, optimize="x_T")
    mira, dno = MIRAConfig(beta=1.0, **common), DNOConfig(gamma=0.0, **common)
    run = lambda cfg: build_method(cfg, problem.reward).run(Problem(backbone, problem.reward, problem.items, cfg))  # noqa
    return paired(lambda: run(mira), lambda: run(dno), repeats)


def _rss_high_water_mark(reset: bool = False) -> int:
    """Linux VmHWM in bytes; `reset` restarts it from the current RSS (clear_refs 5), so the peak of one step can be
    told apart from the peaks of model construction."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def peak_of(fn, device: str) -> tuple[int, int]:
    """(peak, baseline) bytes around fn(): CUDA's max allocated, or the CPU's peak RSS restarted just before."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_high_water_mark(reset=True)
    fn()
    return (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_high_water_mark()), baseline


def in_fresh_process(target, *args):
    """What target(*args, queue) puts on its queue, run in a fresh process. glibc keeps freed blocks below 32 MiB in
    its heap, where fragmentation from the recomputed activations of each checkpointed call would read as growth;
    returning blocks over 64 KiB to the OS makes RSS follow live memory (the environment is read when the child
    starts)."""
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def _peak_memory_child(device: str, num_steps: int, queue) -> None:
    _, problem = setup(device, num_steps)
    x_T, noises = (t.requires_grad_() for t in problem.noise([0]))
    optimizer = torch.optim.AdamW([x_T, noises], lr=0.01)
    queue.put(peak_of(lambda: dno_step(problem, x_T, noises, optimizer), device))


def peak_memory(device: str, num_steps: int) -> tuple[int, int]:
    return in_fresh_process(_peak_memory_child, device, num_steps)


def saved_for_backward(device: str, num_steps: int) -> int:
    """Bytes autograd keeps between forward and backward of a DNO step: exact, allocator-independent."""
    _, problem = setup(device, num_steps)
    x_T, noises = (t.requires_grad_() for t in problem.noise([0]))
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        problem.score(problem.render(x_T, noises, checkpoint=True)[0])
    return sum(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(
        f"tiny SD (64 px, latent 4×32×32), CFG 5, device {args.device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved pairs\n"
    )

    ratio, ours, theirs = sampler_vs_pipeline(args.device, args.repeats)
    print(
        f"1. sampler / diffusers pipeline (10 steps):   {ratio:5.2f}  ({ours:.3f} s vs {theirs:.3f} s)   target ≤ 1.0"
    )
    for steps in (10, 50):
        ratio, step, sample = step_vs_sample(args.device, steps, args.repeats)
        print(
            f"2. DNO step / plain sample ({steps} steps):      {ratio:5.2f}  ({step:.3f} s vs {sample:.3f} s)"
            "   target ≤ 4.0"
        )
    (peak10, base10), (peak50, base50) = peak_memory(args.device, 10), peak_memory(args.device, 50)
    mib = 2**20
    kind = "max allocated" if args.device == "cuda" else "peak RSS"
    print(
        f"3. peak memory 50 / 10 steps ({kind}):  {peak50 / peak10:5.2f}  ({peak50 / mib:.0f} MiB vs "
        f"{peak10 / mib:.0f} MiB)   target ≤ 1.2"
    )
    held10, held50 = saved_for_backward(args.device, 10), saved_for_backward(args.device, 50)
    print(
        f"   held for backward 50 / 10 steps:          {held50 / held10:5.2f}  ({held50 / mib:.1f} MiB vs "
        f"{held10 / mib:.1f} MiB; per step: {(held50 - held10) / 40 / 1024:.0f} KiB)"
    )
    print(
        f"   the step's own growth: {(peak50 - base50) / mib:.0f} MiB at 50 steps vs "
        f"{(peak10 - base10) / mib:.0f} MiB "
        f"at 10 (model weights and runtime excluded)"
    )
    ratio, mira, dno = mira_vs_dno(args.device, args.repeats)
    print(f"4. MIRA item / DNO item (5 steps of 10):      {ratio:5.2f}  ({mira:.3f} s vs {dno:.3f} s)   target ≤ 1.05")


if __name__ == "__main__":
    main()
