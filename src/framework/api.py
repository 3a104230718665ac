"""The Python API, for notebooks and scripts (docs/python.md): compose a run's config, run it in this process, and read
runs and experiments' tables back as objects. It shares everything with `python -m framework.run`: the same
validation and one-line errors (raised, never exiting the interpreter), the same run directory, the same resume.

    import framework
    run = framework.execute(framework.compose(["method=dno", "reward=saturation", "prompts.limit=2"]))
    run.summary.final_reward_mean, run.rows()[0]["final_adherence"], run.image("p0000_s000")
"""

import csv
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from framework.config import compose
from framework.core import signals
from framework.core.errors import Failure, FrameworkError, Interrupted, outcome
from framework.core.records import SUMMARY, ItemRecord, RunSummary, read_records
from framework.core.validation import validate

__all__ = ["Failure", "FrameworkError", "Interrupted", "Run", "compose", "execute", "load_run", "load_tables"]
CONFIG = Path(".hydra") / "config.yaml"  # where the command line's Hydra leaves a run's config


@dataclass
class Run:
    """A run directory read back: what a run wrote, as objects."""

    dir: Path
    records: list[ItemRecord]  # every item written, failed ones included (status, error), by id
    summary: RunSummary | None  # summary.json: run means, set metrics, the monitor's decision; None until it ended
    config: DictConfig | None  # the config it ran with (None if the directory has none)

    def image(self, item: str, kind: str = "final") -> Path:
        """The PNG of item `item` (e.g. "p0000_s000"): its `final` image, or the `base` sample of the same seed."""
        return self.dir / "items" / item / f"{kind}.png"

    def rows(self) -> list[dict]:
        """One flat row per item: id, prompt, seed, status, base_reward, final_reward, `base_<metric>` and
        `final_<metric>` for every image metric, and the method's numeric values of the item; a data frame's rows
        (`pandas.DataFrame(run.rows())`)."""
        rows = []
        for r in self.records:
            row = {k: getattr(r, k) for k in ("id", "prompt", "seed", "status", "base_reward", "final_reward")}
            row |= {f"{stage}_{k}": v for stage, values in r.metrics.items() for k, v in values.items()}
            rows.append(row | {k: v for k, v in r.info.items() if isinstance(v, (int, float))})
        return rows

    def steps(self) -> list[dict]:
        """One row per item and optimisation step or candidate, with what it recorded (reward, metrics, ...)."""
        return [{"id": r.id, "step": k} | step for r in self.records for k, step in enumerate(r.steps)]


def execute(cfg: DictConfig) -> Run:
    """Run `cfg` (from `compose`) in this process: every pending item, resuming what an earlier run in the same
    directory finished, as the command line does (status.json and the config written as it writes them). Returns
    the run read back. Raises FrameworkError on bad input (nothing ran), Failure when some items failed (the others
    are written; `load_run` reads them) and Interrupted when stopped (Ctrl-C or the notebook's interrupt: finished
    items kept, a second interrupt stops at once)."""
    from framework.run import run, write_status

    validate(cfg)
    if cfg.trainer.devices * cfg.trainer.num_nodes > 1:
        raise FrameworkError(
            f"trainer.devices={cfg.trainer.devices}, trainer.num_nodes={cfg.trainer.num_nodes}: several processes "
            "start from the command line (python -m framework.run ...); framework.execute runs in this one"
        )
    run_dir = Path(cfg.output_dir)
    (run_dir / CONFIG).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / CONFIG)
    try:
        with signals.stop_gracefully():
            run(cfg)
    except (Exception, KeyboardInterrupt) as e:
        write_status(run_dir, *outcome(e, run_dir / "error.log"))
        raise
    write_status(run_dir, 0, None)
    return load_run(run_dir)


def load_run(path: str | Path) -> Run:
    """The run in directory `path`, finished or not (any run: the command line's, an experiment's, `execute`'s)."""
    run_dir = Path(path)
    if not (run_dir / "items").is_dir() and not (run_dir / SUMMARY).is_file():
        raise FrameworkError(f"{run_dir}: not a run directory (it has neither items/ nor {SUMMARY})")
    config = None
    if (run_dir / CONFIG).is_file():
        config = OmegaConf.load(run_dir / CONFIG)
        config.output_dir = str(run_dir)  # where it is now (the command line's says ${hydra:runtime.output_dir})
    summary = RunSummary.load(run_dir) if (run_dir / SUMMARY).is_file() else None
    return Run(run_dir, read_records(run_dir, ok_only=False), summary, config)


def load_tables(experiment: str, scale: str = "testbed", out: str | Path = "outputs") -> dict[str, list[dict]]:
    """An experiment's tables as written by `make reproduce-tables` (<out>/tables/<scale>/<experiment>*.csv), by name
    ("overoptimisation", "overoptimisation_peaks", ...): one dict per row, numbers as numbers, empty cells None."""
    folder = Path(out) / "tables" / scale
    paths = sorted([*folder.glob(f"{experiment}.csv"), *folder.glob(f"{experiment}_*.csv")])
    if not paths:
        raise FrameworkError(
            f"no tables of experiment {experiment!r} in {folder}: run `make reproduce-tables SCALE={scale} "
            f"EXPERIMENT={experiment}` first"
        )
    tables = {}
    for path in paths:
        with path.open(newline="") as f:
            tables[path.stem] = [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return tables


def _value(text: str):
    """A CSV cell as Python reads it: an int, a float (nan included), None when empty, else the text."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
