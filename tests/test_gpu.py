"""GPU smoke checks: skipped without CUDA (CI has none); run them on a GPU machine with `make test`."""

import pytest
import torch

from framework.config import ModelConfig
from framework.config.methods import DNOConfig
from framework.config.rewards import RewardConfig
from framework.methods import Item, Problem, build_method
from framework.models import load_backbone
from framework.rewards import build_reward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


TINY = {
    "sd": {"resolution": 64},
    "sd3": {"resolution": 32, "max_sequence_length": 16},
    "flux": {"resolution": 32, "max_sequence_length": 16},
    "qwen_image": {"resolution": 32, "max_sequence_length": 64},
    "flux2": {"resolution": 32, "max_sequence_length": 64},
}


def dno(device: str, dtype: str = "float32", kind: str = "sd"):
    backbone = load_backbone(ModelConfig(kind=kind, tiny=True, dtype=dtype, **TINY[kind])).to(device)
    reward = build_reward(RewardConfig(name="brightness")).to(device)
    cfg = DNOConfig(num_steps=4, opt_steps=3)
    return build_method(cfg, reward).run(Problem(backbone, reward, Item(0, 0, "a cat", 7), cfg))[0]


@pytest.mark.parametrize("kind", list(TINY))
def test_dno_on_cuda_matches_cpu(kind):
    cpu, cuda = dno("cpu", kind=kind), dno("cuda", kind=kind)
    assert cuda.base_reward == pytest.approx(cpu.base_reward, abs=1e-4)  # noises are drawn on the CPU
    assert cuda.final_reward == pytest.approx(cpu.final_reward, abs=1e-3)


@pytest.mark.parametrize("kind", list(TINY))
def test_dno_in_bfloat16_is_finite_and_climbs(kind):
    result = dno("cuda", "bfloat16", kind)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in result.steps)
    assert result.final_reward >= result.base_reward
