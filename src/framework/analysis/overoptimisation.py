"""Over-optimisation of a learned reward measured against gold: the analysis of a `kind: overoptimisation`
experiment (Gao, Schulman and Hilton, "Scaling Laws for Reward Model Overoptimization", ICML 2023, on the testbed).

Every run becomes a path of points, each the mean over the run's items of the proxy (the optimised reward), gold,
drift and, where defined, d = √KL from the base sampler:

- a run with optimisation steps (the noise methods): one point per step, then its final images;
- Best-of-N: one point per n = 1, 2, 4, …, N: for each item the unbiased estimate of the value of the best of n
  of its N candidates by the proxy (the k-th lowest-scored candidate is the best of a random n-subset with
  probability C(k−1, n−1)/C(N, n)), with d = √(log n − (n − 1)/n), the KL of Best-of-n from the base sampler;
- a fine-tuning run watched along training (`monitor.every`, sampled at η > 0): one point per probe evaluation, its
  units the probe images, d = √(mean of the units' path KL from the base sampler) (framework.methods.probe);
- any other run (Base, DRaFT, LoRA scaling, AIG): its final images, d = √(mean of the items' `kl`) when sampled at
  η > 0 (the path KL of the adapted sampler from the base one).

The peak is the highest point of the mean gold curve, with a bootstrap 95 % interval over items (the items are
resampled and the curve's maximum and its place recomputed); a family (a label's first word on one proxy) peaks at
the best point of all its runs (the best gold any of its strengths and steps reaches, items paired). Gao's forms are
fitted, by least squares, to the gold gain Δg = gold − gold(d = 0) along one path: d(α − βd) on Best-of-n, and the
RL form d(α − β log d) along each fine-tuning run watched in training (the policy at each checkpoint), with
bootstrap 95 % intervals over items on α and β. The two kinds of d are different quantities and get separate axes;
a fitted optimum is reported only inside the range of d the path covers.
"""

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from framework.analysis.figures import pyplot, save
from framework.config.methods import method_kind
from framework.core.atomic import atomic_open, write_text
from framework.core.hacking import probe_table, read_probe_rows
from framework.core.records import ItemRecord, read_records

KEYS = ("reward", "gold", "gold_match", "gold_quality", "gold_clean", "adherence", "drift_rmse", "drift_embedding")
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
    kl: np.ndarray | None = None  # [items, points]: a policy's path KL per unit, from which d is recomputed

    def d_of(self, rows: np.ndarray) -> np.ndarray:
        """d per point over the items `rows` (a bootstrap draw): recomputed from the units' KL where it has them."""
        return self.d if self.kl is None else np.sqrt(self.kl[rows].mean(0))


def best_of_n_weights(num: int, n: int) -> np.ndarray:
    """P(the k-th lowest of `num` candidates is the best of a random n-subset), k = 1..num."""
    k = np.arange(1, num + 1)
    return np.array([math.comb(int(i) - 1, n - 1) for i in k], dtype=float) / math.comb(num, n)


def best_of_n_d(n: int) -> float:
    return math.sqrt(math.log(n) - (n - 1) / n)


def run_path(run, records: list[ItemRecord]) -> RunPath:
    comparisons = run.cfg.reward.get("comparisons") if run.cfg is not None else None
    family = run.label.split()[0] + (f" · proxy {comparisons}" if run.cfg.reward.name == "proxy" else "")
    family = " · ".join([family, *run.cell.values()])  # items of different cells (e.g. seeds) are not the same
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
    rows = read_probe_rows(run.dir)
    if rows and "kl" in rows[0].units:  # a policy watched along training: its probe set's units
        kl = probe_table(rows, "kl").T
        values = {key: probe_table(rows, key).T if key in rows[0].units else np.full(kl.shape, np.nan) for key in KEYS}
        units = [f"probe {i}" for i in range(len(kl))]
        return RunPath(run.name, family, "step", [row.step for row in rows], np.sqrt(kl.mean(0)), values, units, kl)
    kls = [r.final("kl") for r in records]
    d = math.sqrt(np.mean(kls)) if kls and None not in kls else (0.0 if run.cfg.method.name == "base" else np.nan)
    values = {key: np.array([[_nan(r.final(key))] for r in records]) for key in KEYS}
    return RunPath(run.name, family, "final", [0], np.array([d]), values, ids)


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def peak(values: np.ndarray, seed: int = 0) -> dict:
    """The highest point of the item-mean curve of `values` [items, points] and its bootstrap interval: value,
    its place (point index), the rise from the first point to the peak and the fall from the peak to the last point
    (both paired: the same items resampled at every point), each with (low, high)."""
    curve = np.nanmean(values, 0)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(BOOTSTRAP, len(values)))
    curves = np.nanmean(values[draws], 1)  # [BOOTSTRAP, points]
    tops, places = curves.max(1), curves.argmax(1)
    interval = lambda draws: tuple(np.percentile(draws, [2.5, 97.5]))  # noqa: E731
    return {
        "value": float(curve.max()),
        "value_ci": interval(tops),
        "at": int(curve.argmax()),
        "at_ci": tuple(int(v) for v in np.percentile(places, [2.5, 97.5])),
        "rise": float(curve.max() - curve[0]),
        "rise_ci": interval(tops - curves[:, 0]),
        "fall": float(curve.max() - curve[-1]),
        "fall_ci": interval(tops - curves[:, -1]),
    }


