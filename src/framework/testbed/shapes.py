"""The shapes world: 32×32 RGB images of one coloured shape on a plain dark background, captioned "a {colour}
{shape}". Position and size vary, so samples of one caption differ; colour and shape are the ground truth."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

COLORS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (0.15, 0.15, 0.15)
SIZE = 32
SUPERSAMPLE = 4  # rendered at 4× and averaged: anti-aliased edges


def caption(color: int, shape: int) -> str:
    return f"a {list(COLORS)[color]} {SHAPES[shape]}"


def all_captions() -> list[str]:
    return [caption(c, s) for c in range(len(COLORS)) for s in range(len(SHAPES))]


def parse_caption(text: str) -> tuple[int, int]:
    """(colour index, shape index) of a caption "a {colour} {shape}"."""
    words = text.lower().split()
    colors = [i for i, c in enumerate(COLORS) if c in words]
    shapes = [i for i, s in enumerate(SHAPES) if s in words]
    if len(colors) != 1 or len(shapes) != 1:
        raise ValueError(f"{text!r} does not name exactly one colour of {list(COLORS)} and one shape of {SHAPES}")
    return colors[0], shapes[0]


def is_caption(text: str) -> bool:
    try:
        parse_caption(text)
    except ValueError:
        return False
    return True


@dataclass
class Batch:
    images: Tensor  # [B, 3, 32, 32] in [0, 1]
    colors: Tensor  # [B] colour indices
    shapes: Tensor  # [B] shape indices
    centers: Tensor  # [B, 2] (x, y) in pixels
    radii: Tensor  # [B] half-size in pixels

    @property
    def captions(self) -> list[str]:
        return [caption(int(c), int(s)) for c, s in zip(self.colors, self.shapes)]


def render(colors: Tensor, shapes: Tensor, centers: Tensor, radii: Tensor) -> Tensor:
    n, size = len(colors), SIZE * SUPERSAMPLE
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - centers[:, 0, None, None], y - centers[:, 1, None, None]
    r = radii[:, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)  # same area scale as the circle, roughly
    triangle = (dy <= r * 0.8) & (dx.abs() <= (dy + r) / 1.8 * 1.0)  # apex up, base at the bottom
    mask = torch.stack([circle, square, triangle], 1)[torch.arange(n), shapes].float()[:, None]
    fill = torch.tensor(list(COLORS.values()))[colors][:, :, None, None]
    images = torch.tensor(BACKGROUND)[None, :, None, None] * (1 - mask) + fill * mask
    return F.avg_pool2d(images, SUPERSAMPLE)


def sample(n: int, generator: torch.Generator, colors: Tensor | None = None, shapes: Tensor | None = None) -> Batch:
    """n random images (colours and shapes uniform unless given)."""
    colors = torch.randint(len(COLORS), (n,), generator=generator) if colors is None else colors
    shapes = torch.randint(len(SHAPES), (n,), generator=generator) if shapes is None else shapes
    radii = 5 + 5 * torch.rand(n, generator=generator)
    centers = radii[:, None] + 1 + (SIZE - 2 * radii[:, None] - 2) * torch.rand(n, 2, generator=generator)
    return Batch(render(colors, shapes, centers, radii), colors, shapes, centers, radii)
