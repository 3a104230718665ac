"""Matplotlib for the figures of runs and experiments: headless (Agg), one way to title, save and close a figure,
and a fine-tuning run's probe curves."""

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, title: str, path: Path, fontsize: int = 9) -> None:
    """The figure, titled, to `path` whole (written aside, then renamed into place), and closed."""
    from framework.core.atomic import replaced

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    with replaced(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip("."))
    pyplot().close(fig)


def draw_probe_curves(rows: list, decision: dict | None, path: Path) -> None:
    """monitor.png: one panel per probe metric (framework.core.hacking.ProbeRow) against the optimiser step; the
    monitor's flag (its decision, as summary.json keeps it) as a vertical line."""
    plt = pyplot()
    flagged = None if decision is None else decision.get("hacking_step")
    keys = list(dict.fromkeys(k for row in rows for k in row.means))
    columns = 4
    fig, axes = plt.subplots(-(-len(keys) // columns), columns, figsize=(3 * columns, 2.4 * -(-len(keys) // columns)))
    for ax, key in zip(axes.flat, keys):
        steps = [row.step for row in rows if key in row.means]
        ax.plot(steps, [row.means[key] for row in rows if key in row.means], marker=".")
        ax.set_title(key, fontsize=8)
        if flagged is not None:
            ax.axvline(flagged, color="tab:red", linestyle="--", linewidth=1)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    title = "probe set" + ("" if flagged is None else f": hacking flagged at step {flagged} ({decision['signal']})")
    save(fig, title, path)
