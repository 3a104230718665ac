"""Weights & Biases logging of a finished run (offline by default), read back from the item records on disk so that
items from every process, and from earlier interrupted attempts, are all included."""

from pathlib import Path

from omegaconf import OmegaConf

from framework.core.records import RECORD, ItemRecord, RunSummary, read_records, step_curve
from framework.runner.store import flatten


def _log_step_curves(run, run_dir: Path) -> None:
    """Means over items of every per-step value (reward, regulariser, drift, adherence, ...) against the
    optimisation step, as W&B history: the reward/drift-vs-compute curves of the run."""
    steps = [s for r in read_records(run_dir) for s in r.steps]
    keys = sorted({k for s in steps for k, v in s.items() if isinstance(v, (int, float)) and k != "step"})
    if not steps:
        return
    for row in step_curve(run_dir, list(range(max(s["step"] for s in steps) + 2)), keys):
        run.log({f"per_step/{k}": row[k] for k in keys if row[k] == row[k]}, step=row["step"])  # skip NaN


def wandb_group(cfg) -> str | None:
    """`logger.group`, or for a job of a `--multirun` sweep the sweep directory's name: the jobs of one sweep are
    one W&B group."""
    if cfg.logger.group:
        return cfg.logger.group
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # composed without Hydra's runtime (tests, the API)
        return None
    return Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None


def training_loggers(cfg) -> list:
    """The Lightning loggers of a fine-tuning run: its curves as CSV (one train/version_<attempt>/ per attempt) and,
    unless logging is off, a W&B run in the run's group, beside the run's evaluation run."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = [CSVLogger(cfg.output_dir, name="train")]
    if cfg.logger.name != "none" and cfg.logger.mode != "disabled":
        loggers.append(
            WandbLogger(
                project=cfg.logger.project,
                name=f"{Path(cfg.output_dir).name}-train",
                save_dir=cfg.output_dir,
                offline=cfg.logger.mode == "offline",
                group=wandb_group(cfg),
                tags=list(cfg.logger.tags),
            )
        )
    return loggers


def log_to_wandb(cfg, summary: RunSummary, name: str) -> Path | None:
    if cfg.logger.name == "none" or cfg.logger.mode == "disabled":
        return None
    import wandb

    run_dir = Path(summary.run_dir)
    run = wandb.init(
        project=cfg.logger.project,
        mode=cfg.logger.mode,
        dir=str(run_dir),
        name=name,
        group=wandb_group(cfg),
        tags=list(cfg.logger.tags),
        config=OmegaConf.to_container(cfg, resolve=True),
        settings=wandb.Settings(silent=True),
    )
    _log_step_curves(run, run_dir)
    table = wandb.Table(columns=["item", "prompt", "seed", "status", "base", "final", "base_reward", "final_reward"])
    curves = {}
    for row in summary.items:
        item_dir = run_dir / "items" / row.id
        ok = row.ok
        image = lambda kind: wandb.Image(str(item_dir / f"{kind}.png")) if ok else None  # noqa: E731
        table.add_data(
            row.id,
            row.prompt,
            row.seed,
            row.status,
            image("base"),
            image("final"),
            row.base_reward,
            row.final_reward,
        )
        steps = ItemRecord.load(item_dir / RECORD).steps if ok else []
        if steps:
            curves[row.id] = [s["reward"] for s in steps]
    logged = {"items": table}
    if curves:
        logged["reward_per_step"] = wandb.plot.line_series(
            xs=[list(range(len(c))) for c in curves.values()],
            ys=list(curves.values()),
            keys=list(curves),
            title="reward vs optimisation step",
            xname="step",
        )
    run.log(logged)
    scalars = {k: v for k, v in summary.to_json().items() if k != "items" and isinstance(v, (int, float))}
    run.summary.update(scalars | {f"sets/{k}": v for k, v in flatten(summary.sets or {}).items()})
    run.finish()
    return Path(run.dir).parent
