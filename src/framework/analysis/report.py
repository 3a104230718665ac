"""Reporting: curves and comparisons from finished runs.

    python -m framework.analysis.report RUN_DIR [--at 0,25,50,100] [--keys reward,adherence,drift_rmse]
    python -m framework.analysis.report RUN_DIR --versus OTHER_RUN [--judge reward|eval_<name>]

The first prints, for each k, the mean over items of each key *after k optimisation steps*: the record of step k is
measured on the image of the noise after k updates, and after the last update the item's final record applies.
The second prints the win rate of RUN_DIR's final images over OTHER_RUN's on the same (prompt, seed) items, judged
by the optimised reward or a held-out reward both runs recorded (`eval.rewards`), with a bootstrap 95 % interval
over prompts.
"""

import argparse
from pathlib import Path

from framework.core.records import read_records, step_curve


def versus(run_a: Path, run_b: Path, judge: str = "reward") -> dict:
    """Win rate of run A's final images over run B's on the items both finished (same prompt and seed)."""
    from framework.core.errors import FrameworkError
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


def report(args: argparse.Namespace) -> None:
    from framework.core.errors import FrameworkError

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
    """Exit codes as framework.run's (see framework.core.errors): 2 bad input, 1 internal error."""
    import sys

    from framework.core.errors import ArgumentParser, guarded, process_error_log

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
