"""The hacking monitor's cost against a training step, measured in one run (no absolute-time claims).

    python benchmarks/bench_monitor.py [--steps 10]     (make bench)

DRaFT on the testbed (the shipped model, the learned proxy, saturation held out) three times in fresh processes:
without a probe set for `steps` and 2·`steps` optimiser steps (their difference is the time of `steps` training
steps), and with the default probe set (4 prompts × 2 seeds) evaluated every step. Prints the probe's model
evaluations, the ratio of one probe evaluation (its own timing, monitor.csv) to one training step (batch 4), and
the training time a probe every 5 steps adds                                                       target ≤ 0.5
"""

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = [
    "method=draft",
    "reward=proxy",
    "eval.rewards=[saturation]",
    "method.num_steps=10",
    "method.eta=1",
    "method.train_batch_size=4",
    "method.lr=1e-3",
    "method.sample_every=0",
    "prompts.limit=4",  # the probe's 4 prompts; also the items sampled after training
    "logger=none",
]


def run(directory: Path, *overrides: str) -> float:
    start = time.perf_counter()
    command = [sys.executable, "-m", "framework.run", *ARGS, *overrides, f"hydra.run.dir={directory}"]
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    steps = parser.parse_args().steps
    with tempfile.TemporaryDirectory() as tmp:
        short, long = (
            run(Path(tmp) / f"plain{n}", f"method.train_steps={n}", f"method.save_every={n}")
            for n in (steps, 2 * steps)
        )
        probed = Path(tmp) / "probed"
        run(
            probed, f"method.train_steps={steps}", f"method.save_every={steps}", "monitor.every=1", "monitor.prompts=12"
        )
        with open(probed / "monitor.csv") as f:
            rows = list(csv.DictReader(f))
    step_seconds = (long - short) / steps
    probe_seconds = statistics.median(float(r["probe_seconds"]) for r in rows)
    ratio = probe_seconds / step_seconds
    print(f"probe set: 8 images, {rows[0]['probe_evals']} model evaluations per check ({len(rows)} checks)")
    print(f"one probe check / one training step (batch 4): {ratio:.2f}")
    print(f"training time added by a check every 5 steps: {ratio / 5:.2f}   target ≤ 0.5")
    print(f"  (median check {probe_seconds:.2f} s, training step {step_seconds:.2f} s on this machine)")


if __name__ == "__main__":
    main()
