"""What one item leaves on disk: `items/<id>/record.json`, one typed record that the store writes and every reader
(reports, statistics, tables, W&B, sweep tables) reads, with the questions they ask of it."""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from framework.core.items import Item

RECORD = "record.json"


@dataclass
class ItemRecord:
    id: str
    prompt_index: int
    sample_index: int
    prompt: str
    seed: int
    status: str  # "ok" | "failed"
    base_reward: float | None = None  # the optimised reward of the base image (same seed, plain sampling)
    final_reward: float | None = None  # ... of the method's image
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "base"/"final" -> image metrics
    compute: dict = field(default_factory=dict)  # evals, seconds, peak_memory_mb, peak_memory_kind, batch_items
    info: dict = field(default_factory=dict)  # method-specific values (noise_sq, r_prob, held_out_step, n, ...)
    steps: list[dict] = field(default_factory=list)  # one record per optimisation step or candidate
    error: str | None = None  # failed: the one error line
    traceback: str | None = None  # failed by an exception: its traceback

    @classmethod
    def of(cls, item: Item, **values) -> "ItemRecord":
        return cls(item.id, item.prompt_index, item.sample_index, item.prompt, item.seed, **values)

    @classmethod
    def load(cls, path: Path) -> "ItemRecord":
        data = json.loads(Path(path).read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def dumps(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, indent=1)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def final(self, key: str) -> float | None:
        """The final image's value of `key`: the optimised reward ("reward"), an image metric (`adherence`,
        `eval_<name>`, ...), a compute figure (`evals`, `seconds`, ...) or a method's value of the item (`kl`);
        None if not recorded."""
        if key == "reward":
            return self.final_reward
        return self.metrics.get("final", {}).get(key, self.compute.get(key, self.info.get(key)))

    def after(self, k: int, key: str) -> float | None:
        """`key` after k optimisation steps: the record of step k is measured on the image of the noise after k
        updates, and after the last update the final record applies."""
        if k < len(self.steps):
            return self.steps[k].get(key)
        return self.final(key) if k == len(self.steps) else None

    def held_out(self, key: str) -> float | None:
        """`key` of the image a noise method's held-out stopping rule chose (`held_out_step`; opt_steps = the final
        image); None where no held-out reward was set."""
        step = self.info.get("held_out_step")
        return None if step is None else self.after(step, key)


def step_curve(run_dir: Path, at: list[int], keys: list[str]) -> list[dict]:
    """For each k of `at`, the mean over a run's finished items of each of `keys` after k optimisation steps (and how
    many items recorded it)."""
    records = read_records(run_dir)
    rows = []
    for k in at:
        row = {"step": k, "items": 0}
        for key in keys:
            values = [v for r in records if (v := r.after(k, key)) is not None]
            row[key] = float(np.mean(values)) if values else float("nan")
            row["items"] = max(row["items"], len(values))
        rows.append(row)
    return rows


def read_records(run_dir: Path, ok_only: bool = True) -> list[ItemRecord]:
    """The item records of a run directory, by item id; only the finished ones unless `ok_only=False`."""
    records = [ItemRecord.load(p) for p in sorted(Path(run_dir).glob(f"items/*/{RECORD}"))]
    return [r for r in records if r.ok or not ok_only]


SUMMARY = "summary.json"
ROW_KEYS = ("id", "prompt", "seed", "status", "base_reward", "final_reward", "metrics", "error")


@dataclass
class SummaryRow:
    """An item's row of summary.json (what the console, W&B and the failure line show of it)."""

    id: str
    prompt: str
    seed: int
    status: str
    base_reward: float | None
    final_reward: float | None
    metrics: dict[str, dict[str, float]]
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class RunSummary:
    """summary.json, the run's last file: counts, run means, set metrics, the hacking monitor's decision and a row
    per item. In the file the means of every per-item metric and method value (`<stage>_<metric>_mean`,
    `info_<key>_mean`) sit beside the fixed keys, as `means` holds them here."""

    run_dir: str
    num_items: int
    num_ok: int
    num_failed: int
    num_missing: int
    base_reward_mean: float
    final_reward_mean: float
    evals_mean: float
    seconds_mean: float
    peak_memory_mb_max: float
    means: dict[str, float] = field(default_factory=dict)
    sets: dict | None = None  # run-level metrics of the final (and base) image sets
    monitor: dict | None = None  # the hacking monitor's decision (framework.core.hacking.decision)
    items: list[SummaryRow] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.num_ok == self.num_items

    def to_json(self) -> dict:
        fixed = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("means", "sets", "monitor", "items")
        }
        present = {k: getattr(self, k) for k in ("sets", "monitor") if getattr(self, k) is not None}
        return fixed | self.means | present | {"items": [asdict(row) for row in self.items]}

    @classmethod
    def load(cls, run_dir: Path) -> "RunSummary":
        data = json.loads((Path(run_dir) / SUMMARY).read_text())
        fixed = {f.name for f in fields(cls)}
        return cls(
            **{k: v for k, v in data.items() if k in fixed and k != "items"},
            means={k: v for k, v in data.items() if k not in fixed},
            items=[SummaryRow(**{k: row.get(k) for k in ROW_KEYS}) for row in data.get("items", [])],
        )
