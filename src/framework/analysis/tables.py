"""Rendering of experiment results: the table of one experiment as CSV, Markdown and LaTeX, and its figure (curves
against the optimisation step, a Pareto scatter, or trade-off trajectories), each figure's data as CSV beside it.
"""

import csv
from pathlib import Path

import numpy as np

from framework.analysis.figures import pyplot, save
from framework.analysis.statistics import run_metric
from framework.config.methods import method_kind
from framework.core.atomic import atomic_open, write_text
from framework.core.records import read_records, step_curve


def exact(value: float) -> str:
    """A number as CSV text that reads back as the same float (the shortest round-trip form): readers compare
    tightly."""
    return repr(float(value))


def table_metrics(spec: dict) -> list[str]:
    """The metric columns: `win_rate` becomes one `win_rate:<judge>` column per judge (default: the reward)."""
    judges = spec.get("judges", ["reward"])
    return [col for m in spec["metrics"] for col in ([f"win_rate:{j}" for j in judges] if m == "win_rate" else [m])]


def write_tables(rows: list[dict], metrics: list[str], title: str, stem: Path, axes: tuple[str, ...] = ()) -> None:
    """CSV (grid axes, mean, low, high per metric), Markdown and LaTeX (mean ± half-width of the interval); a
    status column when some run did not finish (rows' "status" other than "ok")."""
    status = any(row.get("status", "ok") != "ok" for row in rows)
    extra = lambda row: [row.get("status", "ok")] if status else []  # noqa: E731
    with atomic_open(stem.with_suffix(".csv"), newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["run", *axes, "items"]
            + [f"{m}_{part}" for m in metrics for part in ("mean", "low", "high")]
            + (["status"] if status else [])
        )
        for row in rows:
            writer.writerow(
                [row["run"], *(row[a] for a in axes), row["items"]]
                + [exact(v) for m in metrics for v in row[m]]
                + extra(row)
            )

    def cell(ci: tuple) -> str:  # "—": not recorded by this run (e.g. held_out.* of a method without steps)
        if np.isnan(ci[0]):
            return "—"
        return f"{ci[0]:.3f}" if np.isnan(ci[1]) else f"{ci[0]:.3f} ± {(ci[2] - ci[1]) / 2:.3f}"

    over = "items" + ("; win_rate: over prompts" if any(m.startswith("win_rate") for m in metrics) else "")
    columns = metrics + (["status"] if status else [])
    md = [
        f"**{title}** (mean ± half-width of the bootstrap 95 % interval over {over})",
        "",
        "| run | items | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    md += [
        f"| {r['run']} | {r['items']} | " + " | ".join([cell(r[m]) for m in metrics] + extra(r)) + " |" for r in rows
    ]
    write_text(stem.with_suffix(".md"), "\n".join(md) + "\n")
    tex = lambda text: text.replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    lines = [
        r"\begin{tabular}{l r " + "c " * len(metrics) + ("l " if status else "") + "}",
        r"\toprule",
        "run & items & " + " & ".join(tex(m) for m in columns) + r" \\",
        r"\midrule",
    ]
    lines += [
        f"{tex(r['run'])} & {r['items']} & "
        + " & ".join([cell(r[m]).replace("±", r"$\pm$") for m in metrics] + [tex(x) for x in extra(r)])
        + r" \\"
        for r in rows
    ]
    lines += [r"\bottomrule", r"\end{tabular}"]
    write_text(stem.with_suffix(".tex"), "\n".join(lines) + "\n")


def by_cell(runs: list) -> list[tuple[str, list[int]]]:
    """The indices of each grid cell's runs, in order, with the cell's name ("" without a grid): figures draw one
    row of panels per cell, since the cells' rewards need not share a scale (brightness against a learned proxy)."""
    cells: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        cells.setdefault(" · ".join(run.cell.values()), []).append(i)
    return list(cells.items())


def draw_curves(runs: list, metrics: list[str], title: str, path: Path) -> Path:
    """Mean of each metric over items against the optimisation step, one line per run, one row per grid cell; the
    plotted values go to <path stem>_curves.csv."""
    plt = pyplot()
    cells = by_cell(runs)
    fig, axes = plt.subplots(len(cells), len(metrics), figsize=(4 * len(metrics), 3.2 * len(cells)), squeeze=False)
    data = path.with_name(f"{path.stem}_curves.csv")
    with atomic_open(data, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "step", "items", *metrics])
        for panels, (cell, members) in zip(axes, cells):
            for run in (runs[i] for i in members):
                num_steps = max((len(r.steps) for r in read_records(run.dir)), default=0)
                curve = step_curve(run.dir, list(range(num_steps + 1)), metrics)
                writer.writerows([run.name, c["step"], c["items"], *(exact(c[m]) for m in metrics)] for c in curve)
                for ax, metric in zip(panels, metrics):
                    ax.plot([c["step"] for c in curve], [c[metric] for c in curve], label=run.label)
            for ax, metric in zip(panels, metrics):
                ax.set_xlabel("optimisation step")
                ax.set_title(f"{metric} ({cell})" if cell else metric, fontsize=9)
            panels[0].legend(fontsize=7)
    save(fig, title, path, fontsize=12)
    return data


