"""Over-optimisation of a learned reward measured against gold: the analysis of a `kind: overoptimisation`
experiment (Gao, Schulman and Hilton, "Scaling Laws for Reward Model Overoptimization", ICML 2023, on the testbed).

Every run becomes a path of points, each the mean over the run's items of the proxy (the optimised reward), gold,
drift and, where defined, d = √KL from the base sampler:

- a run with optimisation steps (the noise methods): one point per step, then its final images;
- Best-of-N: one point per n = 1, 2, 4, …, N: for each item the unbiased estimate of the value of the best of n
  of its N candidates by the proxy (the k-th lowest-scored candidate is the best of a random n-subset with
  probability C(k−1, n−1)/C(N, n)), with d = √(log n − (n − 1)/n), the KL of Best-of-n from the base sampler;
- any other run (Base, DRaFT, LoRA scaling, AIG): its final images, d = √(mean of the items' `kl`) when sampled at
  η > 0 (the path KL of the adapted sampler from the base one).

The peak is the highest point of the mean gold curve, with a bootstrap 95 % interval over items (the items are
resampled and the curve's maximum and its place recomputed); a family (a label's first word on one proxy) peaks at
the best point of all its runs (the best gold any of its strengths and steps reaches, items paired). Fits of the
gold gain Δg = gold − gold(d = 0): Gao's Best-of-N form d(α − βd) on Best-of-n, and the RL form d(α − β log d)
on the adapted samplers (DRaFT at each λ, LoRA scaling, AIG: the policies whose path KL is defined), by least
squares.
"""

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from framework.analysis.figures import pyplot, save
from framework.config.methods import method_kind
from framework.core.atomic import atomic_open, write_text
from framework.core.records import ItemRecord, read_records

KEYS = ("reward", "gold", "adherence", "drift_rmse", "drift_embedding")
BOOTSTRAP = 2000


@dataclass
class RunPath:
    """A run's points: x (step, n, or 0), d per point (NaN where undefined) and values [items, points] per key."""

    run: str
    family: str
    x_kind: str  # "step" | "n" | "final"
    x: list[int]
    d: np.ndarray
    values: dict[str, np.ndarray]
    items: list[str]


def best_of_n_weights(num: int, n: int) -> np.ndarray:
    """P(the k-th lowest of `num` candidates is the best of a random n-subset), k = 1..num."""
    k = np.arange(1, num + 1)
    return np.array([math.comb(int(i) - 1, n - 1) for i in k], dtype=float) / math.comb(num, n)


def best_of_n_d(n: int) -> float:
    return math.sqrt(math.log(n) - (n - 1) / n)


def run_path(run, records: list[ItemRecord]) -> RunPath:
    comparisons = run.cfg.reward.get("comparisons") if run.cfg is not None else None
    family = run.label.split()[0] + (f" · proxy {comparisons}" if run.cfg.reward.name == "proxy" else "")
    ids = [r.id for r in records]
    if method_kind(run.cfg.method) == "optimises_noise":
        steps = min(len(r.steps) for r in records)
        x = list(range(steps + 1))
        values = {key: np.array([[_nan(r.after(k, key)) for k in x] for r in records]) for key in KEYS}
        return RunPath(run.name, family, "step", x, np.full(len(x), np.nan), values, ids)
    if run.cfg.method.name == "best_of_n":
        num = min(len(r.steps) for r in records)
        x = [2**i for i in range(int(math.log2(num)) + 1)]
        values = {key: np.zeros((len(records), len(x))) for key in KEYS}
        for i, r in enumerate(records):
            candidates = r.steps[:num]
            order = np.argsort([c["reward"] for c in candidates], kind="stable")
            for key in KEYS:
                column = np.array([_nan(candidates[j].get(key)) for j in order])
                values[key][i] = [best_of_n_weights(num, n) @ column for n in x]
        return RunPath(run.name, family, "n", x, np.array([best_of_n_d(n) for n in x]), values, ids)
    kls = [r.final("kl") for r in records]
    d = math.sqrt(np.mean(kls)) if kls and None not in kls else (0.0 if run.cfg.method.name == "base" else np.nan)
    values = {key: np.array([[_nan(r.final(key))] for r in records]) for key in KEYS}
    return RunPath(run.name, family, "final", [0], np.array([d]), values, ids)


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def peak(values: np.ndarray, seed: int = 0) -> dict:
    """The highest point of the item-mean curve of `values` [items, points] and its bootstrap interval: value,
    its place (point index), each with (low, high)."""
    curve = np.nanmean(values, 0)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(BOOTSTRAP, len(values)))
    curves = np.nanmean(values[draws], 1)  # [BOOTSTRAP, points]
    tops, places = curves.max(1), curves.argmax(1)
    return {
        "value": float(curve.max()),
        "value_ci": tuple(np.percentile(tops, [2.5, 97.5])),
        "at": int(curve.argmax()),
        "at_ci": tuple(int(v) for v in np.percentile(places, [2.5, 97.5])),
    }


