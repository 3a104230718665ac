"""`python -m framework.experiments [--scale testbed|paper] [--experiment NAME ...]` (`make reproduce-tables`).

An experiment is a YAML file in experiments/: named runs (lists of `framework.run` overrides), overrides shared by
every run at each scale, and how to aggregate. Runs that are missing or unfinished are run (each run directory
resumes: finished items are kept); then every experiment is aggregated from the run directories into
outputs/tables/<scale>/<name>.{csv,md,tex} (run means with bootstrap 95 % intervals over items) and, for
`kind: curve`, <name>.png (mean value against the optimisation step).

    title: ...
    kind: table | curve | pareto
    metrics: [reward, adherence, drift_rmse]     # see below
    scales: {testbed: [overrides...], paper: [overrides...]}
    runs: {label: [overrides...], ...}           # "{run:LABEL}" in an override is that run's directory
    versus: LABEL                                # win_rate: share of items where LABEL's image beats the row's
    judge: reward                                # ... under the optimised reward or a recorded eval_<name>
    pareto: {x: sets.final_diversity_vendi, y: reward}   # kind pareto: the scatter to draw

Metrics: per-item final values (`reward` = the optimised reward, `adherence`, `drift_rmse`, `eval_<name>`, ...; mean
and bootstrap interval over items), run-level `sets.<key>` of summary.json (CMMD, diversity, spectral distance; a
single value) and `win_rate` (bootstrap interval over prompts).
"""

import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from framework.errors import FrameworkError
from framework.report import final_value, ok_records, step_curve

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
KINDS = ("table", "curve", "pareto")


