"""Reward vs diversity on the testbed (brightness): DRaFT+KL over a λ grid, then LoRA scaling at three α and AIG at three
p, all reusing the λ = 0 adapter (one training per λ). Resumable: finished trainings and items are reused.

    python benchmarks/pareto_table.py [--train-steps 60] [--out outputs/benchmarks/pareto]

Diversity is measured across the 4 seeds of each prompt with the judge's image features (Vendi score and mean
pairwise cosine distance) and as the spectral distance of the final image set to the base model's set.
A measurement, not a test: the numbers are what this machine produced.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

KL_WEIGHTS = (0.0, 0.0001, 0.001, 0.01, 0.1, 1.0)
ALPHAS = (0.25, 0.5, 0.75)
POWERS = (1.0, 2.0, 4.0)


def run(overrides: list[str], run_dir: Path, common: list[str]) -> dict:
    print(f"[{' '.join(overrides)}] {run_dir}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "framework.run", *overrides, *common, f"hydra.run.dir={run_dir}"],
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "summary.json").read_text())


def row(label: str, s: dict) -> str:
    sets = s["sets"]
    return (f"| {label} | {s['base_reward_mean']:.3f} → {s['final_reward_mean']:.3f} | "
            f"{s['base_adherence_mean']:.2f} → {s['final_adherence_mean']:.2f} | "
            f"{sets['base_diversity_vendi']:.2f} → {sets['final_diversity_vendi']:.2f} | "
            f"{sets['base_diversity_pairwise']:.3f} → {sets['final_diversity_pairwise']:.3f} | "
            f"{sets['spectral_distance']:.3f} | {s['evals_mean']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/pareto"))
    args = parser.parse_args()
    sampling = ["method.num_steps=10", "method.eta=0", "method.guidance_scale=5.0"]  # DRaFT's sampler for all
    common = ["model=shapes", "reward=brightness", "prompts=shapes", "prompts.limit=4", "samples_per_prompt=4",
              "logger=none", *sampling]
    rows = []
    for kl in KL_WEIGHTS:
        train = ["method=draft", f"method.kl_weight={kl}", f"method.train_steps={args.train_steps}", "method.lr=1e-3",
                 f"method.save_every={args.train_steps}", "method.sample_every=20"]
        rows.append(row(f"DRaFT λ={kl:g}", run(train, args.out / f"draft_kl{kl:g}_{args.train_steps}", common)))
    adapter = args.out / f"draft_kl0_{args.train_steps}" / "adapter"
    for alpha in ALPHAS:
        s = run(["method=lora_scale", f"method.adapter={adapter}", f"method.alpha={alpha}"],
                args.out / f"lora_alpha{alpha:g}_{args.train_steps}", common)
        rows.append(row(f"LoRA α={alpha:g} (λ=0 adapter)", s))
    for p in POWERS:
        s = run(["method=aig", f"method.adapter={adapter}", f"method.p={p}"], args.out / f"aig_p{p:g}_{args.train_steps}",
                common)
        rows.append(row(f"AIG p={p:g} (λ=0 adapter)", s))
    print(f"\nTestbed, brightness, DRaFT-K (K=1) {args.train_steps} steps of batch 4, lr 1e-3, 10 DDIM steps (η=0, CFG 5); "
          "evaluated on 4 prompts × 4 seeds\n")
    print("| method | reward | adherence | Vendi (4 seeds) | pairwise distance | spectral distance to base | evals/item |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
