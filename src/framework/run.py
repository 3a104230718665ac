"""`python -m framework.run [group=option ...] [key=value ...]`: one alignment run, configured by Hydra (conf/).

Every value is validated before anything is loaded. Whatever goes wrong ends in one line on stderr and an exit code
(see framework.core.errors): 2 bad input, 3 some items failed (the others are written), 1 internal error (traceback in
<run dir>/error.log), 143 or 130 stopped by SIGTERM or Ctrl-C (finished items kept). A job never raises into Hydra,
so one failing job of a `--multirun` sweep leaves the others running; each job's outcome is <run dir>/status.json,
and the process exits with the worst of them.
"""

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from framework.config import held_out_reward
from framework.config.methods import method_kind
from framework.core import signals
from framework.core.atomic import write_text
from framework.core.errors import (
    STOPPED,
    Failure,
    FrameworkError,
    first_line,
    guarded,
    process_error_log,
    unwritable,
    worst,
)
from framework.core.hydra_errors import check_group_lists, compose_error
from framework.core.options import CONF_DIR
from framework.core.validation import validate
from framework.runner.identity import fingerprint

STATUS_FILE = "status.json"
job_codes: list[int] = []  # exit codes of the jobs this process ran (a sweep runs several)
job_started = False  # whether Hydra got as far as a job: what it raises before that is about the command line


def _quiet_libraries() -> None:
    """Keep the console to our progress and summary. Lightning sets its loggers to INFO when imported; diffusers'
    and transformers' warnings (e.g. "couldn't connect to the Hub") are covered by our own one-line errors."""
    import diffusers
    import lightning  # noqa: F401
    import transformers

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    quiet = ("does not have many workers", "predict returned None", ".*treespec", r".*module\(s\) in eval mode")
    quiet += ("Total length of `DataLoader` across ranks is zero",)  # a resumed run with every item finished
    for message in quiet:
        warnings.filterwarnings("ignore", message=f".*{message}")


def _label(cfg) -> str:
    try:
        choices = hydra.core.hydra_config.HydraConfig.get().runtime.choices
        return f"method={choices['method']} reward={choices['reward']} model={choices['model']}"
    except ValueError:  # composed without Hydra's runtime (tests)
        return f"method={cfg.method.name} reward={cfg.reward.name}"


