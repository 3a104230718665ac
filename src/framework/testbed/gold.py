"""The testbed's gold reward: a stated "true preference" over the shapes world, computed by analysis-by-synthesis.

No network reads the image. `fit_scene` recovers the scene that best explains it with the world's own renderer
(`shapes.render`): the foreground's area and centroid give each shape hypothesis its centre and half-size, a small
grid around them refines the fit, the least-squares fill colour is solved in closed form for each candidate's
anti-aliased coverage, and the candidate with the smallest pixel error wins. `gold` then scores the recovered scene:

    gold = match · (size + centring + purity) / 3 · clean

- match (0 or 1): the recovered colour (the world colour nearest the fitted fill) and shape are the prompt's;
- size = min(r / 12, 1): larger shapes are preferred, up to a half-size of 12 px (the world draws 5 to 10), so an
  optimiser has room to improve honestly;
- centring = 1 − min(‖centre − image centre‖ / 12, 1);
- purity = 1 − min(‖fill − the prompt colour's RGB‖ / 0.5, 1): the fill should be the named colour itself;
- clean = max(0, 1 − residual / 0.15), residual = RMS over pixels and channels of the image minus the rendered
  recovered scene: whatever the scene does not explain (noise, texture, a second mark, a tinted background, a
  distorted outline) lowers gold.

Gold ignores everything else (e.g. which of two equally large, equally centred positions a shape takes). It is
not differentiable and is never optimised: it labels the comparisons the proxy rewards learn from and measures
what optimising them does.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from framework.testbed.shapes import BACKGROUND, COLORS, SHAPES, SIZE, SUPERSAMPLE, parse_caption

PREFERRED_RADIUS = 12.0  # px; the world's own shapes have half-sizes 5 to 10
CENTRING_SCALE = 12.0  # px from the centre at which centring reaches 0
PURITY_SCALE = 0.5  # RGB distance at which purity reaches 0
RESIDUAL_SCALE = 0.15  # RMS residual at which clean reaches 0
FOREGROUND = 0.2  # a pixel whose largest channel differs from the background by more is foreground

# Area of each shape per squared half-size, and its centroid's vertical offset from the shape's centre per
# half-size, as `shapes.render` draws them (circle πr², square (1.7r)², triangle 1.8r² with centroid 0.2r low).
AREA_PER_R2 = torch.tensor([torch.pi, 1.7**2, 1.8])
CENTROID_DY = torch.tensor([0.0, 0.0, 0.2])
GRID = torch.tensor([-1.0, 0.0, 1.0])
REFINEMENT = (0.6, 0.3, 0.15, 0.08, 0.04)  # grid steps (px) of the successive refinements around the moment estimate


@dataclass
class Scene:
    """The recovered scene of each image: colour and shape indices, centre (x, y) and half-size in pixels, the
    fitted fill RGB and the RMS residual of the image against the rendered scene."""

    colors: Tensor
    shapes: Tensor
    centers: Tensor
    radii: Tensor
    fills: Tensor
    residual: Tensor


def coverage(shape: int, centers: Tensor, radii: Tensor) -> Tensor:
    """Anti-aliased coverage [N, 32, 32] in [0, 1] of one shape kind, rendered exactly as the world renders it."""
    n = len(radii)
    size = SIZE * SUPERSAMPLE
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    y, x = coords.view(1, -1, 1), coords.view(1, 1, -1)
    dx, dy, r = x - centers[:, 0, None, None], y - centers[:, 1, None, None], radii[:, None, None]
    if shape == 0:
        mask = dx**2 + dy**2 <= r**2
    elif shape == 1:
        mask = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    else:
        mask = (dy <= r * 0.8) & (dx.abs() <= (dy + r) / 1.8)
    return F.avg_pool2d(mask.float().view(n, 1, size, size), SUPERSAMPLE).view(n, SIZE, SIZE)


def candidates(image: Tensor, shape: int, center: Tensor, radius: Tensor, step: float) -> tuple:
    """The best of a grid of centres (±1 step of `step` px) and half-sizes (±1 step of `step`/10 relative) around
    (center, radius) for one shape kind: (centre, half-size, fill − background, mean squared error)."""
    offsets = torch.cartesian_prod(GRID, GRID) * step  # [25, 2]
    centers = (center + offsets).repeat_interleave(len(GRID), 0)
    radii = (radius * (1 + GRID * step / 10)).repeat(len(offsets))
    m = coverage(shape, centers, radii).view(len(radii), 1, -1)  # [N, 1, P]
    x = image.view(1, 3, -1)  # image − background = m·(fill − background): fill by least squares
    delta = (m * x).sum(-1) / m.square().sum(-1).clamp(min=1e-6)  # [N, 3]
    error = (x - m * delta[:, :, None]).square().mean((1, 2))
    i = int(error.argmin())
    return centers[i], radii[i], delta[i], error[i]


def fit_one(image: Tensor) -> tuple[int, int, Tensor, Tensor, Tensor, Tensor]:
    """Analysis-by-synthesis of one [3, 32, 32] image: the best (colour, shape, centre, half-size, fill, residual)."""
    background = torch.tensor(BACKGROUND).view(3, 1, 1)
    image = image - background
    foreground = (image.abs().amax(0) > FOREGROUND).float()
    area = foreground.sum().clamp(min=1.0)
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    centroid = torch.stack([(foreground * xs).sum(), (foreground * ys).sum()]) / area
    best = None
    for shape in range(len(SHAPES)):
        radius = (area / AREA_PER_R2[shape]).sqrt()
        center = centroid - torch.stack([torch.tensor(0.0), CENTROID_DY[shape] * radius])
        for step in REFINEMENT:
            center, radius, delta, error = candidates(image, shape, center, radius, step)
        if best is None or error < best[-1]:
            best = (shape, center, radius, background.view(3) + delta, error)
    shape, center, radius, fill, error = best
    color = int((torch.tensor(list(COLORS.values())) - fill).norm(dim=1).argmin())
    return color, shape, center, radius, fill.clamp(0, 1), error.sqrt()


@torch.no_grad()
def fit_scene(images: Tensor) -> Scene:
    """The recovered scene of each image [B, 3, 32, 32] in [0, 1] (other sizes are resized to 32×32 first)."""
    images = images.detach().float().cpu()
    if images.shape[-1] != SIZE:
        images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    fits = [fit_one(image) for image in images]
    colors, shapes_, centers, radii, fills, residual = zip(*fits)
    return Scene(
        torch.tensor(colors),
        torch.tensor(shapes_),
        torch.stack(centers),
        torch.stack(radii),
        torch.stack(fills),
        torch.stack(residual),
    )


def parts(scene: Scene, prompts: list[str]) -> dict[str, Tensor]:
    """Gold of recovered scenes for their prompts with its factors (see the module docstring): `match`, `quality`
    = (size + centring + purity) / 3, `clean`, and the `residual` clean is computed from."""
    targets = torch.tensor([parse_caption(p) for p in prompts]).view(-1, 2)
    match = ((scene.colors == targets[:, 0]) & (scene.shapes == targets[:, 1])).float()
    size = (scene.radii / PREFERRED_RADIUS).clamp(max=1)
    centring = 1 - ((scene.centers - SIZE / 2).norm(dim=1) / CENTRING_SCALE).clamp(max=1)
    named = torch.tensor(list(COLORS.values()))[targets[:, 0]]
    purity = 1 - ((scene.fills - named).norm(dim=1) / PURITY_SCALE).clamp(max=1)
    quality = (size + centring + purity) / 3
    clean = (1 - scene.residual / RESIDUAL_SCALE).clamp(min=0)
    return {
        "gold": match * quality * clean,
        "match": match,
        "quality": quality,
        "clean": clean,
        "residual": scene.residual,
    }


def score(scene: Scene, prompts: list[str]) -> Tensor:
    """Gold of recovered scenes for their prompts."""
    return parts(scene, prompts)["gold"]


def gold(images: Tensor, prompts: list[str]) -> Tensor:
    """Gold reward [B] of images [B, 3, H, W] in [0, 1] for shapes-world prompts, on the images' device."""
    return score(fit_scene(images), prompts).to(images.device)