def draw_pareto(runs: list, rows: list[dict], x: str, y: str, title: str, path: Path) -> None:
    """One point per run; runs of a family (the first word of the label, e.g. DRaFT, LoRA, AIG) joined by a line;
    one panel per grid cell. The plotted values are the table's CSV."""
    plt = pyplot()
    cells = by_cell(runs)
    fig, axes = plt.subplots(1, len(cells), figsize=(5.5 * len(cells), 4), squeeze=False)
    for ax, (cell, members) in zip(axes[0], cells):
        families: dict[str, list[dict]] = {}
        for row in (rows[i] for i in members):
            families.setdefault(row["label"].split()[0], []).append(row)
        for family, points in families.items():
            ax.plot([r[x][0] for r in points], [r[y][0] for r in points], "o-", label=family)
            for r in points:
                ax.annotate(" ".join(r["label"].split()[1:]), (r[x][0], r[y][0]), fontsize=6)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
        ax.set_title(cell, fontsize=9)
    save(fig, title, path)


def draw_tradeoff(runs: list, rows: list[dict], y: str, xs: list[str], title: str, path: Path) -> Path:
    """y against each x: per run, the item means after every optimisation step (a trajectory from the base images)
    ending at the final images' means with their bootstrap 95 % intervals, one row per grid cell; runs without
    optimisation steps (base, Best-of-N, adapters) are their final point only. The trajectories go to
    <path stem>_trajectories.csv."""
    plt = pyplot()
    cells = by_cell(runs)
    fig, axes = plt.subplots(len(cells), len(xs), figsize=(5 * len(xs), 4 * len(cells)), squeeze=False)
    data = path.with_name(f"{path.stem}_trajectories.csv")
    with atomic_open(data, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "step", "items", y, *xs])
        for panels, (cell, members) in zip(axes, cells):
            for run, row in ((runs[i], rows[i]) for i in members):
                records = read_records(run.dir)
                optimised = run.cfg is not None and method_kind(run.cfg.method) == "optimises_noise"
                num_steps = max((len(r.steps) for r in records), default=0) if optimised else 0
                curve = step_curve(run.dir, list(range(num_steps)), [y, *xs])
                writer.writerows([run.name, c["step"], c["items"], *(exact(c[k]) for k in (y, *xs))] for c in curve)
                for ax, x in zip(panels, xs):
                    (line,) = ax.plot([c[x] for c in curve] + [row[x][0]], [c[y] for c in curve] + [row[y][0]], lw=1)
                    ax.errorbar(
                        row[x][0],
                        row[y][0],
                        xerr=[[row[x][0] - row[x][1]], [row[x][2] - row[x][0]]],
                        yerr=[[row[y][0] - row[y][1]], [row[y][2] - row[y][0]]],
                        fmt="o",
                        color=line.get_color(),
                        ms=4,
                        capsize=2,
                        label=run.label,
                    )
            for ax, x in zip(panels, xs):
                ax.set_xlabel(x)
                ax.set_ylabel(f"{y} ({cell})" if cell else y)
            panels[0].legend(fontsize=6)
    save(fig, title, path)
    return data


def aggregate(name: str, spec: dict, runs: list, tables: Path, statuses: dict[str, str] | None = None) -> list[Path]:
    """Tables (and the figure) of one experiment; `statuses`: run name -> why it did not finish, shown in a
    status column (its finished items still count)."""
    tables.mkdir(parents=True, exist_ok=True)
    axes = tuple(runs[0].cell)
    rows = []
    for run in runs:
        measured = {m: run_metric(m, run, spec, runs) for m in table_metrics(spec)}
        rows.append(
            {
                "run": run.name,
                "label": run.label,
                **run.cell,
                "items": max(n for n, _ in measured.values()),
                "status": (statuses or {}).get(run.name, "ok"),
            }
            | {m: ci for m, (_, ci) in measured.items()}
        )
    metrics = [m for m in table_metrics(spec) if any(not np.isnan(row[m][0]) for row in rows)]
    for metric in sorted(set(table_metrics(spec)) - set(metrics)):
        print(f"note: {name}: no run recorded {metric}; left out of the table", flush=True)
    write_tables(rows, metrics, spec["title"], tables / name, axes)
    written = [tables / f"{name}.{ext}" for ext in ("csv", "md", "tex")]
    if spec["kind"] == "curve":
        curves = spec.get("curves") or [m for m in spec["metrics"] if not m.startswith(("sets.", "last.", "win_rate"))]
        written.append(draw_curves(runs, curves, spec["title"], tables / f"{name}.png"))
    if spec["kind"] == "pareto":
        draw_pareto(runs, rows, spec["pareto"]["x"], spec["pareto"]["y"], spec["title"], tables / f"{name}.png")
    if spec["kind"] == "tradeoff":
        axes_ = spec["tradeoff"]
        written.append(draw_tradeoff(runs, rows, axes_["y"], axes_["x"], spec["title"], tables / f"{name}.png"))
    if spec["kind"] == "overoptimisation":
        from framework.analysis.overoptimisation import analyse, write_outputs

        written += write_outputs(*analyse(runs), spec["title"], tables / name)
    elif spec["kind"] == "monitor":
        from framework.analysis.monitor_study import analyse, write_outputs

        split = spec["monitor"]
        written += write_outputs(*analyse(runs, split["tune"], split["report"]), spec["title"], tables / name)
    elif spec["kind"] != "table":
        written.append(tables / f"{name}.png")
    return written
