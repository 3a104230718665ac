"""Reporting: the console summary of a run (`print_summary`), and curves and comparisons from finished runs.

    python -m framework.report RUN_DIR [--at 0,25,50,100] [--keys reward,adherence,drift_rmse]
    python -m framework.report RUN_DIR --versus OTHER_RUN [--judge reward|eval_<name>]

The first prints, for each k, the mean over items of each key *after k optimisation steps*: the record of step k is
measured on the image of the noise after k updates, and after the last update the item's final record applies.
The second prints the win rate of RUN_DIR's final images over OTHER_RUN's on the same (prompt, seed) items, judged
by the optimised reward or a held-out reward both runs recorded (`eval.rewards`), with a bootstrap 95 % interval
over prompts.
"""

import argparse
from pathlib import Path

import numpy as np

from framework.records import read_records


def versus(run_a: Path, run_b: Path, judge: str = "reward") -> dict:
    """Win rate of run A's final images over run B's on the items both finished (same prompt and seed)."""
    from framework.errors import FrameworkError
    from framework.metrics.sets import win_rate

    b = {r.id: r for r in read_records(run_b)}
    pairs = [(r, b[r.id]) for r in read_records(run_a) if r.id in b]
    if not pairs:
        raise FrameworkError(f"{run_a} and {run_b} have no finished item in common")
    for ra, rb in pairs:
        if (ra.prompt, ra.seed) != (rb.prompt, rb.seed):
            raise FrameworkError(f"item {ra.id} differs between the runs (prompt or seed): not comparable")
        if ra.final(judge) is None or rb.final(judge) is None:
            raise FrameworkError(f"item {ra.id} has no {judge!r} in both runs; run both with eval.rewards=[...]")
    rate, low, high = win_rate(
        [ra.final(judge) for ra, _ in pairs], [rb.final(judge) for _, rb in pairs], [ra.prompt_index for ra, _ in pairs]
    )
    return {"judge": judge, "items": len(pairs), "rate": rate, "low": low, "high": high}


def step_curve(run_dir: Path, at: list[int], keys: list[str]) -> list[dict]:
    records = read_records(run_dir)
    rows = []
    for k in at:
        row = {"step": k, "items": 0}
        for key in keys:
            values = [v for r in records if (v := r.after(k, key)) is not None]
            row[key] = float(np.mean(values)) if values else float("nan")
            row["items"] = max(row["items"], len(values))
        rows.append(row)
    return rows


def print_summary(summary: dict, label: str) -> None:
    metrics = [m for m in ("adherence", "drift_rmse") if f"final_{m}_mean" in summary]
    print(
        f"\n{label}: {summary['num_ok']}/{summary['num_items']} items ok"
        + (f", {summary['num_failed']} failed" if summary["num_failed"] else "")
    )
    width = min(48, max(len("prompt"), *(len(r["prompt"]) for r in summary["items"])))
    header = "".join(f"  {'adherence' if m == 'adherence' else 'drift':>15}" for m in metrics)
    print(f"  {'item':<12} {'prompt':<{width}}  {'reward base → final':>19}{header}")

    def columns(row_metrics: dict, base_key, final_key) -> str:
        """Each metric's cell; "—" where an item has no value (adherence of a prompt that is not a caption of the
        testbed's world)."""
        text = ""
        for m in metrics:
            base, final = row_metrics.get(base_key(m)), row_metrics.get(final_key(m))
            if final is None:
                text += f"  {'—':>15}"
            else:
                text += f"  {final:>15.3f}" if m == "drift_rmse" else f"  {base:>6.2f} → {final:<6.2f}"
        return text

    for row in summary["items"]:
        prompt = row["prompt"][:width]
        if row["status"] == "ok":
            flat = {f"{stage}.{k}": v for stage in ("base", "final") for k, v in row["metrics"][stage].items()}
            print(
                f"  {row['id']:<12} {prompt:<{width}}  {row['base_reward']:>8.4f} → {row['final_reward']:<8.4f}"
                + columns(flat, lambda m: f"base.{m}", lambda m: f"final.{m}")
            )
        else:
            print(f"  {row['id']:<12} {prompt:<{width}}  FAILED: {row['error']}")
    if summary["num_ok"]:
        base, final = summary["base_reward_mean"], summary["final_reward_mean"]
        print(
            f"  {'mean':<12} {'':<{width}}  {base:>8.4f} → {final:<8.4f}"
            + columns(summary, lambda m: f"base_{m}_mean", lambda m: f"final_{m}_mean")
        )
        print(
            f"  {summary['evals_mean']:.0f} model evaluations and {summary['seconds_mean']:.1f} s per item"
            + (
                "; adherence = ground-truth judge (colour and shape right); drift = pixel RMSE to the base image"
                if "adherence" in metrics
                else "; drift = pixel RMSE to the base image (same seed)"
            )
        )
        held_out = sorted(k[len("final_") : -len("_mean")] for k in summary if k.startswith("final_eval_"))
        labels = {"clipscore": "CLIPScore", "drift_embedding": "embedding drift (1 − cos to the base image)"}
        for key in held_out + [k for k in labels if f"final_{k}_mean" in summary]:
            base = summary.get(f"base_{key}_mean")
            print(
                f"  {labels.get(key, key)}: "
                + (f"{base:.4f} → " if base is not None else "")
                + f"{summary[f'final_{key}_mean']:.4f}"
            )
        print_set_metrics(summary.get("sets", {}))
        if decision := summary.get("monitor"):
            step, best = decision["hacking_step"], decision.get("best_held_out_step")
            flagged = "not flagged" if step is None else f"flagged at step {step} ({decision['signal']} turned)"
            print(f"  hacking monitor: {flagged}" + ("" if best is None else f"; held-out reward best at step {best}"))
    run_dir = Path(summary["run_dir"])
    print(
        f"images:  {run_dir / 'items'}/<item>/{{base,final}}.png, grid {run_dir / 'grid.png'}\n"
        f"summary: {run_dir / 'summary.json'}"
    )


