"""Our real-weight rewards against golden values: the official implementations' scores of the shipped images
(tests/golden/values.json, written by tests/golden/compute.py). A comparison runs only on a machine that has the
reward's weights and a golden value for it; otherwise it is skipped, saying which is missing."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "values.json").read_text())
# Each golden reward: our conf/reward option, its overrides, and how close our score must be. The images are 224 px,
# so the CLIP/BLIP rewards resize nothing and differ from the official code only by float rounding of the same
# network; HPSv3 resizes them to 448 px (PIL's bicubic there, torch's here), hence its wider margin.
OURS = {
    "aesthetic": ("aesthetic", {}, 0.01),
    "hps_v2.0": ("hps", {"version": "v2.0"}, 0.05),
    "hps_v2.1": ("hps", {"version": "v2.1"}, 0.05),
    "pickscore": ("pickscore", {}, 0.05),
    "clipscore": ("clipscore", {}, 0.05),
    "imagereward": ("imagereward", {}, 0.01),
    "hpsv3": ("hpsv3", {}, 0.1),
}


def test_the_golden_images_are_the_ones_the_values_describe_and_every_reward_has_a_recipe():
    import importlib.util

    for name, image in GOLDEN["images"].items():
        assert hashlib.sha256((GOLDEN_DIR / "images" / name).read_bytes()).hexdigest() == image["sha256"], name
    spec = importlib.util.spec_from_file_location("golden_compute", GOLDEN_DIR / "compute.py")
    compute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compute)
    assert set(compute.REWARDS) == set(OURS) and set(GOLDEN["values"]) <= set(OURS)


@pytest.mark.parametrize("name", sorted(OURS))
def test_our_scores_equal_the_official_implementations(name):
    from framework.config import reward_config
    from framework.config.rewards import required_weights
    from framework.core.images import load_png
    from framework.core.weights import unavailable
    from framework.rewards import build_reward

    option, overrides, tolerance = OURS[name]
    cfg = replace(reward_config(option), **overrides)
    missing = [f"{key}={spec!r}" for kind, spec, key in required_weights(cfg, "reward") if unavailable(kind, spec)]
    golden = GOLDEN["values"].get(name)
    if golden is None:
        pytest.skip(f"no golden value for {name}: nobody has run tests/golden/compute.py with its official package")
    if missing:
        pytest.skip(f"{name}'s weights are not on this machine ({', '.join(missing)})")
    names = sorted(golden["scores"])
    images = torch.stack([load_png(GOLDEN_DIR / "images" / n) for n in names])
    with torch.no_grad():
        scores = build_reward(cfg)(images, [GOLDEN["images"][n]["prompt"] for n in names])
    for n, score in zip(names, scores.tolist()):
        assert score == pytest.approx(golden["scores"][n], abs=tolerance), (n, golden["source"])