def fit(d: np.ndarray, gain: np.ndarray, form: str) -> dict:
    """Least-squares (α, β) of Δg = d(α − βd) ("bon") or d(α − β log d) ("rl"), and the fit's RMS residual."""
    basis = np.stack([d, -d * (d if form == "bon" else np.log(np.maximum(d, 1e-12)))], 1)
    (alpha, beta), *_ = np.linalg.lstsq(basis, gain, rcond=None)
    residual = float(np.sqrt(np.mean((basis @ [alpha, beta] - gain) ** 2)))
    return {"form": form, "alpha": float(alpha), "beta": float(beta), "rms_residual": residual, "points": len(d)}


def analyse(runs: list) -> tuple[list[RunPath], list[dict], list[dict]]:
    """Every run's path, the peaks (per run, then per family) and the fits."""
    paths = [run_path(run, read_records(run.dir)) for run in runs]
    paths = [p for p in paths if p.items]
    peaks = []
    for p in paths:
        top = peak(p.values["gold"])
        peaks.append(
            {
                "row": p.run,
                "kind": "run",
                "points": len(p.x),
                **top,
                "at": f"{p.x_kind} {p.x[top['at']]}",
                "at_ci": f"{p.x[top['at_ci'][0]]}–{p.x[top['at_ci'][1]]}",
                "proxy_at_peak": float(np.nanmean(p.values["reward"][:, top["at"]])),
                "last_gold": float(np.nanmean(p.values["gold"][:, -1])),
                "last_proxy": float(np.nanmean(p.values["reward"][:, -1])),
            }
        )
    for family in dict.fromkeys(p.family for p in paths):
        members = [p for p in paths if p.family == family]
        shared = sorted(set.intersection(*(set(p.items) for p in members)))
        columns = np.concatenate([p.values["gold"][[p.items.index(i) for i in shared]] for p in members], 1)
        labels = [(p.run, p.x_kind, x) for p in members for x in p.x]
        top = peak(columns)
        peaks.append(
            {
                "row": family,
                "kind": "family",
                "points": columns.shape[1],
                **top,
                "at": "{} at {} {}".format(*labels[top["at"]]),
                "at_ci": "",
                "proxy_at_peak": float("nan"),
                "last_gold": float("nan"),
                "last_proxy": float("nan"),
            }
        )
    fits = []
    base = next((p for p in paths if p.x_kind == "n"), None)
    if base is not None and len(base.x) >= 3:
        gold = np.nanmean(base.values["gold"], 0)
        fits.append({"row": base.run, **fit(base.d[1:], gold[1:] - gold[0], "bon")})
    # The adapted samplers (DRaFT at each λ, LoRA α, AIG p): every policy with a path KL, on one gold-vs-d frontier
    adapted = [p for p in paths if p.x_kind == "final" and np.isfinite(p.d[0]) and p.d[0] > 0]
    reference = next((p for p in paths if p.run.split()[0] == "Base"), None)
    if reference is not None and len(adapted) >= 3:
        d = np.array([p.d[0] for p in adapted])
        gain = np.array([np.nanmean(p.values["gold"]) for p in adapted]) - np.nanmean(reference.values["gold"])
        fits.append({"row": "adapted samplers (" + ", ".join(p.run for p in adapted) + ")", **fit(d, gain, "rl")})
    return paths, peaks, fits


