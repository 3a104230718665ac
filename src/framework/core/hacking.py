"""The hacking monitor's rule: pure numerics over held-out signals, read by the probe callback of the fine-tuning
methods (framework.methods.probe), by a run's summary (framework.runner.summary) and by the monitor study.

The signals are measured at evaluations k = 0 … K−1 (optimisation steps `steps[k]`) on the same probe units (fixed
prompts, seeds and noises; a unit is an image, or a prompt for diversity across its seeds): the optimised reward
r[k, i] and held-out signals h[k, i], each with the direction in which it gets better: a held-out reward (higher),
diversity (higher) and drift velocity, the drift added since the previous evaluation (lower: optimisation that
starts to drift faster has found something new to exploit).

The rule. At evaluation k, for each held-out signal, let b be the earlier evaluation where its mean over units was
best. The signal has turned when it is worse at k than at b by more than `z` standard errors of the paired
difference over units (the spread of h[b, i] − h[k, i] across the probe set, divided by √n): a fall the probe set's
own sampling noise does not explain. Reward hacking is flagged at the first evaluation where, for `patience`
evaluations in a row, some held-out signal has turned while the optimised reward has kept rising since that
signal's best, by more than `z` standard errors too (mean r[k, i] − r[b, i]): the optimiser still gains on its
reward, and what it does not see gets worse. The best earlier evaluation is the largest of several noisy means, and
a run watches several signals at many evaluations, so the rule fires on noise more often than z suggests: on pure
independent noise (8 evaluations of 16 units, one signal, the reward rising) 6.8 % of runs at z = 3 and patience 1,
0.4 % at the default patience 2 (tests/test_monitor.py), and more with more evaluations, signals and correlated
noise. `null_flag_rate` simulates that rate under a run's own conditions (its evaluations, units, signals, and
noise correlated across evaluations), and `calibrated_z` picks the smallest z that holds it at a chosen rate
(`monitor.false_alarms`): the correction for watching several signals and comparing against the best earlier
evaluation. Nothing here reads a ground truth (gold, adherence), so the rule runs on real models as on the testbed,
where gold measures it (docs/experiments.md).
"""

import functools
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from framework.core.records import ItemRecord

ROWS = "monitor.jsonl"  # one line per probe evaluation, values per probe unit


@dataclass
class ProbeRow:
    """One evaluation of a fine-tuning run's probe set, a line of `monitor.jsonl`: the optimiser step, the mean of
    each metric (and the set metrics), each metric per probe unit, and what the evaluation cost."""

    step: int
    means: dict[str, float]
    units: dict[str, list[float]]
    cost: dict[str, float] = field(default_factory=dict)

    def dumps(self) -> str:
        return json.dumps(asdict(self))


def read_probe_rows(run_dir: Path) -> list[ProbeRow]:
    """The probe evaluations a run wrote, in order (none if it has no probe set)."""
    path = Path(run_dir) / ROWS
    lines = path.read_text().splitlines() if path.is_file() else []
    return [ProbeRow(**json.loads(line)) for line in lines if line.strip()]


@dataclass(frozen=True)
class Signal:
    """A held-out signal: its values [evaluations, units] (NaN where not measured, e.g. the velocity at k = 0)."""

    name: str
    values: np.ndarray
    higher_is_better: bool = True


@dataclass(frozen=True)
class Flag:
    """Where the rule flagged hacking: the optimisation step of that evaluation, the held-out signal that turned, and
    the step where that signal had been best."""

    step: int
    signal: str
    best_step: int


def decision(flag: Flag | None) -> dict:
    """The rule's decision as summary.json and monitor.json keep it."""
    return {"hacking_step": None} if flag is None else {"hacking_step": flag.step} | asdict(flag)


