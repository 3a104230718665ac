"""Matplotlib for the experiment figures: headless (Agg), and one way to title, save and close a figure."""

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, title: str, path: Path, fontsize: int = 9) -> None:
    """The figure, titled, to `path` whole (written aside, then renamed into place), and closed."""
    from framework.atomic import replaced

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    with replaced(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip("."))
    pyplot().close(fig)
