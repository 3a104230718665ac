"""Catching reward hacking while it happens: a rule that decides from held-out signals only.

The signals are measured at evaluations k = 0 … K−1 (optimisation steps `steps[k]`) on the same probe units (fixed
prompts, seeds and noises; a unit is an image, or a prompt for diversity across its seeds): the optimised reward
r[k, i] and held-out signals h[k, i], each with the direction in which it gets better: a held-out reward (higher),
diversity (higher) and drift velocity, the drift added since the previous evaluation (lower: optimisation that
starts to drift faster has found something new to exploit).

The rule. At evaluation k, for each held-out signal, let b be the earlier evaluation where its mean over units was
best. The signal has turned when it is worse at k than at b by more than `z` standard errors of the paired
difference over units (the spread of h[b, i] − h[k, i] across the probe set, divided by √n): a fall the probe set's
own sampling noise does not explain. Reward hacking is flagged at the first evaluation where, for `patience`
evaluations in a row, some held-out signal has turned while the optimised reward has kept rising since that
signal's best, by more than `z` standard errors too (mean r[k, i] − r[b, i]): the optimiser still gains on its
reward, and what it does not see gets worse. The best earlier evaluation is the largest of several noisy means, so
one evaluation alone fires on noise more often than z suggests: on pure noise (8 evaluations of 16 units, the
reward rising) 6.8 % of runs at z = 3 and patience 1, 0.4 % at the default patience 2 (tests/test_monitor.py).
Nothing here reads a ground truth (gold, adherence), so the rule runs on
real models as on the testbed, where gold measures it (docs/experiments.md).
"""

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor

from framework.atomic import atomic_open, write_text
from framework.config import held_out_rewards
from framework.figures import pyplot, save
from framework.items import derive_seed
from framework.methods.common import draw_noise, sampler_options
from framework.metrics.sets import cmmd, mean_pairwise_distance, vendi_score
from framework.models.lora import save_lora
from framework.records import ItemRecord
from framework.sampling import sample

ROWS = "monitor.jsonl"  # one line per probe evaluation, values per probe unit
BEST_ADAPTER = "adapter-best"


@dataclass(frozen=True)
class Signal:
    """A held-out signal: its values [evaluations, units] (NaN where not measured, e.g. the velocity at k = 0)."""

    name: str
    values: np.ndarray
    higher_is_better: bool = True


@dataclass(frozen=True)
class Flag:
    """Where the rule flagged hacking: the optimisation step of that evaluation, the held-out signal that turned, and
    the step where that signal had been best."""

    step: int
    signal: str
    best_step: int


def decision(flag: Flag | None) -> dict:
    """The rule's decision as summary.json and monitor.json keep it."""
    return {"hacking_step": None} if flag is None else {"hacking_step": flag.step} | asdict(flag)


def paired_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean over units of a − b and its standard error (infinite with fewer than 2 units: never significant)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return float(d.mean()) if len(d) else 0.0, math.inf
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def turned(signal: Signal, reward: np.ndarray, k: int, z: float) -> int | None:
    """The evaluation b < k where `signal` was best, if at k it is significantly worse than at b while the reward is
    significantly higher; else None."""
    values = signal.values if signal.higher_is_better else -signal.values
    earlier = [j for j in range(k) if np.isfinite(values[j]).all()]
    if not earlier or not np.isfinite(values[k]).all():
        return None
    b = max(earlier, key=lambda j: values[j].mean())
    fall, fall_se = paired_gap(values[b], values[k])
    gain, gain_se = paired_gap(reward[k], reward[b])
    return b if fall > z * fall_se and gain > z * gain_se else None


def detect(steps: list[int], reward: np.ndarray, signals: list[Signal], z: float = 3.0, patience: int = 2):
    """The first Flag of the rule (module docstring) over evaluations at `steps`, or None. `reward`: [K, units] of
    the optimised reward on the probe units of the image signals."""
    in_a_row = 0
    for k in range(1, len(steps)):
        hits = [(s.name, b) for s in signals if (b := turned(s, reward, k, z)) is not None]
        in_a_row = in_a_row + 1 if hits else 0
        if in_a_row >= patience:
            name, b = hits[0]
            return Flag(steps[k], name, steps[b])
    return None


def velocity(drift: np.ndarray) -> np.ndarray:
    """Drift added since the previous evaluation, [K, units]; NaN at k = 0."""
    return np.concatenate([np.full((1, drift.shape[1]), np.nan), np.diff(drift, axis=0)])


