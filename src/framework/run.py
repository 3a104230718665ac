"""`python -m framework.run [group=option ...] [key=value ...]`: one alignment run, configured by Hydra (conf/).

Problems the user can fix end the run with one line on stderr and a non-zero exit code, never a traceback:
exit 2 for bad input (config, weights, prompts), exit 3 when some items failed (the others are written).
"""

import logging
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import framework.config  # noqa: F401  (registers the schemas before Hydra composes)
from framework.config import check_known_keys
from framework.errors import FrameworkError

ITEM_AFFECTING = ("model", "reward", "method", "seed")


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
        print(f"  {'mean':<12} {'':<{width}}  {summary['base_reward_mean']:>8.4f} → {summary['final_reward_mean']:<8.4f}"
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
        print(f"  diversity across seeds: Vendi {sets['base_diversity_vendi']:.2f} → {sets['final_diversity_vendi']:.2f}"
              f", mean pairwise distance {sets['base_diversity_pairwise']:.4f} → {sets['final_diversity_pairwise']:.4f}")


def run(cfg: DictConfig) -> dict | None:
    """Run every pending item of `cfg`; returns the summary on rank 0 (None on other ranks)."""
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

    check_known_keys(cfg)
    items = make_items(load_prompts(cfg.prompts), cfg.seed, cfg.samples_per_prompt)
    fingerprint = OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(ITEM_AFFECTING)), resolve=True)
    store = ItemStore(Path(cfg.output_dir), fingerprint)
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
    return summary


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    _quiet_libraries()
    try:
        summary = run(cfg)
    except FrameworkError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary and (summary["num_failed"] or summary["num_missing"]):
        print(f"error: {summary['num_failed']} of {summary['num_items']} items failed "
              f"(see {summary['run_dir']}/summary.json); a rerun retries them", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