def write_outputs(paths: list[RunPath], peaks: list[dict], fits: list[dict], title: str, stem: Path) -> list[Path]:
    """<stem>_peaks.{csv,md}, <stem>_fits.{csv,md}, <stem>_curves.csv (every path's points) and <stem>.png."""
    written = []
    for name, rows in (("peaks", peaks), ("fits", fits)):
        if not rows:
            continue
        columns = list(rows[0])
        path = stem.with_name(f"{stem.name}_{name}.csv")
        with atomic_open(path, newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([_text(row[c]) for c in columns] for row in rows)
        md = [f"**{title}: {name}**", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        md += ["| " + " | ".join(_text(row[c], 3) for c in columns) + " |" for row in rows]
        write_text(path.with_suffix(".md"), "\n".join(md) + "\n")
        written += [path, path.with_suffix(".md")]
    curves = stem.with_name(f"{stem.name}_curves.csv")
    with atomic_open(curves, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "family", "x_kind", "x", "d", "items", *KEYS])
        for p in paths:
            means = {key: np.nanmean(p.values[key], 0) for key in KEYS}
            for j, x in enumerate(p.x):
                writer.writerow(
                    [
                        p.run,
                        p.family,
                        p.x_kind,
                        x,
                        repr(float(p.d[j])),
                        len(p.items),
                        *(repr(float(means[key][j])) for key in KEYS),
                    ]
                )
    written += [curves, draw(paths, fits, title, stem.with_suffix(".png"))]
    return written


def _text(value, digits: int | None = None) -> str:
    if isinstance(value, tuple):
        return "–".join(_text(v, digits) for v in value)
    if isinstance(value, float):
        return "—" if math.isnan(value) else (f"{value:.{digits}f}" if digits else repr(value))
    return str(value)


def draw(paths: list[RunPath], fits: list[dict], title: str, path: Path) -> Path:
    """Gold and proxy against the step; gold against d (with the fits), pixel drift and embedding drift."""
    plt = pyplot()
    panels = [("step", "gold"), ("step", "reward"), ("d", "gold"), ("drift_rmse", "gold"), ("drift_embedding", "gold")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (x_key, y_key) in zip(axes, panels):
        for p in paths:
            y = np.nanmean(p.values[y_key], 0)
            if x_key == "step":
                if p.x_kind == "step":
                    ax.plot(p.x, y, lw=1, label=p.run)
                continue
            x = p.d if x_key == "d" else np.nanmean(p.values[x_key], 0)
            if np.isfinite(x).any():
                ax.plot(x, y, "o-" if len(x) > 1 else "o", lw=1, ms=3, label=p.run)
        if x_key == "d":
            for f, p in ((f, next((q for q in paths if q.run == f["row"]), None)) for f in fits):
                if f["form"] == "bon" and p is not None:
                    grid = np.linspace(0, p.d.max(), 50)
                    g0 = np.nanmean(p.values["gold"][:, 0])
                    ax.plot(grid, g0 + grid * (f["alpha"] - f["beta"] * grid), "k--", lw=1, label="Best-of-N fit")
        ax.set_xlabel("√KL (d)" if x_key == "d" else x_key)
        ax.set_ylabel("proxy" if y_key == "reward" else y_key)
    axes[0].legend(fontsize=5)
    axes[2].legend(fontsize=5)
    save(fig, title, path)
    return path
