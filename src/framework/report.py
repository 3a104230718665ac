"""Curves from finished runs: `python -m framework.report RUN_DIR [--at 0,25,50,100] [--keys reward,adherence]`.

Prints, for each k, the mean over items of each key *after k optimisation steps*: the record of step k is measured
on the image of the noise after k updates, and after the last update the item's final record applies.
"""

import argparse
import json
from pathlib import Path

import numpy as np


def value_after(record: dict, k: int, key: str) -> float | None:
    steps = record.get("steps", [])
    if k < len(steps):
        return steps[k].get(key)
    if k == len(steps):
        return record["final_reward"] if key == "reward" else record.get("metrics", {}).get("final", {}).get(key)
    return None


def step_curve(run_dir: Path, at: list[int], keys: list[str]) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(Path(run_dir).glob("items/*/record.json"))]
    records = [r for r in records if r["status"] == "ok"]
    rows = []
    for k in at:
        row = {"step": k, "items": 0}
        for key in keys:
            values = [v for r in records if (v := value_after(r, k, key)) is not None]
            row[key] = float(np.mean(values)) if values else float("nan")
            row["items"] = max(row["items"], len(values))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--at", default="0,25,50,100", help="optimisation steps, comma-separated")
    parser.add_argument("--keys", default="reward,adherence,drift_rmse")
    args = parser.parse_args()
    keys = args.keys.split(",")
    rows = step_curve(args.run_dir, [int(k) for k in args.at.split(",")], keys)
    print("| steps | " + " | ".join(keys) + " | items |")
    print("|---" * (len(keys) + 2) + "|")
    for row in rows:
        print(f"| {row['step']} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + f" | {row['items']} |")


if __name__ == "__main__":
    main()