def fit(d: np.ndarray, gain: np.ndarray, form: str) -> tuple[float, float, float]:
    """Least-squares (α, β) of Δg = d(α − βd) ("bon") or d(α − β log d) ("rl"), and the fit's RMS residual."""
    basis = np.stack([d, -d * (d if form == "bon" else np.log(np.maximum(d, 1e-12)))], 1)
    (alpha, beta), *_ = np.linalg.lstsq(basis, gain, rcond=None)
    return float(alpha), float(beta), float(np.sqrt(np.mean((basis @ [alpha, beta] - gain) ** 2)))


def fitted_optimum(alpha: float, beta: float, form: str) -> float:
    """Where the fitted Δg peaks: α/2β (Best-of-n), e^(α/β − 1) (RL); NaN where the fit has no maximum."""
    if beta <= 0:
        return float("nan")
    return alpha / (2 * beta) if form == "bon" else float(np.exp(min(alpha / beta - 1, 700)))


def fit_path(p: RunPath, form: str, seed: int = 0) -> dict:
    """Gao's `form` fitted along one path to the gold gain over its first point (d = 0), with bootstrap 95 %
    intervals over items on α and β (items resampled, d and gold recomputed, refitted); the fitted optimum only if
    it lies within the d the path reaches."""

    def estimate(rows: np.ndarray) -> tuple[float, float, float]:
        d, gold = p.d_of(rows), np.nanmean(p.values["gold"][rows], 0)
        keep = d > 0
        return fit(d[keep], gold[keep] - gold[0], form)

    everyone = np.arange(len(p.items))
    alpha, beta, residual = estimate(everyone)
    draws = np.random.default_rng(seed).integers(0, len(everyone), size=(BOOTSTRAP, len(everyone)))
    alphas, betas, _ = np.array([estimate(rows) for rows in draws]).T
    d_max, optimum = float(p.d.max()), fitted_optimum(alpha, beta, form)
    return {
        "row": p.run,
        "form": form,
        "alpha": alpha,
        "alpha_ci": tuple(np.percentile(alphas, [2.5, 97.5])),
        "beta": beta,
        "beta_ci": tuple(np.percentile(betas, [2.5, 97.5])),
        "rms_residual": residual,
        "points": int((p.d > 0).sum()),
        "d_max": d_max,
        "d_optimum": optimum if optimum <= d_max else float("nan"),
    }


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
                "fall": float("nan"),  # the family's points are several runs': no one last point
                "fall_ci": "",
                "proxy_at_peak": float("nan"),
                "last_gold": float("nan"),
                "last_proxy": float("nan"),
            }
        )
    fits = []
    for p in paths:
        watched = p.x_kind == "step" and np.isfinite(p.d).all() and p.d[0] == 0  # a policy along its training
        if len(p.x) >= 3 and (p.x_kind == "n" or watched):
            fits.append(fit_path(p, "bon" if p.x_kind == "n" else "rl"))
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
            with warnings.catch_warnings():  # a key the run did not record (gold's factors before they were)
                warnings.simplefilter("ignore", RuntimeWarning)
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
        return "—" if math.isnan(value) else (f"{value:.{digits}f}" if digits else repr(float(value)))  # not np.float64
    return str(value)


def draw(paths: list[RunPath], fits: list[dict], title: str, path: Path) -> Path:
    """Gold and proxy against the step; gold against Best-of-n's d and against a policy's d (separate axes: not the
    same quantity), each with its fits; gold against pixel and embedding drift. Bands: ±2 standard errors over items."""
    plt = pyplot()
    panels = [
        ("step", "gold"),
        ("step", "reward"),
        ("d of Best-of-n", "gold"),
        ("d of the policy", "gold"),
        ("drift_rmse", "gold"),
        ("drift_embedding", "gold"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (x_key, y_key) in zip(axes, panels):
        for p in paths:
            if x_key == "step":
                x = np.array(p.x, float) if p.x_kind == "step" else np.full(1, np.nan)
            elif x_key.startswith("d "):
                x = p.d if (p.x_kind == "n") == (x_key == "d of Best-of-n") else np.full(1, np.nan)
            else:
                x = np.nanmean(p.values[x_key], 0)
            if not np.isfinite(x).any():
                continue
            y = np.nanmean(p.values[y_key], 0)
            (line,) = ax.plot(x, y, "o-" if len(x) > 1 else "o", lw=1, ms=2, label=p.run)
            if len(x) > 1 and x_key in ("step", "d of the policy", "d of Best-of-n"):
                band = 2 * np.nanstd(p.values[y_key], 0) / np.sqrt(len(p.items))
                ax.fill_between(x, y - band, y + band, color=line.get_color(), alpha=0.15, lw=0)
        for f in fits if x_key.startswith("d ") else []:
            p = next(q for q in paths if q.run == f["row"])
            if (f["form"] == "bon") == (x_key == "d of Best-of-n"):
                grid = np.linspace(1e-3, p.d.max(), 50)
                shape = grid if f["form"] == "bon" else np.log(grid)
                g0 = np.nanmean(p.values["gold"][:, 0])
                ax.plot(grid, g0 + grid * (f["alpha"] - f["beta"] * shape), "k--", lw=0.8)
        ax.set_xlabel("√KL (" + x_key + ")" if x_key.startswith("d ") else x_key)
        ax.set_ylabel("proxy" if y_key == "reward" else y_key)
    for i in (0, 2, 3):
        axes[i].legend(fontsize=5)
    save(fig, title, path)
    return path
