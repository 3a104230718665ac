"""The testbed's gold reward on rendered scenes with known parameters: it recovers them, ranks scenes by its stated
preference, falls when the image holds what the scene does not explain, and ignores what the preference ignores."""

import pytest
import torch

from framework.testbed import shapes
from framework.testbed.gold import CENTRING_SCALE, PREFERRED_RADIUS, RESIDUAL_SCALE, fit_scene, gold, parts

CENTRE = shapes.SIZE / 2


def scene(color=0, shape=0, center=(CENTRE, CENTRE), radius=8.0, n=1):
    """n renders of one scene, with its caption."""
    colors, kinds = torch.full((n,), color), torch.full((n,), shape)
    centers, radii = torch.tensor([center], dtype=torch.float32).repeat(n, 1), torch.full((n,), radius)
    return shapes.render(colors, kinds, centers, radii), [shapes.caption(color, shape)] * n


def test_fit_recovers_known_scenes():
    batch = shapes.sample(12, torch.Generator().manual_seed(3))
    fitted = fit_scene(batch.images)
    assert torch.equal(fitted.colors, batch.colors) and torch.equal(fitted.shapes, batch.shapes)
    # a fit on a 0.04 px grid over anti-aliased 32 px images: a few tenths of a pixel
    assert (fitted.centers - batch.centers).norm(dim=1).max() < 0.4
    assert (fitted.radii - batch.radii).abs().max() < 0.3
    assert fitted.residual.max() < 0.02
    named = torch.tensor(list(shapes.COLORS.values()))[batch.colors]
    assert (fitted.fills - named).norm(dim=1).max() < 0.05


def test_gold_of_a_clean_render_is_its_stated_preference():
    """Independent of the fit: size, centring and purity computed from the true parameters."""
    images, prompts = scene(color=2, shape=1, center=(CENTRE + 3, CENTRE - 4), radius=9.0)
    expected = (9.0 / PREFERRED_RADIUS + (1 - 5.0 / CENTRING_SCALE) + 1) / 3
    residual = fit_scene(images).residual
    assert float(gold(images, prompts)) == pytest.approx(expected * (1 - float(residual) / RESIDUAL_SCALE), abs=0.02)
    assert float(gold(images, prompts)) == pytest.approx(expected, abs=0.1)
    factors = {k: float(v) for k, v in parts(fit_scene(images), prompts).items()}  # as the records keep them
    assert factors["match"] == 1 and factors["quality"] == pytest.approx(expected, abs=0.02)
    assert factors["clean"] == pytest.approx(1 - factors["residual"] / RESIDUAL_SCALE) and factors["residual"] < 0.02
    wrong = parts(fit_scene(images), [shapes.caption(3, 1)])  # the same image under another colour's caption
    assert float(wrong["match"]) == 0 == float(wrong["gold"]) and float(wrong["clean"]) == factors["clean"]


def test_gold_ranks_scenes_by_the_stated_preference():
    sizes = torch.cat([gold(*scene(radius=r)) for r in (5.0, 7.0, 9.0, 11.0)])
    assert (sizes.diff() > 0).all(), sizes
    offsets = torch.cat([gold(*scene(center=(CENTRE + d, CENTRE), radius=6.0)) for d in (0.0, 3.0, 6.0, 9.0)])
    assert (offsets.diff() < 0).all(), offsets
    images, prompts = scene(color=1, radius=8.0)
    background = torch.tensor(shapes.BACKGROUND).view(1, 3, 1, 1)
    foreground = (images - background).abs().amax(1, keepdim=True) > 0.05
    greyed = torch.where(foreground, 0.7 * images + 0.3 * 0.5, images)  # the fill less pure, the same scene
    assert float(gold(greyed, prompts)) < float(gold(images, prompts)) - 0.05


def test_what_the_scene_does_not_explain_lowers_gold():
    images, prompts = scene(color=3, shape=0, radius=8.0)
    clean = float(gold(images, prompts))
    noisy = (images + 0.08 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    checker = (torch.arange(32).view(-1, 1) + torch.arange(32).view(1, -1)) % 2
    textured = (images + 0.15 * (checker - 0.5)).clamp(0, 1)  # adversarial-looking texture everywhere
    second, _ = scene(color=3, shape=0, center=(5.0, 5.0), radius=3.0)
    background = torch.tensor(shapes.BACKGROUND).view(1, 3, 1, 1)
    two_marks = torch.where((second - background).abs().amax(1, keepdim=True) > 0.05, second, images)
    tinted = (images + torch.tensor([0.15, 0.0, 0.0]).view(1, 3, 1, 1)).clamp(0, 1)  # a reddened background
    for name, damaged in {"noise": noisy, "texture": textured, "second mark": two_marks, "tint": tinted}.items():
        assert float(gold(damaged, prompts)) < clean - 0.1, name


def test_gold_ignores_what_the_preference_ignores_and_needs_the_prompt():
    mirrored = torch.cat(
        [gold(*scene(center=(CENTRE + dx, CENTRE + dy), radius=7.0)) for dx, dy in ((4, 0), (-4, 0), (0, 4))]
    )
    assert mirrored.max() - mirrored.min() < 0.02  # where an equally centred shape sits: within the fit's precision
    images, _ = scene(color=0, shape=2, radius=8.0)
    assert float(gold(images, ["a red triangle"])) > 0.5
    assert float(gold(images, ["a blue triangle"])) == 0 and float(gold(images, ["a red square"])) == 0
    empty = torch.tensor(shapes.BACKGROUND).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert float(gold(empty, ["a red triangle"])) == 0
