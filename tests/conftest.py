"""Shared fixtures. Everything is offline: an empty HF cache, no W&B network, tiny models built once per session."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-empty-")  # no model is ever "cached" in tests
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("HYDRA_FULL_ERROR", None)

import framework  # noqa: E402,F401  (torchvision workaround before anything imports torchvision)
import torch  # noqa: E402

from framework.config import ModelConfig  # noqa: E402
from framework.models import load_backbone  # noqa: E402


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

    from framework.models.tokenizer import build_clip_tokenizer
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


def run_cli(*overrides: str, run_dir: Path | None = None, env: dict | None = None, timeout: int = 600):
    """`python -m framework.run` in a subprocess, as a user would type it."""
    args = [sys.executable, "-m", "framework.run", *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


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
