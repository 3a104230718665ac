"""Shared fixtures. Everything is offline: an empty HF cache, no W&B network, tiny models built once per session."""

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-empty-")  # no model is ever "cached" in tests
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("HYDRA_FULL_ERROR", None)
if os.environ.get("PYTEST_XDIST_WORKER"):  # one CPU thread per worker: OpenMP threads of two workers spin-wait
    os.environ["OMP_NUM_THREADS"] = (
        "1"  # on each other's cores (measured on 2 cores: 4.8 min; with 2 threads each, half the suite in 17 min)
    )

import torch  # noqa: E402

import framework  # noqa: E402,F401  (torchvision workaround before anything imports torchvision)
from framework.config import ModelConfig  # noqa: E402 (registers the configs in Hydra)
from framework.models import load_backbone  # noqa: E402

# Tolerances, by what the two sides of a comparison share. The same computation twice in one process, with the same
# tensor shapes, is compared bitwise (CPU kernels are deterministic). REBATCHED: the same float32 maths on other tensor
# shapes, thread counts or processes (items batched together or alone, DDP shards, chunked evaluation): kernels block,
# vectorise and reduce in another order, and differently on every SIMD width, each op rounding at ~1e-7 relative.
# Measured on tiny SD (DNO and MIRA, 2-5 steps, 8 items batched against each alone) under AVX-512, AVX2 and SSE
# kernels (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA) and 1 or 2 threads: rewards moved by at
# most 1.2e-7, decoded pixels (unclamped) by at most 4e-5.
REBATCHED = 1e-5  # absolute, on rewards, metrics and weights of order 0.01-1
REBATCHED_PIXELS = 2e-4  # absolute, on decoded images (order 1)


@pytest.fixture(scope="session")
def tiny_sd():
    return load_backbone(ModelConfig(kind="sd", tiny=True, resolution=64))


@pytest.fixture(scope="session")
def tiny_sdxl():
    return load_backbone(ModelConfig(kind="sdxl", tiny=True, resolution=64))


@pytest.fixture(params=["sd", "sdxl"])
def tiny_backbone(request, tiny_sd, tiny_sdxl):
    return {"sd": tiny_sd, "sdxl": tiny_sdxl}[request.param]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A CLIP model directory as on the hub (config + safetensors + tokenizer), tiny."""
    from transformers import CLIPModel

    from framework.core.tokenizer import build_clip_tokenizer
    from framework.rewards.clip import tiny_clip_config

    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(3)
    CLIPModel(tiny_clip_config()).save_pretrained(path)
    build_clip_tokenizer().save_pretrained(path)
    return path


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def call_main(main, *args: str, pythonpath: Path | None = None) -> Result:
    """A console script's `main()` with these arguments, run in this process as a user's command would run it: output
    captured, the exit code from its SystemExit, Hydra's global state reset afterwards (no interpreter start, no
    re-import of torch). `pythonpath`: a directory of user modules (e.g. a callable reward), importable meanwhile."""
    import contextlib
    import io

    from hydra.core.global_hydra import GlobalHydra

    saved_argv, saved_path, saved_modules = sys.argv, list(sys.path), set(sys.modules)
    sys.argv = [main.__module__, *args]
    if pythonpath is not None:
        sys.path.insert(0, str(pythonpath))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        GlobalHydra.instance().clear()
        if pythonpath is not None:  # the next test may write a module of the same name
            for name in set(sys.modules) - saved_modules:
                if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(pythonpath)):
                    del sys.modules[name]
    return Result(code, out.getvalue(), err.getvalue())


def run_cli(*overrides: str, run_dir: Path | None = None, pythonpath: Path | None = None) -> Result:
    """`python -m framework.run ...` as a user types it, in this process (see `call_main`)."""
    from framework.run import main

    run_dir_override = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    return call_main(main, *overrides, *run_dir_override, pythonpath=pythonpath)


def launch_in_process(overrides: list[str]) -> tuple[int, str]:
    """The launcher of experiment runs in tests: each run in this process (framework.analysis.launch.launch_process
    starts a fresh interpreter per run)."""
    result = run_cli(*overrides)
    return result.returncode, result.stderr


def run_process(*overrides: str, run_dir: Path | None = None, env: dict | None = None, timeout: int = 600):
    """`python -m framework.run` in a subprocess: for what only a process shows (exit codes of the interpreter,
    signals, several processes)."""
    args = [sys.executable, "-m", "framework.run", *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def interrupted_copy(full: Path, resumed: Path, step: int) -> None:
    """`resumed`: the run directory `full` as a run killed after optimiser step `step` leaves it, its configuration
    and that step's checkpoint as `last.ckpt` only."""
    import shutil

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "run.json", resumed / "run.json")
    shutil.copy(full / "checkpoints" / f"step{step:06d}.ckpt", resumed / "checkpoints" / "last.ckpt")


def run_nodes(*overrides: str, run_dir: Path, nodes: int = 2, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """`framework.run` on `nodes` "nodes" of one process each on this machine, started as a multi-node launch starts
    them (torchrun --nnodes=N --node-rank=i: MASTER_ADDR, MASTER_PORT, NODE_RANK, RANK, WORLD_SIZE in each
    process's environment), with trainer.num_nodes=N trainer.devices=1. One CPU thread per process."""
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1"]
    launch += ["--master-addr=127.0.0.1", f"--master-port={port}"]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", f"trainer.num_nodes={nodes}"]
    args = ["-m", "framework.run", *overrides, *ddp, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [*launch, f"--node-rank={rank}", *args],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in range(nodes)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def start_cli(*overrides: str, run_dir: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """`python -m framework.run` started in the background (its own session, so it can be signalled alone)."""
    args = [sys.executable, "-m", "framework.run", *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    return subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    """Poll `condition()` until it holds; fails if `process` ends first or the time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended first (exit {process.returncode}): {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def noise_like(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
