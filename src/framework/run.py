"""`python -m framework.run [group=option ...] [key=value ...]`: one alignment run, configured by Hydra (conf/).

Every value is validated before anything is loaded. Whatever goes wrong ends in one line on stderr and an exit code
(see framework.errors): 2 bad input, 3 some items failed (the others are written), 1 internal error (traceback in
<run dir>/error.log), 143 stopped by SIGTERM (finished items kept). A job never raises into Hydra, so one failing
job of a `--multirun` sweep leaves the others running; each job's outcome is <run dir>/status.json, and the
process exits with the worst of them.
"""

import hashlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from framework.config import compose_error, validate
from framework.errors import INTERRUPTED, Failure, guarded, process_error_log, worst

# Everything an item's result or its metrics depend on; a rerun into the same directory must match.
ITEM_AFFECTING = ("model", "reward", "method", "seed", "eval", "samples_per_prompt")
STATUS_FILE = "status.json"
job_codes: list[int] = []  # exit codes of the jobs this process ran (a sweep runs several)


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
    for message in ("does not have many workers", "predict returned None", ".*treespec", r".*module\(s\) in eval mode"):
        warnings.filterwarnings("ignore", message=f".*{message}")


def _label(cfg) -> str:
    try:
        choices = hydra.core.hydra_config.HydraConfig.get().runtime.choices
        return f"method={choices['method']} reward={choices['reward']} model={choices['model']}"
    except ValueError:  # composed without Hydra's runtime (tests)
        return f"method={cfg.method.name} reward={cfg.reward.name}"


def print_summary(summary: dict, label: str) -> None:
    metrics = [m for m in ("adherence", "drift_rmse") if f"final_{m}_mean" in summary]
    print(f"\n{label}: {summary['num_ok']}/{summary['num_items']} items ok"
          + (f", {summary['num_failed']} failed" if summary["num_failed"] else ""))
    width = min(48, max(len("prompt"), *(len(r["prompt"]) for r in summary["items"])))
    header = "".join(f"  {'adherence' if m == 'adherence' else 'drift':>15}" for m in metrics)
    print(f"  {'item':<12} {'prompt':<{width}}  {'reward base → final':>19}{header}")

    def columns(row_metrics: dict, base_key, final_key) -> str:
        text = ""
        for m in metrics:
            base, final = row_metrics.get(base_key(m)), row_metrics.get(final_key(m))
            text += f"  {final:>15.3f}" if m == "drift_rmse" else f"  {base:>6.2f} → {final:<6.2f}"
        return text

    for row in summary["items"]:
        prompt = row["prompt"][:width]
        if row["status"] == "ok":
            flat = {f"{stage}.{k}": v for stage in ("base", "final") for k, v in row["metrics"][stage].items()}
            print(f"  {row['id']:<12} {prompt:<{width}}  {row['base_reward']:>8.4f} → {row['final_reward']:<8.4f}"
                  + columns(flat, lambda m: f"base.{m}", lambda m: f"final.{m}"))
        else:
            print(f"  {row['id']:<12} {prompt:<{width}}  FAILED: {row['error']}")
    if summary["num_ok"]:
        base, final = summary["base_reward_mean"], summary["final_reward_mean"]
        print(f"  {'mean':<12} {'':<{width}}  {base:>8.4f} → {final:<8.4f}"
              + columns(summary, lambda m: f"base_{m}_mean", lambda m: f"final_{m}_mean"))
        print(f"  {summary['evals_mean']:.0f} model evaluations and {summary['seconds_mean']:.1f} s per item"
              + ("; adherence = ground-truth judge (colour and shape right); drift = pixel RMSE to the base image"
                 if "adherence" in metrics else "; drift = pixel RMSE to the base image (same seed)"))
        held_out = sorted(k[len("final_"):-len("_mean")] for k in summary if k.startswith("final_eval_"))
        labels = {"clipscore": "CLIPScore", "drift_embedding": "embedding drift (1 − cos to the base image)"}
        for key in held_out + [k for k in labels if f"final_{k}_mean" in summary]:
            base = summary.get(f"base_{key}_mean")
            print(f"  {labels.get(key, key)}: " + (f"{base:.4f} → " if base is not None else "")
                  + f"{summary[f'final_{key}_mean']:.4f}")
        print_set_metrics(summary.get("sets", {}))
    run_dir = Path(summary["run_dir"])
    print(f"images:  {run_dir / 'items'}/<item>/{{base,final}}.png, grid {run_dir / 'grid.png'}\n"
          f"summary: {run_dir / 'summary.json'}")