def record_table(records: list[ItemRecord], key: str, steps: list[int]) -> np.ndarray:
    """`key` after each of `steps` optimisation steps, [steps, items] (NaN where not recorded)."""
    return np.array([[np.nan if (v := r.after(k, key)) is None else v for r in records] for k in steps], float)


def record_signals(records: list[ItemRecord], held_out: list[str]) -> tuple[list[int], np.ndarray, list[Signal]]:
    """The rule's inputs from a noise method's per-step records (each item is a probe unit; the evaluations are the
    steps every item recorded, then the final images): the optimised reward, the held-out rewards
    (`eval_<name>` for each name in `held_out`) and the velocity of pixel drift."""
    length = min(len(r.steps) for r in records)
    steps = list(range(length)) + ([length] if all(len(r.steps) == length for r in records) else [])
    signals = [Signal(f"eval_{name}", record_table(records, f"eval_{name}", steps)) for name in held_out]
    signals.append(Signal("drift_velocity", velocity(record_table(records, "drift_rmse", steps)), False))
    return steps, record_table(records, "reward", steps), signals


def probe_table(rows: list[dict], key: str) -> np.ndarray:
    """`key` at each probe evaluation, [evaluations, units]."""
    return np.array([row["units"][key] for row in rows], float)


def probe_signals(rows: list[dict], held_out: list[str]) -> tuple[list[int], np.ndarray, list[Signal]]:
    """The rule's inputs from probe evaluations (`monitor.jsonl` rows): the optimised reward, the held-out rewards,
    diversity (its units are the probe prompts) and the velocity of pixel drift."""
    signals = [Signal(f"eval_{name}", probe_table(rows, f"eval_{name}")) for name in held_out]
    if "diversity_vendi" in rows[0]["units"]:
        signals.append(Signal("diversity_vendi", probe_table(rows, "diversity_vendi")))
    signals.append(Signal("drift_velocity", velocity(probe_table(rows, "drift_rmse")), higher_is_better=False))
    return [row["step"] for row in rows], probe_table(rows, "reward"), signals