def paired_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean over units of a − b and its standard error (infinite with fewer than 2 units: never significant)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return float(d.mean()) if len(d) else 0.0, math.inf
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def turned(signal: Signal, reward: np.ndarray, k: int, z: float) -> int | None:
    """The evaluation b < k where `signal` was best, if at k it is significantly worse than at b while the reward is
    significantly higher; else None."""
    values = signal.values if signal.higher_is_better else -signal.values
    earlier = [j for j in range(k) if np.isfinite(values[j]).all()]
    if not earlier or not np.isfinite(values[k]).all():
        return None
    b = max(earlier, key=lambda j: values[j].mean())
    fall, fall_se = paired_gap(values[b], values[k])
    gain, gain_se = paired_gap(reward[k], reward[b])
    return b if fall > z * fall_se and gain > z * gain_se else None


def detect(steps: list[int], reward: np.ndarray, signals: list[Signal], z: float = 3.0, patience: int = 2):
    """The first Flag of the rule (module docstring) over evaluations at `steps`, or None. `reward`: [K, units] of
    the optimised reward on the probe units of the image signals."""
    in_a_row = 0
    for k in range(1, len(steps)):
        hits = [(s.name, b) for s in signals if (b := turned(s, reward, k, z)) is not None]
        in_a_row = in_a_row + 1 if hits else 0
        if in_a_row >= patience:
            name, b = hits[0]
            return Flag(steps[k], name, steps[b])
    return None


def null_flag_rate(
    evaluations: int,
    units: int,
    signals: int,
    z: float,
    patience: int,
    rho: float = 0.0,
    runs: int = 2000,
    seed: int = 0,
) -> float:
    """The share of pure-noise runs the rule flags: `signals` held-out signals of `units` units each, measured at
    `evaluations` evaluations as AR(1) noise with lag-one correlation `rho` between evaluations and no trend, the
    reward rising (so only the held-out side decides). The rule of `detect`, vectorised over runs."""
    rng = np.random.default_rng(seed)
    shocks = rng.standard_normal((runs, signals, evaluations, units))
    noise = np.empty_like(shocks)
    noise[:, :, 0] = shocks[:, :, 0]
    for k in range(1, evaluations):
        noise[:, :, k] = rho * noise[:, :, k - 1] + math.sqrt(1 - rho**2) * shocks[:, :, k]
    means = noise.mean(3)  # [runs, signals, evaluations]
    hits = np.zeros((runs, evaluations), bool)
    for k in range(1, evaluations):
        best = means[:, :, :k].argmax(2)  # the best earlier evaluation of each run and signal
        at_best = np.take_along_axis(noise, best[:, :, None, None], 2)[:, :, 0]
        fall = at_best - noise[:, :, k]  # [runs, signals, units]
        se = fall.std(2, ddof=1) / math.sqrt(units)
        hits[:, k] = (fall.mean(2) > z * se).any(1)
    in_a_row = np.zeros(runs, int)
    flagged = np.zeros(runs, bool)
    for k in range(1, evaluations):
        in_a_row = np.where(hits[:, k], in_a_row + 1, 0)
        flagged |= in_a_row >= patience
    return float(flagged.mean())


@functools.lru_cache(maxsize=256)
def calibrated_z(
    evaluations: int, units: int, signals: int, patience: int, rate: float, rho: float = 0.0, runs: int = 2000
) -> float:
    """The smallest z (in steps of 0.25, at most 10) whose `null_flag_rate` under these conditions is ≤ `rate`: a
    bisection, the rate falling with z on the same simulated noise."""
    grid = np.arange(1.0, 10.25, 0.25)
    low, high = 0, len(grid) - 1  # the answer lies in grid[low..high]
    while low < high:
        middle = (low + high) // 2
        if null_flag_rate(evaluations, units, signals, float(grid[middle]), patience, rho, runs) <= rate:
            high = middle
        else:
            low = middle + 1
    return float(grid[low])


def lag_one_correlation(signals: list[Signal]) -> float:
    """The signals' noise correlation between consecutive evaluations: of each unit's deviation from the mean over
    units, pooled over units, evaluations and signals (0 where it cannot be estimated; negative values count as 0)."""
    pairs = []
    for signal in signals:
        with warnings.catch_warnings():  # an evaluation no unit recorded: its mean is NaN, and so its deviations
            warnings.simplefilter("ignore", RuntimeWarning)
            deviation = signal.values - np.nanmean(signal.values, axis=1, keepdims=True)
        a, b = deviation[:-1].ravel(), deviation[1:].ravel()
        keep = np.isfinite(a) & np.isfinite(b)
        pairs.append((a[keep], b[keep]))
    a, b = (np.concatenate([p[i] for p in pairs]) if pairs else np.zeros(0) for i in (0, 1))
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return 0.0
    return max(0.0, float(np.corrcoef(a, b)[0, 1]))


