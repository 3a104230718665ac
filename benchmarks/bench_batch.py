"""Batched items on the embedded testbed, measured in one run (ratios, no absolute-time claims).

    python benchmarks/bench_batch.py [--repeats 3]     (make bench)

5. per-image time of DNO and MIRA optimisation steps, 8 items in one batch vs one item at a time, as a run does
   them (model=shapes, 10 DDIM steps, checkpointed, brightness reward, the testbed's judge metrics every step)
                                                                                                target ≤ 0.35
6. peak memory of one DNO step against the batch size (fresh process each; CPU: peak RSS growth over the loaded
   model; CUDA: max allocated)
"""

import argparse
import statistics
import time

import torch
from bench_sampler import in_fresh_process, peak_of  # benchmarks/ is the script's directory

import framework  # noqa: F401  (torchvision workaround)
from framework.config import ModelConfig
from framework.config.methods import DNOConfig, MIRAConfig
from framework.config.rewards import RewardConfig
from framework.methods import Problem, build_method
from framework.metrics import ImageMetrics
from framework.models import load_backbone
from framework.rewards import build_reward
from framework.runner.alignment import make_items
from framework.testbed import MODEL_DIR
from framework.testbed.judge import load_judge
from framework.testbed.shapes import all_captions

BATCH = 8
ITEMS = make_items(all_captions()[:4], seed=0, samples_per_prompt=2)  # 8 items, mixed prompts


def setup(device: str):
    backbone = load_backbone(ModelConfig(kind="sd", source=str(MODEL_DIR), resolution=32)).to(device)
    reward = build_reward(RewardConfig(name="brightness")).to(device)
    return backbone, reward, ImageMetrics(load_judge(), "judge").to(device)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def solve(cfg, backbone, reward, metrics, items) -> float:
    """Seconds to run `items` as one batch."""
    method = build_method(cfg, reward)
    start = time.perf_counter()
    with torch.enable_grad():
        method.run(Problem(backbone, reward, items, cfg, metrics))
    _synchronize()
    return time.perf_counter() - start


def batched_vs_single(cfg, device: str, repeats: int) -> tuple[float, float, float]:
    """Median over interleaved repeats of (per-image seconds at batch 8) / (per-image seconds at batch 1)."""
    backbone, reward, metrics = setup(device)
    solve(cfg, backbone, reward, metrics, ITEMS[:2])  # warm-up
    ratios, together, alone = [], [], []
    for _ in range(repeats):
        together.append(solve(cfg, backbone, reward, metrics, ITEMS) / BATCH)
        alone.append(sum(solve(cfg, backbone, reward, metrics, [item]) for item in ITEMS) / BATCH)
        ratios.append(together[-1] / alone[-1])
    return statistics.median(ratios), statistics.median(together), statistics.median(alone)


def _peak_child(device: str, batch: int, queue) -> None:
    backbone, reward, metrics = setup(device)
    cfg = DNOConfig(num_steps=10, opt_steps=1)
    solve(cfg, backbone, reward, metrics, ITEMS[:1])  # warm-up: lazily built kernels and caches do not count
    peak, baseline = peak_of(lambda: solve(cfg, backbone, reward, metrics, ITEMS[:batch]), device)
    queue.put(peak - baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"testbed (32 px, latent 4×16×16), CFG 5, device {args.device}, {torch.get_num_threads()} threads\n")
    common = dict(num_steps=10, opt_steps=4, checkpoint=True, batch_size=BATCH)
    for name, cfg in (("DNO", DNOConfig(**common)), ("MIRA", MIRAConfig(**common))):
        ratio, together, alone = batched_vs_single(cfg, args.device, args.repeats)
        print(
            f"5. {name} per-image time, batch {BATCH} / batch 1:  {ratio:5.2f}  ({together:.3f} s vs {alone:.3f} s "
            "per image: 4 steps and the final sample)   target ≤ 0.35"
        )
    kind = "max allocated" if args.device == "cuda" else "peak RSS growth"
    peaks = {batch: in_fresh_process(_peak_child, args.device, batch) for batch in (1, 2, 4, 8)}
    row = ", ".join(f"{batch}: {peak / 2**20:.0f} MiB" for batch, peak in peaks.items())
    print(f"6. peak memory of a DNO step by batch size ({kind}): {row}")


if __name__ == "__main__":
    main()
