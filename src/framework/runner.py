"""Lightning wiring: items (prompt × seed) sharded over processes, each run through the method in `predict`.

Items are assigned to ranks by position (item i → rank i mod world size) and seeded from (global seed, prompt,
sample) only, so the results of an item are the same whichever process, or how many, ran it. Each rank writes its
own finished items to disk; rank 0 summarises from disk after a barrier.
"""

import logging
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from framework.errors import Interrupted, NonFiniteLoss
from framework.metrics import ImageMetrics
from framework.items import Item, derive_seed
from framework.methods import Method, Problem
from framework.store import ItemStore

log = logging.getLogger(__name__)


def make_items(prompts: list[str], seed: int, samples_per_prompt: int) -> list[Item]:
    return [
        Item(p, s, prompt, derive_seed(seed, p, s))
        for p, prompt in enumerate(prompts)
        for s in range(samples_per_prompt)
    ]


def _as_is(item):
    return item


class ItemsDataModule(L.LightningDataModule):
    def __init__(self, items: list[Item], store: ItemStore):
        super().__init__()
        self.items, self.store = items, store

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        pending = [item for item in self.items[rank::world] if not self.store.is_done(item)]
        return DataLoader(pending, batch_size=None, collate_fn=_as_is)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # an Item holds no tensors; noises are drawn on the CPU and moved by Problem


class InferenceTimeAlignment(L.LightningModule):
    """Runs a per-item method with gradients enabled (Lightning predicts under no_grad) and stores each result."""

    def __init__(self, backbone, reward, method: Method, store: ItemStore, metrics: ImageMetrics):
        super().__init__()
        self.backbone, self.reward = backbone, reward  # submodules: Lightning moves them to the device
        self.method, self.store, self.metrics = method, store, metrics

    def interrupted(self) -> bool:
        """SIGTERM arrived (Lightning's signal handler notes it): stop before the next item or optimisation step."""
        return self.trainer.received_sigterm

    def predict_step(self, item: Item) -> None:
        if self.interrupted():
            raise Interrupted("SIGTERM: stopped after the finished items; rerun the same command to resume")
        memory = PeakMemory(self.device)
        evals, start = self.backbone.num_evals, time.perf_counter()
        problem = Problem(
            self.backbone,
            self.reward,
            item,
            self.method.cfg,
            self.metrics,
            show_progress=self.trainer.is_global_zero,
            interrupted=self.interrupted,
        )
        try:
            with torch.enable_grad() if self.method.needs_gradients else nullcontext():
                result = self.method.run(problem)
        except NonFiniteLoss as e:
            self._fail(item, str(e))
            return
        except torch.OutOfMemoryError as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._fail(
                item,
                f"out of memory ({(str(e).splitlines() or [''])[0][:120]}); try fewer images per "
                "sampler call (method.batch_size), method.checkpoint=true or a smaller model.resolution",
            )
            return
        base, final = result.base_image[None], result.final_image[None]
        metrics = {"base": problem.measure(base), "final": problem.measure(final, base)}
        self.store.write(
            item,
            result,
            metrics,
            {"evals": self.backbone.num_evals - evals, "seconds": time.perf_counter() - start, **memory.peak()},
        )

    def _fail(self, item: Item, error: str) -> None:
        log.warning("item %s (%r) failed: %s", item.id, item.prompt, error)
        self.store.write_failure(item, error)


class PeakMemory:
    """The peak memory of one item, from its start: on CUDA the peak allocated by tensors (model weights included),
    on Linux CPUs the peak resident set size (VmHWM, reset at the start so that model loading and earlier items do
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