def run(cfg: DictConfig):
    """Run every pending item of `cfg`; returns its RunSummary on rank 0 (None on other ranks)."""
    validate(cfg)
    _quiet_libraries()
    from framework.analysis.figures import draw_probe_curves
    from framework.config.prompts import load_prompts
    from framework.core.hacking import ROWS, read_probe_rows
    from framework.methods import build_method
    from framework.metrics import build_metrics
    from framework.models import load_backbone
    from framework.rewards import build_reward
    from framework.runner.alignment import InferenceTimeAlignment, ItemsDataModule, make_items
    from framework.runner.reference import normalise_ensemble
    from framework.runner.store import ItemStore
    from framework.runner.summary import failure_line, print_summary, run_decision
    from framework.runner.tracking import log_to_wandb

    prompts = load_prompts(cfg.prompts)
    items = make_items(prompts, cfg.seed, cfg.samples_per_prompt)
    store = ItemStore(Path(cfg.output_dir), fingerprint(cfg, prompts))
    reward = build_reward(cfg.reward)
    method = build_method(cfg.method, reward)
    trainer = make_trainer(cfg, method)  # before the models load: a device this machine lacks is bad input
    backbone = load_backbone(cfg.model)
    if cfg.model.offload_text_encoder:  # the run's prompts, encoded once where the run computes
        backbone.offload_text_encoders(prompts, trainer.strategy.root_device)
    metrics = build_metrics(cfg.eval, cfg.model, reward)
    normalise_ensemble(cfg, reward, backbone, prompts, trainer.strategy.root_device, store.run_dir)
    method = method.prepare(cfg, trainer, backbone, reward, metrics)  # e.g. load an adapter, or fine-tune (draft)
    module = InferenceTimeAlignment(backbone, reward, method, store, metrics, held_out_reward(cfg))
    trainer.predict(module, datamodule=ItemsDataModule(items, store, method.cfg.batch_size), return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    summary = store.summarize(items, metrics.set_metrics, lambda records: run_decision(cfg, store.run_dir, records))
    print_summary(summary, _label(cfg))
    wandb_dir = log_to_wandb(cfg, summary, name=f"{Path(cfg.output_dir).name}")
    if wandb_dir:
        print(f"wandb:   {wandb_dir} ({cfg.logger.mode}; `wandb sync` uploads offline runs)")
    if (Path(cfg.output_dir) / ROWS).exists():  # a fine-tuning run's probe curves, with the monitor's flag
        draw_probe_curves(read_probe_rows(cfg.output_dir), summary.monitor, Path(cfg.output_dir) / "monitor.png")
    if summary.num_failed or summary.num_missing:
        raise Failure(failure_line(summary))
    return summary


def make_trainer(cfg: DictConfig, method):
    """The run's Lightning Trainer; a device or strategy this machine does not have is one line (bad input)."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    options = method.trainer_options(cfg)
    if method_kind(cfg.method) == "fine_tunes":  # its training curves: CSV, and W&B unless logging is off
        from framework.runner.tracking import training_loggers

        options["logger"] = training_loggers(cfg)
    try:
        return L.Trainer(
            accelerator=cfg.trainer.accelerator,
            devices=cfg.trainer.devices,
            strategy=cfg.trainer.strategy,
            num_nodes=cfg.trainer.num_nodes,
            inference_mode=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            default_root_dir=cfg.output_dir,
            **options,
        )
    except MisconfigurationException as e:
        raise FrameworkError(
            f"trainer.accelerator={cfg.trainer.accelerator!r}: {first_line(e)} (trainer=cpu runs here)"
        ) from None


class SweepTable(Callback):
    """At the end of a `--multirun` sweep (conf/config.yaml): its table (framework.analysis.sweep), whose jobs' exit
    codes count towards the process's."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from framework.analysis.sweep import write_sweep_table

        job_codes.extend(write_sweep_table(Path(config.hydra.sweep.dir)))


def _is_global_rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def job(cfg: DictConfig) -> int:
    """One Hydra job. It returns its exit code instead of raising: Hydra ends a whole sweep at a job's exception (a
    SystemExit at once, any other after the batch, without the sweep table). Only a stop signal ends the process,
    on purpose."""
    global job_started
    job_started = True
    run_dir = Path(cfg.output_dir)
    with signals.stop_gracefully():  # Ctrl-C stops the run as SIGTERM does
        code, line = guarded(lambda: run(cfg), run_dir / "error.log")
    if _is_global_rank_zero():  # DDP processes started by Lightning leave the job's status to rank 0
        write_status(run_dir, code, line)
    job_codes.append(code)
    if code in STOPPED.values():  # a stop signal ends the sweep too
        raise SystemExit(code)
    return code


def write_status(run_dir: Path, code: int, line: str | None) -> None:
    """<run dir>/status.json: how the run ended (what experiments and sweep tables read)."""
    try:
        write_text(run_dir / STATUS_FILE, json.dumps({"exit_code": code, "error": line}))
    except OSError:  # an unwritable directory has already been reported by the run itself
        pass


def main() -> None:
    """Hydra's own errors (composition, unknown keys, wrong types, an unwritable run directory) become one line and
    exit 2, as ours do."""
    global job_started
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises them to us instead of printing several lines
    job_codes.clear()
    job_started = False

    def launch() -> None:
        check_group_lists(sys.argv[1:])
        try:
            job()
        except Exception as e:  # job() itself never raises: this is Hydra, before or around the job
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            if isinstance(e, (HydraException, OmegaConfBaseException)):
                raise compose_error(e) from None
            cause = e if isinstance(e, OSError) else e.__cause__  # logging's file handler wraps its OSError
            if isinstance(cause, OSError):  # the run (or sweep) directory cannot be created or written
                raise FrameworkError(unwritable(cause)) from None
            if isinstance(e, ValueError) and not job_started:  # Hydra refused the command line itself
                raise FrameworkError(f"the command line: {compose_error(e)}") from None
            raise

    code, _ = guarded(launch, process_error_log())
    sys.exit(code or worst(job_codes))


if __name__ == "__main__":
    main()