def print_set_metrics(sets: dict) -> None:
    if "win_rate_vs_base" in sets:
        win = sets["win_rate_vs_base"]
        print(f"  win rate of final over base images: {win['rate']:.2f} (95% CI {win['low']:.2f}–{win['high']:.2f})")
    if "spectral_distance" in sets:
        cmmd = (
            f"CMMD {sets['cmmd']:.3f}, "
            if "cmmd" in sets
            else f"CMMD on judge features {sets['cmmd_judge']:.3f}, "
            if "cmmd_judge" in sets
            else ""
        )
        print(
            f"  final vs base sets: {cmmd}spectral distance {sets['spectral_distance']:.4f}, "
            f"log-spectral {sets['log_spectral_distance']:.3f}"
        )
    if "final_diversity_vendi" in sets:
        print(
            f"  diversity across seeds: Vendi {sets['base_diversity_vendi']:.2f} → "
            f"{sets['final_diversity_vendi']:.2f}, mean pairwise distance {sets['base_diversity_pairwise']:.4f} → "
            f"{sets['final_diversity_pairwise']:.4f}"
        )


def report(args: argparse.Namespace) -> None:
    from framework.errors import FrameworkError

    for run_dir in [args.run_dir] + ([args.versus] if args.versus is not None else []):
        if not read_records(run_dir):
            where = "does not exist" if not run_dir.is_dir() else "has no finished item (items/*/record.json)"
            raise FrameworkError(f"{run_dir} {where}: give the directory of a framework.run run")
    if args.versus is not None:
        result = versus(args.run_dir, args.versus, args.judge)
        print(
            f"win rate of {args.run_dir} over {args.versus} under {result['judge']}: {result['rate']:.3f} "
            f"(95% CI {result['low']:.3f}–{result['high']:.3f}, {result['items']} items)"
        )
        return
    keys = args.keys.split(",")
    try:
        at = [int(k) for k in args.at.split(",")]
    except ValueError:
        raise FrameworkError(f"--at {args.at!r}: give optimisation steps as integers, e.g. 0,25,50") from None
    rows = step_curve(args.run_dir, at, keys)
    print("| steps | " + " | ".join(keys) + " | items |")
    print("|---" * (len(keys) + 2) + "|")
    for row in rows:
        print(f"| {row['step']} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + f" | {row['items']} |")


def main() -> None:
    """Exit codes as framework.run's (see framework.errors): 2 bad input, 1 internal error."""
    import sys

    from framework.errors import ArgumentParser, guarded, process_error_log

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--at", default="0,25,50,100", help="optimisation steps, comma-separated")
    parser.add_argument("--keys", default="reward,adherence,drift_rmse")
    parser.add_argument("--versus", type=Path, help="another run: print the win rate of RUN_DIR over it")
    parser.add_argument("--judge", default="reward", help="reward (the optimised one) or eval_<name>")
    args = parser.parse_args()  # a bad argument: one error line, exit 2
    code, _ = guarded(lambda: report(args), process_error_log())
    sys.exit(code)


if __name__ == "__main__":
    main()