def print_set_metrics(sets: dict) -> None:
    if "win_rate_vs_base" in sets:
        win = sets["win_rate_vs_base"]
        print(f"  win rate of final over base images: {win['rate']:.2f} (95% CI {win['low']:.2f}–{win['high']:.2f})")
    if "spectral_distance" in sets:
        cmmd = (f"CMMD {sets['cmmd']:.3f}, " if "cmmd" in sets
                else f"CMMD on judge features {sets['cmmd_judge']:.3f}, " if "cmmd_judge" in sets else "")
        print(f"  final vs base sets: {cmmd}spectral distance {sets['spectral_distance']:.4f}, "
              f"log-spectral {sets['log_spectral_distance']:.3f}")
    if "final_diversity_vendi" in sets:
        print(f"  diversity across seeds: Vendi {sets['base_diversity_vendi']:.2f} → "
              f"{sets['final_diversity_vendi']:.2f}, mean pairwise distance {sets['base_diversity_pairwise']:.4f} → "
              f"{sets['final_diversity_pairwise']:.4f}")


def fingerprint(cfg: DictConfig, prompts: list[str]) -> dict:
    """What the results in a run directory depend on: the item-affecting config, the prompt list and the content
    of a LoRA adapter the method reads."""
    from framework.models.lora import WEIGHT_NAME

    digest = lambda data: hashlib.sha1(data).hexdigest()  # noqa: E731
    identity = OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(ITEM_AFFECTING)), resolve=True)
    identity["prompts"] = {"count": len(prompts), "sha1": digest(json.dumps(prompts).encode())}
    adapter = Path(cfg.method.adapter) / WEIGHT_NAME if "adapter" in cfg.method else None
    if adapter is not None and adapter.is_file():
        identity["adapter_sha1"] = digest(adapter.read_bytes())
    return identity


def run(cfg: DictConfig) -> dict | None:
    """Run every pending item of `cfg`; returns the summary on rank 0 (None on other ranks)."""
    validate(cfg)
    _quiet_libraries()
    import lightning as L

    from framework.methods import build_method
    from framework.metrics import build_metrics
    from framework.methods.draft import fine_tune_then_sample, trainer_options
    from framework.models import load_backbone
    from framework.models.lora import load_lora
    from framework.prompts import load_prompts
    from framework.rewards import build_reward
    from framework.runner import InferenceTimeAlignment, ItemsDataModule, make_items
    from framework.store import ItemStore
    from framework.tracking import log_to_wandb

    prompts = load_prompts(cfg.prompts)
    items = make_items(prompts, cfg.seed, cfg.samples_per_prompt)
    store = ItemStore(Path(cfg.output_dir), fingerprint(cfg, prompts))
    reward = build_reward(cfg.reward)
    fine_tune = cfg.method.name == "draft"
    method = None if fine_tune else build_method(cfg.method, reward)
    backbone = load_backbone(cfg.model)
    if "adapter" in cfg.method:
        load_lora(backbone.unet, cfg.method.adapter)
    metrics = build_metrics(cfg.eval, cfg.model)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                        strategy=cfg.trainer.strategy, num_nodes=cfg.trainer.num_nodes,
                        inference_mode=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=cfg.output_dir,
                        **(trainer_options(cfg) if fine_tune else {"logger": False, "enable_checkpointing": False}))
    if fine_tune:  # train the adapter, then sample every item with it (base = adapters off, same seed)
        method = build_method(fine_tune_then_sample(cfg, trainer, backbone, reward), reward)
    module = InferenceTimeAlignment(backbone, reward, method, store, metrics)
    trainer.predict(module, datamodule=ItemsDataModule(items, store), return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    summary = store.summarize(items, metrics.set_metrics)
    label = _label(cfg)
    print_summary(summary, label)
    wandb_dir = log_to_wandb(cfg, summary, name=f"{Path(cfg.output_dir).name}")
    if wandb_dir:
        print(f"wandb:   {wandb_dir} ({cfg.logger.mode}; `wandb sync` uploads offline runs)")
    if summary["num_failed"] or summary["num_missing"]:
        raise Failure(f"{summary['num_failed'] + summary['num_missing']} of {summary['num_items']} items failed "
                      f"(see {summary['run_dir']}/summary.json); a rerun retries them")
    return summary


def _is_global_rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def job(cfg: DictConfig) -> int:
    """One Hydra job. It returns its exit code instead of raising: Hydra ends a whole sweep at a job's exception (a
    SystemExit at once, any other after the batch, without the sweep table). Only SIGTERM stops the process, on
    purpose."""
    run_dir = Path(cfg.output_dir)
    code, line = guarded(lambda: run(cfg), run_dir / "error.log")
    if _is_global_rank_zero():  # DDP processes started by Lightning leave the job's status to rank 0
        (run_dir / STATUS_FILE).write_text(json.dumps({"exit_code": code, "error": line}))
    job_codes.append(code)
    if code == INTERRUPTED:
        raise SystemExit(code)
    return code


def main() -> None:
    """Hydra's own errors (composition, unknown keys, wrong types) become one line and exit 2, as ours do."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises them to us instead of printing several lines

    def launch() -> None:
        try:
            job()
        except Exception as e:
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            if isinstance(e, (HydraException, OmegaConfBaseException)):
                raise compose_error(e) from None
            raise

    code, _ = guarded(launch, process_error_log())
    sys.exit(code or worst(job_codes))


if __name__ == "__main__":
    main()
