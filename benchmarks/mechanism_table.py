"""Reward, ground-truth adherence and drift after a fixed budget on the testbed (brightness): DNO (γ = 0 and γ > 0,
on all noises as in the paper, and on x_T alone) and MIRA at three β. Runs are resumable: finished items are kept.

    python benchmarks/mechanism_table.py [--opt-steps 50] [--out outputs/benchmarks/mechanism]

Prints a Markdown table of run means: reward base → final, adherence base → final, pixel drift RMSE, judge-feature
drift (1 − cos), R_MIRA to the base trajectory at the last step, CMMD of final vs base images, model evaluations
and seconds per item. A measurement, not a test: the numbers are what this machine produced.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

# One prompt per colour and per shape of the testbed, so no attribute is favoured.
PROMPTS = "[a red circle,a green square,a blue triangle,a yellow circle,a red triangle,a blue square]"
RUNS = {
    "DNO γ=0 (all noises)": ["method=dno"],
    "DNO γ=1 (all noises)": ["method=dno", "method.gamma=1"],
    "DNO γ=0 (x_T)": ["method=dno", "method.optimize=x_T"],
    "MIRA β=0.01": ["method=mira", "method.beta=0.01"],
    "MIRA β=0.1": ["method=mira", "method.beta=0.1"],
    "MIRA β=1": ["method=mira", "method.beta=1"],
}


def last_step_mean(run_dir: Path, key: str) -> float:
    values = [json.loads(p.read_text())["steps"][-1].get(key) for p in run_dir.glob("items/*/record.json")]
    return float(np.mean([v for v in values if v is not None]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--opt-steps", type=int, default=50)
    parser.add_argument("--num-steps", type=int, default=10, help="DDIM steps of the sampler")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/mechanism"))
    args = parser.parse_args()
    common = [f"method.num_steps={args.num_steps}", f"method.opt_steps={args.opt_steps}", "reward=brightness",
              "model=shapes", "prompts=inline", f"prompts.prompts={PROMPTS}", "logger=none"]
    rows = []
    for label, overrides in RUNS.items():
        run_dir = args.out / f"{'_'.join(o.split('=')[-1] for o in overrides)}_{args.opt_steps}"
        print(f"[{label}] {run_dir}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "framework.run", *overrides, *common, f"hydra.run.dir={run_dir}"],
                       check=True, stdout=subprocess.DEVNULL)
        s = json.loads((run_dir / "summary.json").read_text())
        rows.append(f"| {label} | {s['base_reward_mean']:.3f} → {s['final_reward_mean']:.3f} | "
                    f"{s['base_adherence_mean']:.2f} → {s['final_adherence_mean']:.2f} | "
                    f"{s['final_drift_rmse_mean']:.3f} | {s['final_drift_embedding_mean']:.3f} | "
                    f"{last_step_mean(run_dir, 'r_mira'):.4f} | {s['sets']['cmmd']:.2f} | {s['evals_mean']:.0f} | "
                    f"{s['seconds_mean']:.0f} |")
    print(f"\nTestbed, brightness, {args.opt_steps} optimisation steps × {args.num_steps} DDIM steps, "
          f"6 prompts, seed 0\n")
    print("| method | reward | adherence | drift RMSE | feature drift | R_MIRA | CMMD | evals/item | s/item |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
