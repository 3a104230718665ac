"""Results on disk: one folder per finished item, written atomically, so a rerun resumes where it stopped.

<run dir>/run.json           what every item's result and metrics depend on (model, reward, method, seed, eval,
                             samples per prompt, the prompt list, an adapter's content); a rerun with different
                             values is refused instead of mixing results
<run dir>/items/<id>/        base.png, final.png, record.json (rewards, per-step records, compute)
<run dir>/summary.json       per-item rows and run means, written by rank 0 at the end
"""

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from torch import Tensor
from torchvision.utils import make_grid

from framework.core.atomic import replaced
from framework.core.errors import FrameworkError, StorageError, unwritable
from framework.core.images import load_png, save_png
from framework.core.items import Item, ItemResult
from framework.core.records import RECORD, ROW_KEYS, SUMMARY, ItemRecord, RunSummary, SummaryRow

GRID_ITEMS = 16
log = logging.getLogger(__name__)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


@contextmanager
def storing(what: str, tmp: Path | None = None):
    """An OSError while writing `what` becomes a StorageError; the temporary folder `tmp` it was written through, if
    any, is removed (a file written through `replaced` removes itself)."""
    try:
        yield
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(
            f"cannot write {what} ({e.strerror or e}); the run stopped, every finished item is kept: free space or "
            "fix permissions, then rerun the same command to resume"
        ) from e


class ItemStore:
    def __init__(self, run_dir: Path, fingerprint: dict):
        """Checks up front (before any model loads) that the run directory can be created and written."""
        self.run_dir = Path(run_dir)
        self.items_dir = self.run_dir / "items"
        probe = self.items_dir / f".write-check.{os.getpid()}.tmp"
        try:
            self.items_dir.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise FrameworkError(unwritable(e, self.run_dir)) from None
        self._check_fingerprint(fingerprint)
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Hidden half-written folders and files of processes that were killed (`.<name>.<pid>.tmp`)."""
        for tmp in [*self.items_dir.glob(".*.tmp"), *self.run_dir.glob(".*.tmp")]:
            pid = tmp.name.rsplit(".", 2)[-2]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)

    def _check_fingerprint(self, fingerprint: dict) -> None:
        path = self.run_dir / "run.json"
        if path.exists():
            try:
                before = flatten(json.loads(path.read_text()))
            except (ValueError, OSError) as e:
                raise FrameworkError(f"{path} is not readable ({e}); rerun into a new directory (hydra.run.dir=...)")
            now = flatten(json.loads(json.dumps(fingerprint)))
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            if changed:
                raise FrameworkError(
                    f"{self.run_dir} holds results of a different configuration (changed: "
                    f"{', '.join(changed[:5])}); rerun into a new directory (hydra.run.dir=...)"
                )
        else:
            self._write_json(path, fingerprint)

    @staticmethod
    def _write_json(path: Path, data) -> None:
        with storing(path.name), replaced(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1))

    def record(self, item: Item) -> ItemRecord | None:
        """The item's record, or None if it has none or an unreadable one (then the item is redone)."""
        path = self.items_dir / item.id / RECORD
        try:
            return ItemRecord.load(path) if path.exists() else None
        except (ValueError, TypeError, OSError) as e:  # not JSON, or not a record: only an edit can do that
            log.warning("item %s: unreadable %s (%s); it will be redone", item.id, path, e)
            return None

    def is_done(self, item: Item) -> bool:
        record = self.record(item)
        return record is not None and record.ok

    def _commit(self, record: ItemRecord, images: dict[str, Tensor]) -> None:
        """Write into a hidden folder, then rename it into place: readers never see a half-written item. A write that
        fails (e.g. the disk is full) removes the half-written folder and stops the run; finished items stay."""
        tmp = self.items_dir / f".{record.id}.{os.getpid()}.tmp"
        with storing(f"item {record.id}", tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name, image in images.items():
                save_png(image, tmp / f"{name}.png")
            (tmp / RECORD).write_text(record.dumps())
            final = self.items_dir / record.id
            shutil.rmtree(final, ignore_errors=True)  # only a failed attempt can be there
            os.replace(tmp, final)

    def write(self, item: Item, result: ItemResult, metrics: dict, compute: dict) -> None:
        record = ItemRecord.of(
            item,
            status="ok",
            base_reward=result.base_reward,
            final_reward=result.final_reward,
            metrics=metrics,
            compute=compute,
            info=result.info,
            steps=result.steps,
        )
        self._commit(record, {"base": result.base_image, "final": result.final_image})

    def write_failure(self, item: Item, error: str, trace: str | None = None) -> None:
        self._commit(ItemRecord.of(item, status="failed", error=error, traceback=trace), {})

    def load_image(self, record: ItemRecord, kind: str) -> Tensor:
        return load_png(self.items_dir / record.id / f"{kind}.png")

    def summarize(self, items: list[Item], set_metrics=None, decide=None) -> RunSummary:
        """summary.json: run means of rewards, compute and every per-item metric (`<stage>_<metric>_mean`), numeric
        method info (`info_<key>_mean`), `set_metrics(records, load_image)` (run-level metrics of the finished
        records) and `decide(records)` (the hacking monitor's decision, framework.runner.summary) if given."""
        records = [self.record(item) for item in items]
        ok = [r for r in records if r and r.ok]
        mean = lambda values: float(np.mean(values)) if values else float("nan")  # noqa: E731
        means = {}
        for stage in ("base", "final"):  # every metric the records carry, e.g. adherence and drift
            for key in sorted({k for r in ok for k in r.metrics[stage]}):
                means[f"{stage}_{key}_mean"] = mean([r.metrics[stage][key] for r in ok if key in r.metrics[stage]])
        for key in sorted({k for r in ok for k, v in r.info.items() if isinstance(v, (int, float))}):
            means[f"info_{key}_mean"] = mean([r.info[key] for r in ok if key in r.info])
        summary = RunSummary(
            run_dir=str(self.run_dir),
            num_items=len(items),
            num_ok=len(ok),
            num_failed=sum(bool(r) and not r.ok for r in records),
            num_missing=sum(r is None for r in records),
            base_reward_mean=mean([r.base_reward for r in ok]),
            final_reward_mean=mean([r.final_reward for r in ok]),
            evals_mean=mean([r.compute["evals"] for r in ok]),
            seconds_mean=mean([r.compute["seconds"] for r in ok]),
            peak_memory_mb_max=max((r.compute["peak_memory_mb"] for r in ok), default=float("nan")),
            means=means,
            sets=None if set_metrics is None else set_metrics(ok, self.load_image),
            monitor=None if decide is None else decide(ok),
            items=[SummaryRow(**{k: getattr(r, k) for k in ROW_KEYS}) for r in records if r],
        )
        self._write_grid(ok[:GRID_ITEMS])
        self._write_json(self.run_dir / SUMMARY, summary.to_json())  # last: a run with a summary has all its files
        return summary

    def _write_grid(self, records: list[ItemRecord]) -> None:
        """grid.png: base images on the top row, the method's images below, one column per item."""
        if not records:
            return
        tiles = [self.load_image(r, kind) for kind in ("base", "final") for r in records]
        grid = make_grid(tiles, nrow=len(records), padding=2, pad_value=1.0)
        scale = max(1, 256 // tiles[0].shape[-1])  # small testbed images are enlarged (nearest) to be seen
        with storing("grid.png"), replaced(self.run_dir / "grid.png") as tmp:
            save_png(grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2), tmp)
