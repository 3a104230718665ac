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
(`report: <option>`), at the tuned setting, at the default (z = 3, patience 2) and calibrated (patience 2, z per run
such that the rule flags at most 5 % of pure-noise runs simulated under that run's conditions:
framework.core.hacking.calibrated_z). Every row also carries the false-alarm rate simulated under its run's
conditions (evaluations, units, signals, their lag-one correlation) at the z it used, and the gold kept by the
baseline the rule must beat: stopping every run at a fixed fraction of its evaluations, the fraction tuned on the
same cell as the rule. Summaries add precision (detected / flagged) and recall (detected / hacking).
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
    null_flag_rate,
    paired_gap,
    probe_signals,
    probe_table,
    read_probe_rows,
    record_signals,
    record_table,
    rule_z,
    simulated_rho,
)
from framework.core.records import read_records

GRID = [(z, patience) for z in (1.0, 2.0, 3.0, 4.0, 5.0) for patience in (1, 2, 3)]
DEFAULT = (3.0, 2)
CALIBRATED = (None, 2, 0.05)  # (z: calibrated per run, patience, simulated false-alarm rate)
FRACTIONS = np.linspace(0, 1, 11)  # where a fixed-step early stop may stop, as a fraction of a run's evaluations
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


def outcome(t: Trajectory, z: float | None, patience: int, false_alarms: float | None = None, fixed=0.0) -> dict:
    """What the rule at (z, patience), or calibrated to `false_alarms`, decides on `t`, against gold (module
    docstring); `fixed`: the fraction of the evaluations where the fixed-step baseline stops."""
    gold = t.gold.mean(1)
    peak, last = int(np.argmax(gold)), len(t.steps) - 1
    fall, fall_se = paired_gap(t.gold[peak], t.gold[last])
    hacked = bool(fall > HACKED_SE * fall_se)
    z = rule_z(z, false_alarms, patience, len(t.steps), t.signals)
    flag = detect(t.steps, t.reward, t.signals, z=z, patience=patience)
    stop = last if flag is None else t.steps.index(flag.step)
    best = last if t.held_out is None else int(np.argmax(t.held_out.mean(1)))
    units = min(signal.values.shape[1] for signal in t.signals)
    rho = simulated_rho(t.signals)
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
        "z_used": z,
        "simulated_false_alarms": null_flag_rate(len(t.steps), units, len(t.signals), z, patience, rho, runs=1000),
        "gold_base": float(gold[0]),
        "gold_final": float(gold[last]),
        "gold_at_flag": float(gold[stop]),
        "gold_fixed_stop": float(gold[round(fixed * last)]),
        "gold_best_held_out": float(gold[best]),
        "gold_peak": float(gold[peak]),
    }


def summarise(rows: list[dict]) -> dict:
    """Counts, the median lag of the detected runs and the mean gold kept, over `rows` (one per run)."""
    lags = [r["lag"] for r in rows if r["outcome"] == "detected"]
    mean = lambda key: float(np.mean([r[key] for r in rows])) if rows else float("nan")  # noqa: E731
    counts = {name: sum(r["outcome"] == name for r in rows) for name in ("detected", "missed", "false alarm")}
    flagged, hacking = counts["detected"] + counts["false alarm"], sum(r["hacks"] for r in rows)
    return {
        "runs": len(rows),
        "hacking": hacking,
        **counts,
        "precision": counts["detected"] / flagged if flagged else float("nan"),
        "recall": counts["detected"] / hacking if hacking else float("nan"),
        "median_lag": float(np.median(lags)) if lags else float("nan"),
        "simulated_false_alarms": mean("simulated_false_alarms"),
        **{
            key: mean(key)
            for key in ("gold_final", "gold_at_flag", "gold_fixed_stop", "gold_best_held_out", "gold_peak")
        },
    }


def analyse(runs: list, tune: str, report: str) -> tuple[dict, list[dict], list[dict]]:
    """The tuned setting, the per-run outcomes and the summaries (each cell), at the tuned setting, the default and
    the calibrated one."""
    axis = next(a for a in runs[0].cell if {tune, report} <= {r.cell[a] for r in runs})
    trajectories = [t for run in runs if (t := trajectory(run, axis)) is not None]
    tuning = [t for t in trajectories if t.cell == tune]

    def kept(setting) -> tuple:
        z, patience = setting
        gold = [float(t.gold.mean(1)[_stop(t, z, patience)]) for t in tuning]
        return float(np.mean(gold)), setting

    def kept_fixed(fraction: float) -> float:
        return float(np.mean([t.gold.mean(1)[round(fraction * (len(t.steps) - 1))] for t in tuning]))

    z, patience = max(GRID, key=kept)
    fixed = float(max(FRACTIONS, key=kept_fixed))
    settings = list(dict.fromkeys([(z, patience, None), (*DEFAULT, None), CALIBRATED]))
    rows = [
        {"setting": _name(s, (z, patience)), "z": s[0], "patience": s[1]} | outcome(t, *s, fixed=fixed)
        for s in settings
        for t in trajectories
    ]
    summaries = [
        {"cell": cell, "split": split, "setting": _name(setting, (z, patience)), "patience": setting[1]}
        | summarise([row for row in rows if row["cell"] == cell and row["setting"] == _name(setting, (z, patience))])
        for cell, split in ((tune, "tune"), (report, "report"))
        for setting in settings
    ]
    tuned = {"z": z, "patience": patience, "fixed_stop_fraction": fixed, "tuned_on": tune, "reported_on": report}
    return tuned, rows, summaries


def _stop(t: Trajectory, z: float, patience: int) -> int:
    flag = detect(t.steps, t.reward, t.signals, z=z, patience=patience)
    return len(t.steps) - 1 if flag is None else t.steps.index(flag.step)


def _name(setting: tuple, tuned: tuple) -> str:
    if setting[0] is None:
        return f"calibrated ({setting[2]:.0%} simulated false alarms)"
    label = "tuned" if setting[:2] == tuned else "default"
    return f"{label} (z = {setting[0]:g}, patience {setting[1]})"


def write_outputs(tuned: dict, rows: list[dict], summaries: list[dict], title: str, stem: Path) -> list[Path]:
    """<stem>_runs.{csv,md} (per run, at the tuned setting) and <stem>_summary.{csv,md}."""
    written = []
    for path, table, heading in (
        (
            stem.with_name(f"{stem.name}_runs"),
            rows,
            f"{title}: per run and setting",
        ),
        (
            stem.with_name(f"{stem.name}_summary"),
            summaries,
            f"{title}: z = {tuned['z']:g}, patience {tuned['patience']} and the fixed stop at "
            f"{tuned['fixed_stop_fraction']:.0%} of the evaluations tuned on {tuned['tuned_on']}",
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
