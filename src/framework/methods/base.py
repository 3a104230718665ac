"""Base sampling: one image from each item's seeded noise, the reference of every comparison."""

import torch

from framework.core.items import ItemResult
from framework.methods.common import Method, Problem


class Base(Method):
    @torch.no_grad()
    def run(self, problem: Problem) -> list[ItemResult]:
        images, _ = problem.render(*problem.noise())
        return [ItemResult(image, image, r, r) for image, r in zip(images, problem.score(images).tolist())]