def load_experiment(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    missing = {"title", "kind", "metrics", "scales", "runs"} - set(spec or {})
    if missing:
        raise FrameworkError(f"{path}: missing keys {', '.join(sorted(missing))}")
    if spec["kind"] not in KINDS:
        raise FrameworkError(f"{path}: kind {spec['kind']!r} is not one of {', '.join(KINDS)}")
    return spec


GREEK = {"α": "alpha", "β": "beta", "γ": "gamma", "λ": "lambda"}


def slug(label: str) -> str:
    """A directory name Hydra's override grammar accepts unquoted (ASCII letters, digits, . _ -)."""
    for letter, name in GREEK.items():
        label = label.replace(letter, name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


def ensure_run(overrides: list[str], run_dir: Path) -> None:
    """Run (or resume) one configuration; a run whose summary reports every item finished is left alone."""
    summary = run_dir / "summary.json"
    if summary.exists():
        counts = json.loads(summary.read_text())
        if counts["num_ok"] == counts["num_items"]:
            return
    print(f"running {run_dir}: {' '.join(overrides)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "framework.run", *overrides, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
        raise FrameworkError(f"run {run_dir} failed: {' / '.join(lines[-2:])}")


def final_values(run_dir: Path, metric: str) -> np.ndarray:
    values = [final_value(record, metric) for record in ok_records(run_dir)]
    return np.array([v for v in values if v is not None], dtype=float)


def run_metric(metric: str, run_dir: Path, spec: dict, run_dirs: dict[str, Path]) -> tuple[int, tuple]:
    """(items, (value, low, high)) of one metric of one run; low/high are NaN for single run-level values."""
    from framework.report import versus

    if metric.startswith("sets."):
        sets = json.loads((run_dir / "summary.json").read_text()).get("sets", {})
        value = sets.get(metric.removeprefix("sets."), float("nan"))
        return 0, (value, float("nan"), float("nan"))
    if metric == "win_rate":
        if "versus" not in spec:
            raise FrameworkError("metric win_rate needs `versus: <run label>` in the experiment")
        result = versus(run_dirs[spec["versus"]], run_dir, spec.get("judge", "reward"))
        return result["items"], (result["rate"], result["low"], result["high"])
    values = final_values(run_dir, metric)
    return len(values), mean_ci(values)


def mean_ci(values: np.ndarray, num_bootstrap: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and bootstrap 95 % percentile interval over items."""
    if len(values) == 0:
        return (float("nan"),) * 3
    draws = np.random.default_rng(seed).integers(0, len(values), size=(num_bootstrap, len(values)))
    low, high = np.percentile(values[draws].mean(1), [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def write_tables(rows: list[dict], metrics: list[str], title: str, stem: Path) -> None:
    """CSV (mean, low, high per metric), Markdown and LaTeX (mean ± half-width of the interval)."""
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "items"] + [f"{m}_{part}" for m in metrics for part in ("mean", "low", "high")])
        for row in rows:
            writer.writerow([row["run"], row["items"]] + [f"{v:.6g}" for m in metrics for v in row[m]])
    cell = lambda ci: f"{ci[0]:.3f}" if np.isnan(ci[1]) else f"{ci[0]:.3f} ± {(ci[2] - ci[1]) / 2:.3f}"  # noqa: E731
    md = [f"**{title}** (mean ± half-width of the bootstrap 95 % interval over items)", "",
          "| run | items | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    md += [f"| {r['run']} | {r['items']} | " + " | ".join(cell(r[m]) for m in metrics) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    tex = lambda text: text.replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    lines = [r"\begin{tabular}{l r " + "c " * len(metrics) + "}", r"\toprule",
             "run & items & " + " & ".join(tex(m) for m in metrics) + r" \\", r"\midrule"]
    lines += [f"{tex(r['run'])} & {r['items']} & " + " & ".join(cell(r[m]).replace("±", r"$\pm$") for m in metrics)
              + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    stem.with_suffix(".tex").write_text("\n".join(lines) + "\n")


def draw_curves(run_dirs: dict[str, Path], metrics: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for label, run_dir in run_dirs.items():
        num_steps = max((len(r.get("steps", [])) for r in ok_records(run_dir)), default=0)
        curve = step_curve(run_dir, list(range(num_steps + 1)), metrics)
        for ax, metric in zip(axes[0], metrics):
            ax.plot([row["step"] for row in curve], [row[metric] for row in curve], label=label)
    for ax, metric in zip(axes[0], metrics):
        ax.set_xlabel("optimisation step")
        ax.set_title(metric)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_pareto(rows: list[dict], x: str, y: str, title: str, path: Path) -> None:
    """One point per run; runs of a family (the first word of the label, e.g. DRaFT, LoRA, AIG) joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(row["run"].split()[0], []).append(row)
    for family, members in families.items():
        ax.plot([r[x][0] for r in members], [r[y][0] for r in members], "o-", label=family)
        for r in members:
            ax.annotate(r["run"].removeprefix(family).strip(), (r[x][0], r[y][0]), fontsize=6)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reproduce(name: str, scale: str, out: Path, experiments_dir: Path = EXPERIMENTS_DIR) -> list[Path]:
    path = experiments_dir / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in experiments_dir.glob("*.yaml"))
        raise FrameworkError(f"no experiment {name!r}; choose from: {', '.join(options)}")
    spec = load_experiment(path)
    if scale not in spec["scales"]:
        raise FrameworkError(f"experiment {name} has no scale {scale!r}; it has: {', '.join(spec['scales'])}")
    run_dirs = {label: out / "runs" / scale / name / slug(label) for label in spec["runs"]}
    for label, overrides in spec["runs"].items():  # in order: a run may use an earlier one's outputs
        overrides = [re.sub(r"\{run:([^}]+)\}", lambda m: str(run_dirs[m.group(1)].resolve()), o) for o in overrides]
        ensure_run([*spec["scales"][scale], *overrides], run_dirs[label])
    tables = out / "tables" / scale
    tables.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, run_dir in run_dirs.items():
        measured = {m: run_metric(m, run_dir, spec, run_dirs) for m in spec["metrics"]}
        rows.append({"run": label, "items": max(n for n, _ in measured.values())} |
                    {m: ci for m, (_, ci) in measured.items()})
    write_tables(rows, spec["metrics"], spec["title"], tables / name)
    written = [tables / f"{name}.{ext}" for ext in ("csv", "md", "tex")]
    if spec["kind"] == "curve":
        draw_curves(run_dirs, spec["metrics"], spec["title"], tables / f"{name}.png")
        written.append(tables / f"{name}.png")
    if spec["kind"] == "pareto":
        draw_pareto(rows, spec["pareto"]["x"], spec["pareto"]["y"], spec["title"], tables / f"{name}.png")
        written.append(tables / f"{name}.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="testbed")
    parser.add_argument("--experiment", nargs="*", help="names in experiments/ (default: all)")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    args = parser.parse_args()
    names = args.experiment or sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    try:
        for name in names:
            for path in reproduce(name, args.scale, args.out):
                print(f"{name}: {path}")
    except FrameworkError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