class ProbeMonitor(L.Callback):
    """The probe set a fine-tuning run watches (`monitor.every` > 0): the first `monitor.prompts` prompts ×
    `monitor.seeds` fixed seeds and noises, sampled with the current adapter at step 0 and every `every` optimiser
    steps. Each evaluation records the optimised reward, every held-out reward, drift from the base model's images
    at the same noises (pixel and embedding), diversity across the seeds of each prompt (Vendi and mean pairwise
    distance), CMMD against the base images and, on the testbed, adherence and gold: per probe unit in
    `monitor.jsonl` (what the rule and a resumed run read), as means in `monitor.csv`, to the training loggers
    (W&B: `probe/<metric>`), and drawn in `monitor.png`. After each evaluation the rule runs over the evaluations so
    far: its decision goes to `monitor.json` (with `monitor.stop`, training ends at a flag); the adapter of the
    evaluation the first held-out reward scores best is kept in `checkpoints/adapter-best/`
    (`monitor.select=best_held_out` makes it the run's adapter)."""

    def __init__(self, cfg, held_out: list[str], out_dir: Path, metrics=None):
        self.cfg, self.metrics, self.held_out, self.out_dir = cfg, metrics, held_out, Path(out_dir)
        self.rows: list[dict] = []
        self.base: Tensor | None = None
        self.flag: Flag | None = None

    def probe(self, module) -> tuple[list[str], list[int]]:
        prompts = module.prompts[: self.cfg.prompts]
        return (
            [p for p in prompts for _ in range(self.cfg.seeds)],
            [derive_seed(module.seed, 1 << 26, i, s) for i in range(len(prompts)) for s in range(self.cfg.seeds)],
        )

    @torch.no_grad()
    def images(self, module) -> Tensor:
        prompts, seeds = self.probe(module)
        x_T, noises = draw_noise(module.backbone, module.cfg, seeds)
        traj = sample(module.backbone, module.backbone.encode(prompts), x_T, noises, **sampler_options(module.cfg))
        return module.backbone.decode(traj.latents)

    def on_train_start(self, trainer, module) -> None:
        """Resume the curves: keep the evaluations up to the step training resumes from (a later one is redone)."""
        self.metrics.to(module.device)
        path = self.out_dir / ROWS
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.rows = [row for row in rows if row["step"] <= trainer.global_step]
        with module.backbone.adapters_disabled():
            self.base = self.images(module)
        if not self.rows or self.rows[-1]["step"] < trainer.global_step:
            self.evaluate(trainer, module)
        else:
            self.write(trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.cfg.every == 0 or trainer.global_step == trainer.max_steps:
            self.evaluate(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero and self.rows:
            draw(self.rows, self.flag, self.out_dir / "monitor.png")

    @torch.no_grad()
    def evaluate(self, trainer, module) -> None:
        """One evaluation of the probe set at the current step (every process computes it; rank 0 writes)."""
        step, (prompts, _) = trainer.global_step, self.probe(module)
        start, evals = time.perf_counter(), module.backbone.num_evals
        images = self.images(module)
        units = {"reward": module.reward(images, prompts).tolist()}
        shown, base = module.backbone.postprocess(images), module.backbone.postprocess(self.base)
        records = self.metrics.measure(shown, prompts, base)
        for key in records[0]:
            units[key] = [r[key] for r in records]
        sets = {}
        embeds, base_embeds = self.metrics.embed(shown), self.metrics.embed(base)
        if embeds is not None:
            groups = [embeds[i : i + self.cfg.seeds].cpu() for i in range(0, len(embeds), self.cfg.seeds)]
            if self.cfg.seeds >= 2:
                units["diversity_vendi"] = [vendi_score(g) for g in groups]
                units["diversity_pairwise"] = [mean_pairwise_distance(g) for g in groups]
            sets["cmmd"] = cmmd(embeds.cpu(), base_embeds.cpu())
        cost = {"probe_evals": module.backbone.num_evals - evals, "probe_seconds": time.perf_counter() - start}
        means = {k: float(np.mean(v)) for k, v in units.items()} | sets
        row = {"step": step, "means": means, "units": units, "cost": cost}
        self.rows.append(row)
        if trainer.is_global_zero and self.best() is row:
            save_lora(module.backbone, self.out_dir / "checkpoints" / BEST_ADAPTER)
        self.write(trainer)
        for logger in trainer.loggers:
            logger.log_metrics({f"probe/{k}": v for k, v in row["means"].items()}, step=step)

    def write(self, trainer) -> None:
        """The files of the curves so far, and the rule's decision over them."""
        self.flag = detect(*probe_signals(self.rows, self.held_out), z=self.cfg.z, patience=self.cfg.patience)
        if self.flag is not None and self.cfg.stop:
            trainer.should_stop = True
        if not trainer.is_global_zero:
            return
        write_text(self.out_dir / ROWS, "".join(json.dumps(row) + "\n" for row in self.rows))
        table = [{"step": row["step"]} | row["means"] | row["cost"] for row in self.rows]
        with atomic_open(self.out_dir / "monitor.csv", newline="") as f:
            writer = csv.DictWriter(f, list(dict.fromkeys(k for row in table for k in row)))
            writer.writeheader()
            writer.writerows(table)
        best = self.best()
        chosen = decision(self.flag) | {"best_held_out_step": None if best is None else best["step"]}
        write_text(self.out_dir / "monitor.json", json.dumps(chosen, indent=1))

    def best(self) -> dict | None:
        """The evaluation the first held-out reward scores best (None without a held-out reward)."""
        key = self.held_out and f"eval_{self.held_out[0]}"
        return max(self.rows, key=lambda row: row["means"][key]) if key else None


def draw(rows: list[dict], flag: Flag | None, path: Path) -> None:
    """One panel per probe metric against the optimiser step; the rule's flag as a vertical line."""
    plt = pyplot()
    keys = list(dict.fromkeys(k for row in rows for k in row["means"]))
    columns = 4
    fig, axes = plt.subplots(-(-len(keys) // columns), columns, figsize=(3 * columns, 2.4 * -(-len(keys) // columns)))
    for ax, key in zip(axes.flat, keys):
        steps = [row["step"] for row in rows if key in row["means"]]
        ax.plot(steps, [row["means"][key] for row in rows if key in row["means"]], marker=".")
        ax.set_title(key, fontsize=8)
        if flag is not None:
            ax.axvline(flag.step, color="tab:red", linestyle="--", linewidth=1)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    title = "probe set" + ("" if flag is None else f": hacking flagged at step {flag.step} ({flag.signal})")
    save(fig, title, path)


def run_decision(cfg, run_dir: Path, records: list[ItemRecord]) -> dict | None:
    """summary.json's `monitor`: a fine-tuning run's decision over its probe set (monitor.json) or, for a noise
    method, the rule over its items' per-step records (each item a probe unit); None for the other methods."""
    path = Path(run_dir) / "monitor.json"
    if cfg.monitor.every and path.exists():
        return json.loads(path.read_text())
    if "select" not in cfg.method or not records or not all(r.steps for r in records):
        return None
    return decision(
        detect(*record_signals(records, held_out_rewards(cfg)), z=cfg.monitor.z, patience=cfg.monitor.patience)
    )
