"""What scoring through a reward server costs on top of scoring in-process, measured in one run.

    python benchmarks/bench_remote.py [--reward tiny_imagereward] [--sizes 512 1024] [--batch 4] [--repeats 5]

Starts `python -m framework.serve` on localhost (CPU), then scores the same batches of smooth random images
(bicubic upsampling of 1/16-size noise: compressible as generated images are; per-pixel noise is PNG's worst case)
in-process and through the server with each image format. Prints, per image size and format, the median time per
batch and its ratio to the in-process time: the transport's overhead (encoding, HTTP, decoding), which a server on
another GPU pays once per scoring call. Over a network, add the bytes per batch it prints divided by the link's
bandwidth.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests
import torch

REPO = Path(__file__).resolve().parents[1]


def serve(reward: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "framework.serve", f"reward={reward}", f"serve.port={port}", "serve.device=cpu"]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(f"{url}/health", timeout=1).text == "ok":
                return process, url
        except requests.RequestException:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def median_seconds(score, images, prompts, repeats: int) -> float:
    score(images, prompts)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        score(images, prompts)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", default="tiny_imagereward")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from framework.config import reward_config
    from framework.config.rewards import RewardConfig
    from framework.rewards import build_reward
    from framework.rewards.remote import encode_images

    torch.set_num_threads(1)
    local = build_reward(reward_config(args.reward))
    process, url = serve(args.reward)
    try:
        remote = {f: build_reward(RewardConfig(name="remote", url=url, image_format=f)) for f in ("png", "tensor")}
        print(f"reward={args.reward}, batch {args.batch}, median of {args.repeats}, server on this machine's CPU")
        print("| size | in-process | png | × | MB/batch | tensor | × | MB/batch |")
        print("|---|---|---|---|---|---|---|---|")
        for size in args.sizes:
            noise = torch.rand(args.batch, 3, size // 16, size // 16, generator=torch.Generator().manual_seed(0))
            images = torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic").clamp(0, 1)
            prompts = ["a photo of a cat"] * args.batch
            with torch.no_grad():
                base = median_seconds(local, images, prompts, args.repeats)
                row = [f"{size}²", f"{base * 1e3:.0f} ms"]
                for image_format, reward in remote.items():
                    seconds = median_seconds(reward, images, prompts, args.repeats)
                    megabytes = len(str(encode_images(images, image_format)["data"])) / 1e6
                    row += [f"{seconds * 1e3:.0f} ms", f"{seconds / base:.2f}", f"{megabytes:.1f}"]
            print("| " + " | ".join(row) + " |")
    finally:
        os.killpg(process.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
