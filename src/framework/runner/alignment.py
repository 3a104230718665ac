"""Lightning wiring: items (prompt × seed) sharded over processes, each run through the method in `predict`.

Items are assigned to ranks by position (item i → rank i mod world size) and seeded from (global seed, prompt,
sample) only, so the results of an item are the same whichever process, or how many, ran it. Each rank writes its
own finished items to disk; rank 0 summarises from disk after a barrier.
"""

import logging
import resource
import time
import traceback
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from framework.core.errors import Interrupted, ItemError, first_line
from framework.core.items import Item, ItemResult, derive_seed
from framework.methods.common import Method, Problem
from framework.metrics import ImageMetrics
from framework.runner.store import ItemStore

log = logging.getLogger(__name__)


def make_items(prompts: list[str], seed: int, samples_per_prompt: int) -> list[Item]:
    return [
        Item(p, s, prompt, derive_seed(seed, p, s))
        for p, prompt in enumerate(prompts)
        for s in range(samples_per_prompt)
    ]


def out_of_memory_line(e: Exception) -> str:
    return (
        f"out of memory ({first_line(e)[:120]}); try method.checkpoint=true, model.unet_checkpointing=true, fewer "
        "images per sampler call (method.batch_size) or a smaller model.resolution"
    )


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _as_is(item):
    return item


class ItemsDataModule(L.LightningDataModule):
    def __init__(self, items: list[Item], store: ItemStore, batch_size: int):
        super().__init__()
        self.items, self.store, self.batch_size = items, store, batch_size

    def predict_dataloader(self) -> DataLoader:
        """This rank's unfinished items, in batches of `method.batch_size` (lists of items)."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        pending = [item for item in self.items[rank::world] if not self.store.is_done(item)]
        return DataLoader(pending, batch_size=self.batch_size, collate_fn=_as_is)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # Items hold no tensors; noises are drawn on the CPU and moved by Problem


class InferenceTimeAlignment(L.LightningModule):
    """Runs a per-item method on batches of items with gradients enabled (Lightning predicts under no_grad) and
    stores each item's result. A batch that runs out of GPU memory is split in halves and rerun (an item's result
    does not depend on its batch), and later batches keep the smaller size; an item that does not fit alone fails."""

    def __init__(
        self, backbone, reward, method: Method, store: ItemStore, metrics: ImageMetrics, held_out: str | None = None
    ):
        super().__init__()
        self.backbone, self.reward = backbone, reward  # submodules: Lightning moves them to the device
        self.method, self.store, self.metrics, self.held_out = method, store, metrics, held_out
        self.items_per_batch = method.cfg.batch_size

    def interrupted(self) -> bool:
        """A stop signal arrived (Lightning's SIGTERM handler notes it; framework.core.signals turns Ctrl-C into
        SIGTERM): stop before the next batch or optimisation step."""
        return self.trainer.received_sigterm

    def predict_step(self, items: list[Item]) -> None:
        """Runs `items` in batches of `items_per_batch`. Out of memory halves the batch size for this and every later
        batch; an ItemError (a reward or metric raised) splits only the batch it came from, until the item that
        raises it is alone and fails; either way the other items finish."""
        batches = deque(chunks(items, self.items_per_batch))
        while batches:
            if self.interrupted():
                raise Interrupted(": stopped after the finished items; rerun the same command to resume")
            batch = batches.popleft()
            try:
                self._run(batch)
            except (torch.OutOfMemoryError, ItemError) as e:
                cause = e.cause if isinstance(e, ItemError) else e
                out_of_memory = isinstance(cause, torch.OutOfMemoryError)
                if out_of_memory and self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(batch) == 1 and out_of_memory:
                    self._fail(batch[0], out_of_memory_line(cause))
                elif len(batch) == 1:
                    self._fail(batch[0], str(e), cause)
                elif out_of_memory:  # this and every later batch at half the size
                    self.items_per_batch = len(batch) // 2
                    log.warning("out of memory at %d items per batch; going on with %d", len(batch), len(batch) // 2)
                    batches = deque(chunks(batch + [item for b in batches for item in b], self.items_per_batch))
                else:  # this batch only, in halves, until the item that raises is alone
                    batches.extendleft([batch[len(batch) // 2 :], batch[: len(batch) // 2]])

    def _run(self, items: list[Item]) -> None:
        """One batch. Compute is shared out equally (every item of a batch does the same work): model evaluations
        and seconds per item; the peak memory is the batch's, with its size alongside."""
        memory = PeakMemory(self.device)
        evals, start = self.backbone.num_evals, time.perf_counter()
        show_progress = self.trainer.is_global_zero
        problem = Problem(
            self.backbone,
            self.reward,
            items,
            self.method.cfg,
            self.metrics,
            show_progress,
            self.interrupted,
            self.held_out,
        )
        with torch.enable_grad() if self.method.needs_gradients else nullcontext():
            results = self.method.run(problem)
        done = []
        for j, (item, result) in enumerate(zip(items, results)):
            error = result.non_finite_score() if isinstance(result, ItemResult) else str(result)
            if error:
                self._fail(item, error)
            else:
                done.append(j)
        if not done:
            return
        base, final = (torch.stack([getattr(results[j], kind) for j in done]) for kind in ("base_image", "final_image"))
        measured = zip(problem.measure(base, rows=done), problem.measure(final, base, rows=done))
        compute = {
            "evals": (self.backbone.num_evals - evals) / len(items),
            "seconds": (time.perf_counter() - start) / len(items),
            **memory.peak(),
            "batch_items": len(items),
        }
        for j, (base_metrics, final_metrics) in zip(done, measured):
            self.store.write(items[j], results[j], {"base": base_metrics, "final": final_metrics}, compute)

    def _fail(self, item: Item, error: str, cause: BaseException | None = None) -> None:
        """The item's record says it failed, with the error line (and the traceback of the exception behind it)."""
        log.warning("item %s (%r) failed: %s", item.id, item.prompt, error)
        trace = "".join(traceback.format_exception(cause)) if cause is not None else None
        self.store.write_failure(item, error, trace)


class PeakMemory:
    """The peak memory of one batch, from its start: on CUDA the peak allocated by tensors (model weights included),
    on Linux CPUs the peak resident set size (VmHWM, reset at the start so that model loading and earlier batches do
    not count), elsewhere the process's lifetime maximum RSS, labelled as such."""

    STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self, device: torch.device):
        self.kind = (
            "cuda_allocated"
            if device.type == "cuda"
            else "cpu_item_peak_rss"
            if self.CLEAR_REFS.exists()
            else "process_max_rss"
        )
        self.device = device
        if self.kind == "cuda_allocated":
            torch.cuda.reset_peak_memory_stats(device)
        elif self.kind == "cpu_item_peak_rss":
            self.CLEAR_REFS.write_text("5")  # restart the high-water mark from the current RSS

    def peak(self) -> dict:
        if self.kind == "cuda_allocated":
            mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "cpu_item_peak_rss":
            mib = (
                next(int(line.split()[1]) for line in self.STATUS.read_text().splitlines() if line.startswith("VmHWM"))
                / 1024
            )
        else:
            mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"peak_memory_mb": mib, "peak_memory_kind": self.kind}
