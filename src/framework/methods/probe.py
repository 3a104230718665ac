"""The probe set a fine-tuning run watches: fixed prompts, seeds and noises sampled with the current adapter during
training, for the hacking monitor's evaluations (`monitor.every`) and the sample grids (`method.sample_every`)."""

import csv
import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torchvision.utils import make_grid

from framework.core.atomic import atomic_open, write_text
from framework.core.hacking import ROWS, Flag, ProbeRow, decision, detect, probe_signals, read_probe_rows, rule_z
from framework.core.images import save_png
from framework.core.items import derive_seed
from framework.methods.common import draw_noise, sampler_options, sampler_path_kl
from framework.metrics.sets import cmmd, mean_pairwise_distance, vendi_score
from framework.models.lora import save_lora
from framework.models.sampling import sample

BEST_ADAPTER = "adapter-best"
GRID_PROMPTS = 4  # images in each sample grid: the first seed of the first probe prompts


class ProbeMonitor(L.Callback):
    """The probe set: the first `monitor.prompts` prompts × `monitor.seeds` fixed seeds and noises, sampled with the
    current adapter at step 0 and every `every` optimiser steps. Each evaluation records the optimised reward, the
    policy's KL from the base sampler (`kl`, a sampler with η > 0 only), every held-out reward, drift from the base
    model's images at the same noises (pixel and embedding), diversity across the seeds of each prompt (Vendi and mean
    pairwise distance, on the detector's features: CLIP's, or pixels where the features are the testbed judge's), an
    ensemble reward's members and disagreement, CMMD against the base images and, on the testbed, adherence and gold:
    per probe unit in `monitor.jsonl` (what the rule and a resumed run read), as means in `monitor.csv` and to the
    training loggers (W&B: `probe/<metric>`). After each evaluation the rule (framework.core.hacking) runs over the
    evaluations so far: its decision goes to `monitor.json` (with `monitor.stop`, training ends at a flag); the adapter
    of the evaluation the first held-out reward scores best is kept in `checkpoints/adapter-best/`
    (`monitor.select=best_held_out` makes it the run's adapter). Every `sample_every` steps the first seed of the first
    prompts is saved as `samples/step<N>.png` and logged with its mean reward (`samples/reward`), so the same images can
    be watched across training."""

    def __init__(
        self, cfg, held_out: list[str], out_dir: Path, sample_every: int = 0, metrics=None, evaluations: int = 0
    ):
        self.cfg, self.metrics, self.held_out, self.out_dir = cfg, metrics, held_out, Path(out_dir)
        self.sample_every, self.evaluations, self.z = sample_every, evaluations, cfg.z  # evaluations: planned
        self.rows: list[ProbeRow] = []
        self.base: Tensor | None = None
        self.flag: Flag | None = None

    def probe(self, module) -> tuple[list[str], list[int]]:
        prompts = module.prompts[: self.cfg.prompts]
        return (
            [p for p in prompts for _ in range(self.cfg.seeds)],
            [derive_seed(module.seed, 1 << 26, i, s) for i in range(len(prompts)) for s in range(self.cfg.seeds)],
        )

    @torch.no_grad()
    def images(self, module, units: list[int], with_kl: bool = False) -> tuple[Tensor, list[float] | None]:
        """The images of probe units `units` (indices into `probe`) with the model as it is now and, `with_kl` and
        the sampler stochastic, each one's path KL from the adapter-free sampler (framework.models.sampling.path_kl:
        the sum over steps of the per-step Gaussian KLs along the sampled trajectory)."""
        prompts, seeds = self.probe(module)
        x_T, noises = draw_noise(module.backbone, module.cfg, [seeds[i] for i in units])
        cond = module.backbone.encode([prompts[i] for i in units])
        traj = sample(module.backbone, cond, x_T, noises, **sampler_options(module.cfg))
        kl = sampler_path_kl(module.backbone, module.cfg, traj, cond) if with_kl else None
        return module.backbone.decode(traj.latents), kl

    def on_train_start(self, trainer, module) -> None:
        """Resume the curves: keep the evaluations up to the step training resumes from (a later one is redone)."""
        evaluated = False
        if self.cfg.every:
            self.metrics.to(module.device)
            self.rows = [row for row in read_probe_rows(self.out_dir) if row.step <= trainer.global_step]
            with module.backbone.adapters_disabled():
                self.base = self.images(module, list(range(len(self.probe(module)[0]))))[0]
            evaluated = bool(self.rows) and self.rows[-1].step >= trainer.global_step
            if evaluated:
                self.write(trainer)
        self.at_step(trainer, module, evaluate=bool(self.cfg.every) and not evaluated)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self.at_step(
            trainer, module, evaluate=bool(self.cfg.every) and (step % self.cfg.every == 0 or step == trainer.max_steps)
        )

    def at_step(self, trainer, module, evaluate: bool) -> None:
        """Evaluate the probe set and save the sample grid where they are due, sampling the probe images once."""
        step = trainer.global_step
        grid = bool(self.sample_every) and step % self.sample_every == 0 and step < trainer.max_steps
        first_seeds = list(range(0, len(self.probe(module)[0]), self.cfg.seeds))[:GRID_PROMPTS]
        if evaluate:
            start, evals = time.perf_counter(), module.backbone.num_evals
            images, kl = self.images(module, list(range(len(self.probe(module)[0]))), with_kl=True)
            self.evaluate(trainer, module, images, kl, start, evals)
            images = images[first_seeds]
        elif grid:
            images = self.images(module, first_seeds)[0]
        if grid:
            self.save_grid(trainer, module, images, [self.probe(module)[0][i] for i in first_seeds])

    @torch.no_grad()
    def evaluate(self, trainer, module, images: Tensor, kl: list[float] | None, start: float, evals: int) -> None:
        """One evaluation of the probe set at the current step (every process computes it; rank 0 writes)."""
        step, (prompts, _) = trainer.global_step, self.probe(module)
        units = {"reward": module.reward(images, prompts).tolist()} | ({"kl": kl} if kl is not None else {})
        shown, base = module.backbone.postprocess(images), module.backbone.postprocess(self.base)
        records = self.metrics.measure(shown, prompts, base)
        for key in records[0]:
            units[key] = [r[key] for r in records]
        sets = {}
        if self.cfg.seeds >= 2:  # on the detector's features (never the testbed judge's)
            embeds = self.metrics.detector_embed(shown).cpu()
            groups = [embeds[i : i + self.cfg.seeds] for i in range(0, len(embeds), self.cfg.seeds)]
            units["diversity_vendi"] = [vendi_score(g) for g in groups]
            units["diversity_pairwise"] = [mean_pairwise_distance(g) for g in groups]
        embeds, base_embeds = self.metrics.embed(shown), self.metrics.embed(base)
        if embeds is not None:
            sets["cmmd"] = cmmd(embeds.cpu(), base_embeds.cpu())
        cost = {"probe_evals": module.backbone.num_evals - evals, "probe_seconds": time.perf_counter() - start}
        row = ProbeRow(step, {k: float(np.mean(v)) for k, v in units.items()} | sets, units, cost)
        self.rows.append(row)
        if trainer.is_global_zero and self.best() is row:
            save_lora(module.backbone, self.out_dir / "checkpoints" / BEST_ADAPTER)
        self.write(trainer)
        for logger in trainer.loggers:
            logger.log_metrics({f"probe/{k}": v for k, v in row.means.items()}, step=step)

    @torch.no_grad()
    def save_grid(self, trainer, module, images: Tensor, prompts: list[str]) -> None:
        if not trainer.is_global_zero:
            return
        step, reward = trainer.global_step, module.reward(images, prompts).mean().item()
        path = self.out_dir / "samples" / f"step{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(make_grid(images.cpu(), nrow=len(prompts)), path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("samples", [str(path)], step=step, caption=[f"step {step}, reward {reward:.4f}"])
            logger.log_metrics({"samples/reward": reward}, step=step)

    def write(self, trainer) -> None:
        """The files of the curves so far, and the rule's decision over them."""
        steps, reward, signals = probe_signals(self.rows, self.held_out)
        self.z = rule_z(self.cfg.z, self.cfg.false_alarms, self.cfg.patience, self.evaluations, signals)
        self.flag = detect(steps, reward, signals, z=self.z, patience=self.cfg.patience)
        if self.flag is not None and self.cfg.stop:
            trainer.should_stop = True
        if not trainer.is_global_zero:
            return
        write_text(self.out_dir / ROWS, "".join(row.dumps() + "\n" for row in self.rows))
        table = [{"step": row.step} | row.means | row.cost for row in self.rows]
        with atomic_open(self.out_dir / "monitor.csv", newline="") as f:
            writer = csv.DictWriter(f, list(dict.fromkeys(k for row in table for k in row)))
            writer.writeheader()
            writer.writerows(table)
        best = self.best()
        chosen = decision(self.flag) | {"z": self.z, "best_held_out_step": None if best is None else best.step}
        write_text(self.out_dir / "monitor.json", json.dumps(chosen, indent=1))

    def best(self) -> ProbeRow | None:
        """The evaluation the first held-out reward scores best (None without a held-out reward)."""
        key = self.held_out and f"eval_{self.held_out[0]}"
        return max(self.rows, key=lambda row: row.means[key]) if key else None
