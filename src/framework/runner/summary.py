"""The end of a run: the hacking monitor's decision for summary.json, the console summary, and the one line naming
failed items."""

import json
from pathlib import Path

from framework.config import held_out_rewards
from framework.config.methods import method_kind
from framework.core.hacking import decision, detect, record_signals, rule_z
from framework.core.records import ItemRecord, RunSummary


def run_decision(cfg, run_dir: Path, records: list[ItemRecord]) -> dict | None:
    """summary.json's `monitor`: a fine-tuning run's decision over its probe set (monitor.json) or, for a noise
    method, the rule over its items' per-step records (each item a probe unit); None for the other methods."""
    path = Path(run_dir) / "monitor.json"
    if cfg.monitor.every and path.exists():
        return json.loads(path.read_text())
    if method_kind(cfg.method) != "optimises_noise" or not records or not all(r.steps for r in records):
        return None
    steps, reward, signals = record_signals(records, held_out_rewards(cfg))
    m = cfg.monitor
    z = rule_z(m.z, m.false_alarms, m.patience, len(steps), signals)
    return decision(detect(steps, reward, signals, z=z, patience=m.patience)) | {"z": z}


def failure_line(summary: RunSummary, named: int = 3) -> str:
    """One line naming the failed items (the first `named`, with their errors) and where the rest is."""
    failed = [f"{row.id} ({row.error})" for row in summary.items if not row.ok]
    shown = "; ".join(failed[:named]) + (f"; and {len(failed) - named} more" if len(failed) > named else "")
    count = summary.num_failed + summary.num_missing
    return (
        f"{count} of {summary.num_items} items failed"
        + (f": {shown}" if shown else "")
        + f" (see {summary.run_dir}/summary.json); a rerun retries them"
    )


def print_summary(summary: RunSummary, label: str) -> None:
    metrics = [m for m in ("adherence", "drift_rmse") if f"final_{m}_mean" in summary.means]
    print(
        f"\n{label}: {summary.num_ok}/{summary.num_items} items ok"
        + (f", {summary.num_failed} failed" if summary.num_failed else "")
    )
    width = min(48, max(len("prompt"), *(len(r.prompt) for r in summary.items)))
    header = "".join(f"  {'adherence' if m == 'adherence' else 'drift':>15}" for m in metrics)
    print(f"  {'item':<12} {'prompt':<{width}}  {'reward base → final':>19}{header}")

    def columns(row_metrics: dict, base_key, final_key) -> str:
        """Each metric's cell; "—" where an item has no value (adherence of a prompt that is not a caption of the
        testbed's world)."""
        text = ""
        for m in metrics:
            base, final = row_metrics.get(base_key(m)), row_metrics.get(final_key(m))
            if final is None:
                text += f"  {'—':>15}"
            else:
                text += f"  {final:>15.3f}" if m == "drift_rmse" else f"  {base:>6.2f} → {final:<6.2f}"
        return text

    for row in summary.items:
        prompt = row.prompt[:width]
        if row.ok:
            flat = {f"{stage}.{k}": v for stage in ("base", "final") for k, v in row.metrics[stage].items()}
            print(
                f"  {row.id:<12} {prompt:<{width}}  {row.base_reward:>8.4f} → {row.final_reward:<8.4f}"
                + columns(flat, lambda m: f"base.{m}", lambda m: f"final.{m}")
            )
        else:
            print(f"  {row.id:<12} {prompt:<{width}}  FAILED: {row.error}")
    if summary.num_ok:
        base, final = summary.base_reward_mean, summary.final_reward_mean
        print(
            f"  {'mean':<12} {'':<{width}}  {base:>8.4f} → {final:<8.4f}"
            + columns(summary.means, lambda m: f"base_{m}_mean", lambda m: f"final_{m}_mean")
        )
        print(
            f"  {summary.evals_mean:.0f} model evaluations and {summary.seconds_mean:.1f} s per item"
            + (
                "; adherence = ground-truth judge (colour and shape right); drift = pixel RMSE to the base image"
                if "adherence" in metrics
                else "; drift = pixel RMSE to the base image (same seed)"
            )
        )
        held_out = sorted(k[len("final_") : -len("_mean")] for k in summary.means if k.startswith("final_eval_"))
        labels = {"clipscore": "CLIPScore", "drift_embedding": "embedding drift (1 − cos to the base image)"}
        for key in held_out + [k for k in labels if f"final_{k}_mean" in summary.means]:
            base = summary.means.get(f"base_{key}_mean")
            print(
                f"  {labels.get(key, key)}: "
                + (f"{base:.4f} → " if base is not None else "")
                + f"{summary.means[f'final_{key}_mean']:.4f}"
            )
        print_set_metrics(summary.sets or {})
        if decision := summary.monitor:
            step, best = decision["hacking_step"], decision.get("best_held_out_step")
            flagged = "not flagged" if step is None else f"flagged at step {step} ({decision['signal']} turned)"
            print(f"  hacking monitor: {flagged}" + ("" if best is None else f"; held-out reward best at step {best}"))
    run_dir = Path(summary.run_dir)
    print(
        f"images:  {run_dir / 'items'}/<item>/{{base,final}}.png, grid {run_dir / 'grid.png'}\n"
        f"summary: {run_dir / 'summary.json'}"
    )


def print_set_metrics(sets: dict) -> None:
    if "win_rate_vs_base" in sets:
        win = sets["win_rate_vs_base"]
        print(f"  win rate of final over base images: {win['rate']:.2f} (95% CI {win['low']:.2f}–{win['high']:.2f})")
    if "spectral_distance" in sets:
        cmmd = (
            f"CMMD {sets['cmmd']:.3f}, "
            if "cmmd" in sets
            else f"CMMD on judge features {sets['cmmd_judge']:.3f}, "
            if "cmmd_judge" in sets
            else ""
        )
        print(
            f"  final vs base sets: {cmmd}spectral distance {sets['spectral_distance']:.4f}, "
            f"log-spectral {sets['log_spectral_distance']:.3f}"
        )
    if "final_diversity_vendi" in sets:
        print(
            f"  diversity across seeds: Vendi {sets['base_diversity_vendi']:.2f} → "
            f"{sets['final_diversity_vendi']:.2f}, mean pairwise distance {sets['base_diversity_pairwise']:.4f} → "
            f"{sets['final_diversity_pairwise']:.4f}"
        )
