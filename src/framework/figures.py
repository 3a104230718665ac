"""Matplotlib for the experiment figures: headless (Agg), and one way to title, save and close a figure."""

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, title: str, path: Path, fontsize: int = 9) -> None:
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
