"""Statistics of finished runs for tables: per-item values of a metric, their mean with a bootstrap interval, and
run-level values (set metrics, win rates). `run` arguments are experiment runs (`framework.analysis.experiments.Run`, or
anything with `dir`, `label` and `cell`).
"""

from pathlib import Path

import numpy as np

from framework.core.records import SUMMARY, RunSummary, read_records


def final_values(run_dir: Path, metric: str) -> np.ndarray:
    """Per-item values: the final image's (`reward`, `drift_rmse`, `evals`, ...), for `last.<key>` the value at the
    last optimisation step (e.g. `last.r_mira`, recorded along the trajectory only), for `held_out.<key>` the value
    at the step the held-out stopping rule chose."""
    records, key = read_records(run_dir), metric.partition(".")[2]
    if metric.startswith("last."):
        values = [r.steps[-1].get(key) if r.steps else None for r in records]
    elif metric.startswith("held_out."):
        values = [r.held_out(key) for r in records]
    else:
        values = [r.final(metric) for r in records]
    return np.array([v for v in values if v is not None], dtype=float)


def run_metric(metric: str, run, spec: dict, runs: list) -> tuple[int, tuple]:
    """(items, (value, low, high)) of one metric of one run; low/high are NaN for single run-level values."""
    from framework.analysis.report import versus

    if metric.startswith("sets."):
        sets = (RunSummary.load(run.dir).sets or {}) if (run.dir / SUMMARY).is_file() else {}
        value = sets.get(metric.removeprefix("sets."), float("nan"))
        return 0, (value, float("nan"), float("nan"))
    if metric.startswith("win_rate:"):
        judge = metric.removeprefix("win_rate:")
        other = next(r for r in runs if r.label == spec["versus"] and r.cell == run.cell)
        if not any(r.final(judge) is not None for r in read_records(run.dir)):
            return 0, (float("nan"),) * 3  # not recorded at this scale
        result = versus(other.dir, run.dir, judge)
        return result["items"], (result["rate"], result["low"], result["high"])
    if metric.startswith("paired."):
        other = next(r for r in runs if r.label == spec["versus"] and r.cell == run.cell)
        return paired_difference(run.dir, other.dir, metric.removeprefix("paired."))
    values = final_values(run.dir, metric)
    return len(values), mean_ci(values)


def paired_difference(run_dir: Path, other_dir: Path, metric: str) -> tuple[int, tuple[float, float, float]]:
    """(items, (mean, mean − 2 SE, mean + 2 SE)) of the per-item difference of `metric` between two runs' final
    images, over the items both finished (the same prompts and seeds): a difference is significant where the
    interval excludes 0."""
    theirs = {r.id: r.final(metric) for r in read_records(other_dir)}
    pairs = [(r.final(metric), theirs.get(r.id)) for r in read_records(run_dir)]
    d = np.array([a - b for a, b in pairs if a is not None and b is not None], float)
    if len(d) < 2:
        return len(d), (float(d.mean()) if len(d) else float("nan"), float("nan"), float("nan"))
    se = d.std(ddof=1) / np.sqrt(len(d))
    return len(d), (float(d.mean()), float(d.mean() - 2 * se), float(d.mean() + 2 * se))


def mean_ci(values: np.ndarray, num_bootstrap: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and bootstrap 95 % percentile interval over items."""
    if len(values) == 0:
        return (float("nan"),) * 3
    draws = np.random.default_rng(seed).integers(0, len(values), size=(num_bootstrap, len(values)))
    low, high = np.percentile(values[draws].mean(1), [2.5, 97.5])
    return float(values.mean()), float(low), float(high)