def simulated_rho(signals: list[Signal]) -> float:
    """The correlation the null simulation uses: the signals' lag-one correlation rounded to 0.1 and at most 0.9.
    Nearer 1 the simulated noise would stop changing between evaluations and could never fire, while real signals
    keep some fresh noise at every evaluation."""
    return min(0.9, round(lag_one_correlation(signals), 1))


def rule_z(z: float, false_alarms: float | None, patience: int, evaluations: int, signals: list[Signal]) -> float:
    """The rule's z: `z` as set, or, with `false_alarms` set, the z calibrated to that rate on pure noise under the
    run's conditions: its planned `evaluations`, the fewest units of its signals, their number, and their lag-one
    correlation so far (`simulated_rho`)."""
    units = min((signal.values.shape[1] for signal in signals), default=0)
    if false_alarms is None or units < 2:  # one unit has no standard error: the rule cannot fire at any z
        return z
    return calibrated_z(evaluations, units, len(signals), patience, false_alarms, simulated_rho(signals))


def velocity(drift: np.ndarray) -> np.ndarray:
    """Drift added since the previous evaluation, [K, units]; NaN at k = 0."""
    return np.concatenate([np.full((1, drift.shape[1]), np.nan), np.diff(drift, axis=0)])


def record_table(records: list[ItemRecord], key: str, steps: list[int]) -> np.ndarray:
    """`key` after each of `steps` optimisation steps, [steps, items] (NaN where not recorded)."""
    return np.array([[np.nan if (v := r.after(k, key)) is None else v for r in records] for k in steps], float)


def record_signals(records: list[ItemRecord], held_out: list[str]) -> tuple[list[int], np.ndarray, list[Signal]]:
    """The rule's inputs from a noise method's per-step records (each item is a probe unit; the evaluations are the
    steps every item recorded, then the final images): the optimised reward, the held-out rewards
    (`eval_<name>` for each name in `held_out`), the velocity of pixel drift and an ensemble's disagreement."""
    length = min(len(r.steps) for r in records)
    steps = list(range(length)) + ([length] if all(len(r.steps) == length for r in records) else [])
    signals = [Signal(f"eval_{name}", record_table(records, f"eval_{name}", steps)) for name in held_out]
    signals.append(Signal("drift_velocity", velocity(record_table(records, "drift_rmse", steps)), False))
    if records[0].steps and "disagreement" in records[0].steps[0]:
        signals.append(Signal("disagreement", record_table(records, "disagreement", steps), False))
    return steps, record_table(records, "reward", steps), signals


def probe_table(rows: list[ProbeRow], key: str) -> np.ndarray:
    """`key` at each probe evaluation, [evaluations, units]."""
    return np.array([row.units[key] for row in rows], float)


def probe_signals(rows: list[ProbeRow], held_out: list[str]) -> tuple[list[int], np.ndarray, list[Signal]]:
    """The rule's inputs from probe evaluations (`monitor.jsonl` rows): the optimised reward, the held-out rewards,
    diversity (its units are the probe prompts), the velocity of pixel drift and an ensemble's disagreement."""
    signals = [Signal(f"eval_{name}", probe_table(rows, f"eval_{name}")) for name in held_out]
    if "diversity_vendi" in rows[0].units:
        signals.append(Signal("diversity_vendi", probe_table(rows, "diversity_vendi")))
    signals.append(Signal("drift_velocity", velocity(probe_table(rows, "drift_rmse")), higher_is_better=False))
    if "disagreement" in rows[0].units:
        signals.append(Signal("disagreement", probe_table(rows, "disagreement"), higher_is_better=False))
    return [row.step for row in rows], probe_table(rows, "reward"), signals
