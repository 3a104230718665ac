"""Batched items: an item's result does not depend on which other items share its batch.

Every per-item method runs eight items (four prompts, two seeds each) in one batch and each item alone; rewards
agree to 1e-5, images to 1e-4, and so do the per-step records (DNO's R_prob with its seeded permutations, MIRA's
surrogate against each item's own reference trajectory, the black-box methods' perturbed candidates).

The networks run in float64 here. In float32 their kernels round differently at different batch sizes (≈1e-7), and
Adam's first step, lr·g/|g| per entry, turns such a difference into a full step where a gradient entry is near
zero; in float64 the rounding stays far below the tolerance, so what is tested is the methods' own bookkeeping:
each item's noise, optimiser, clipping, loss scale, regulariser and records."""

import math

import pytest
import torch

from framework.config import ModelConfig
from framework.config.families import UNET_LORA
from framework.config.methods import (
    AIGConfig,
    BaseConfig,
    BestOfNConfig,
    DNOConfig,
    DNOZeroOrderConfig,
    LoRAScaleConfig,
    MIRAConfig,
    MIRADPOConfig,
)
from framework.config.rewards import RewardConfig
from framework.core.errors import NonFiniteLoss
from framework.core.items import ItemResult
from framework.methods import Problem, build_method
from framework.models import load_backbone
from framework.models.lora import add_lora
from framework.rewards import Reward, build_reward
from framework.runner.alignment import make_items

ITEMS = make_items(["a cat", "a dog", "a red circle", "a photo of a bird"], seed=3, samples_per_prompt=2)
COMMON = dict(num_steps=3, eta=1.0)
STEPS = dict(opt_steps=2, lr=0.1, grad_clip=0.05, **COMMON)  # clipping active: grad norms are 0.01–2


@pytest.fixture(scope="module")
def backbone():
    """A tiny SD (32 px) with a random, as-if-trained LoRA adapter: the adapter methods read it, the others see the
    same network either way."""
    backbone = load_backbone(ModelConfig(kind="sd", tiny=True, resolution=16)).to(torch.float64)
    generator = torch.Generator().manual_seed(0)
    for p in add_lora(backbone.unet, UNET_LORA, rank=4):
        p.data = 0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
    return backbone


@pytest.fixture(scope="module")
def brightness():
    return build_reward(RewardConfig(name="brightness"))


def run(cfg, backbone, reward, items):
    with torch.enable_grad():
        return build_method(cfg, reward).run(Problem(backbone, reward, items, cfg))


CONFIGS = {
    "base": BaseConfig(**COMMON),
    "best_of_n": BestOfNConfig(n=3, batch_size=5, **COMMON),  # candidates of several items share sampler calls
    "dno": DNOConfig(gamma=1.0, num_permutations=2, **STEPS),
    "mira": MIRAConfig(beta=1.0, weighting="girsanov", **STEPS),
    "dno_zo": DNOZeroOrderConfig(num_candidates=3, mu=0.3, batch_size=4, **STEPS),
    "mira_dpo": MIRADPOConfig(num_candidates=3, mu=0.3, beta=0.5, **STEPS),
    "lora_scale": LoRAScaleConfig(alpha=0.5, adapter="-", **COMMON),
    "aig": AIGConfig(schedule="linear", adapter="-", **COMMON),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_an_item_gets_the_same_result_in_a_batch_of_eight_as_alone(name, backbone, brightness):
    cfg = CONFIGS[name]
    batched = run(cfg, backbone, brightness, ITEMS)
    assert len(batched) == len(ITEMS) and all(isinstance(r, ItemResult) for r in batched)
    for item, together in zip(ITEMS, batched):
        (alone,) = run(cfg, backbone, brightness, [item])
        assert together.final_reward == pytest.approx(alone.final_reward, abs=1e-5)
        assert together.base_reward == pytest.approx(alone.base_reward, abs=1e-5)
        torch.testing.assert_close(together.final_image, alone.final_image, rtol=0, atol=1e-4)
        torch.testing.assert_close(together.base_image, alone.base_image, rtol=0, atol=1e-4)
        assert len(together.steps) == len(alone.steps)
        for a, b in zip(together.steps, alone.steps):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)
        assert together.info.keys() == alone.info.keys()
    # Not a vacuous comparison: the items differ from each other, and the optimisers moved them.
    assert len({round(r.final_reward, 6) for r in batched}) == len(ITEMS)
    if name in ("dno", "mira", "dno_zo", "mira_dpo"):
        assert all(not torch.equal(r.final_image, r.base_image) for r in batched)
        assert all(r.steps[-1]["regulariser"] > 0 for r in batched if name in ("dno", "mira"))


class NaNForBirds(Reward):
    """Brightness, except that it is NaN for one prompt: that item must fail and no other."""

    def forward(self, images, prompts):
        nan = torch.tensor([math.nan if "bird" in p else 0.0 for p in prompts], device=images.device)
        return images.mean((1, 2, 3)) + nan


def test_an_item_whose_loss_is_nan_fails_alone(backbone, brightness):
    cfg = DNOConfig(**STEPS)
    results = run(cfg, backbone, NaNForBirds(), ITEMS)
    failed = [item.prompt for item, r in zip(ITEMS, results) if isinstance(r, NonFiniteLoss)]
    assert failed == ["a photo of a bird"] * 2 and "step 0" in str(results[-1])
    for item, together in zip(ITEMS[:2], results[:2]):
        (alone,) = run(cfg, backbone, brightness, [item])
        assert together.final_reward == pytest.approx(alone.final_reward, abs=1e-5)
        assert [s["grad_norm"] for s in together.steps] == pytest.approx([s["grad_norm"] for s in alone.steps])
