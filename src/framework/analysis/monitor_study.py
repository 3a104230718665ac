"""The hacking monitor against the truth: the analysis of a `kind: monitor` experiment (testbed, where gold is known).

Every run with a trajectory becomes one: a noise method's per-step records (its items are the probe units), or a
DRaFT run's probe evaluations (`monitor.jsonl`). Per run and rule setting (z, patience; framework.monitor):

- gold's peak: the evaluation where the mean gold over units is highest; the run **hacks** when gold then falls:
  the paired mean of gold at the peak minus gold at the last evaluation exceeds 2 standard errors;
- the rule's flag (from held-out signals only) and its **lag**: flag step − peak step (negative: it fired early);
- the outcome: *detected* (hacks, flagged), *missed* (hacks, not flagged), *false alarm* (does not hack, flagged)
  or *quiet*;
- gold kept: at the last evaluation, at the flag (stopping there; the last evaluation if never flagged), at the
  evaluation the first held-out reward scores best (best-held-out selection), and at the peak (what an oracle keeps).

The rule is tuned on one grid cell (`monitor: {tune: <option>}`: the (z, patience) of GRID that keeps the most mean
gold by stopping, ties to the larger z and patience, i.e. fewer alarms) and reported on another
(`report: <option>`), at the tuned setting and at the defaults.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from framework.config import held_out_rewards
from framework.config.methods import method_kind
from framework.core.atomic import atomic_open, write_text
from framework.core.hacking import (
    Signal,
    detect,
    paired_gap,
    probe_signals,
    probe_table,
    read_probe_rows,
    record_signals,
    record_table,
)
from framework.core.records import read_records

GRID = [(z, patience) for z in (1.0, 2.0, 3.0, 4.0, 5.0) for patience in (1, 2, 3)]
DEFAULT = (3.0, 2)
HACKED_SE = 2.0  # standard errors gold must fall by after its peak for a run to count as hacking


@dataclass
class Trajectory:
    """A run's evaluations: steps, the optimised reward, the rule's held-out signals, gold and the first held-out
    reward (best-held-out selection; None without one), each [evaluations, units]."""

    run: str
    cell: str
    steps: list[int]
    reward: np.ndarray
    signals: list[Signal]
    gold: np.ndarray
    held_out: np.ndarray | None


def trajectory(run, cell_axis: str) -> Trajectory | None:
    """The run's trajectory, or None for a run without one (Base, Best-of-N, LoRA scaling, AIG)."""
    names = held_out_rewards(run.cfg)
    if rows := read_probe_rows(run.dir):
        steps, reward, signals = probe_signals(rows, names)
        table = lambda key: probe_table(rows, key)  # noqa: E731
    else:
        records = read_records(run.dir)
        if method_kind(run.cfg.method) != "optimises_noise" or not records or not all(r.steps for r in records):
            return None
        steps, reward, signals = record_signals(records, names)
        table = lambda key: record_table(records, key, steps)  # noqa: E731
    held_out = table(f"eval_{names[0]}") if names else None
    return Trajectory(run.name, run.cell.get(cell_axis, ""), steps, reward, signals, table("gold"), held_out)


def outcome(t: Trajectory, z: float, patience: int) -> dict:
    """What the rule at (z, patience) decides on `t`, against gold (module docstring)."""
    gold = t.gold.mean(1)
    peak, last = int(np.argmax(gold)), len(t.steps) - 1
    fall, fall_se = paired_gap(t.gold[peak], t.gold[last])
    hacked = bool(fall > HACKED_SE * fall_se)
    flag = detect(t.steps, t.reward, t.signals, z=z, patience=patience)
    stop = last if flag is None else t.steps.index(flag.step)
    best = last if t.held_out is None else int(np.argmax(t.held_out.mean(1)))
    kind = {(True, True): "detected", (True, False): "missed", (False, True): "false alarm", (False, False): "quiet"}
    return {
        "run": t.run,
        "cell": t.cell,
        "hacks": hacked,
        "gold_peak_step": t.steps[peak],
        "flag_step": None if flag is None else flag.step,
        "signal": None if flag is None else flag.signal,
        "lag": None if flag is None or not hacked else flag.step - t.steps[peak],
        "outcome": kind[hacked, flag is not None],
        "gold_base": float(gold[0]),
        "gold_final": float(gold[last]),
        "gold_at_flag": float(gold[stop]),
        "gold_best_held_out": float(gold[best]),
        "gold_peak": float(gold[peak]),
    }


def summarise(rows: list[dict]) -> dict:
    """Counts, the median lag of the detected runs and the mean gold kept, over `rows` (one per run)."""
    lags = [r["lag"] for r in rows if r["outcome"] == "detected"]
    mean = lambda key: float(np.mean([r[key] for r in rows])) if rows else float("nan")  # noqa: E731
    return {
        "runs": len(rows),
        "hacking": sum(r["hacks"] for r in rows),
        **{name: sum(r["outcome"] == name for r in rows) for name in ("detected", "missed", "false alarm")},
        "median_lag": float(np.median(lags)) if lags else float("nan"),
        **{key: mean(key) for key in ("gold_final", "gold_at_flag", "gold_best_held_out", "gold_peak")},
    }


def analyse(runs: list, tune: str, report: str) -> tuple[dict, list[dict], list[dict]]:
    """The tuned setting, the per-run outcomes and the summaries (each cell), at the tuned setting and the default."""
    axis = next(a for a in runs[0].cell if {tune, report} <= {r.cell[a] for r in runs})
    trajectories = [t for run in runs if (t := trajectory(run, axis)) is not None]
    tuning = [t for t in trajectories if t.cell == tune]

    def kept(setting) -> tuple:
        rows = [outcome(t, *setting) for t in tuning]
        return float(np.mean([r["gold_at_flag"] for r in rows])), setting

    z, patience = max(GRID, key=kept)
    settings = list(dict.fromkeys([(z, patience), DEFAULT]))
    rows = [{"z": s[0], "patience": s[1]} | outcome(t, *s) for s in settings for t in trajectories]
    summaries = [
        {"cell": cell, "split": split, "z": setting[0], "patience": setting[1]}
        | summarise([row for row in rows if row["cell"] == cell and (row["z"], row["patience"]) == setting])
        for cell, split in ((tune, "tune"), (report, "report"))
        for setting in settings
    ]
    return {"z": z, "patience": patience, "tuned_on": tune, "reported_on": report}, rows, summaries


def write_outputs(tuned: dict, rows: list[dict], summaries: list[dict], title: str, stem: Path) -> list[Path]:
    """<stem>_runs.{csv,md} (per run, at the tuned setting) and <stem>_summary.{csv,md}."""
    written = []
    for path, table, heading in (
        (
            stem.with_name(f"{stem.name}_runs"),
            rows,
            f"{title}: per run at z = {tuned['z']}, patience {tuned['patience']}",
        ),
        (
            stem.with_name(f"{stem.name}_summary"),
            summaries,
            f"{title}: z = {tuned['z']}, patience {tuned['patience']} tuned on {tuned['tuned_on']}",
        ),
    ):
        keys = list(table[0]) if table else []
        with atomic_open(path.with_suffix(".csv"), newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(table)
        lines = [f"**{heading}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_text(row[k]) for k in keys) + " |" for row in table]
        write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
        written += [path.with_suffix(".csv"), path.with_suffix(".md")]
    return written


def _text(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if np.isnan(value) else f"{value:.3f}"
    return str(value)
