"""Base sampling: one image from the item's seeded noise, the reference of every comparison."""

import torch

from framework.items import ItemResult
from framework.methods.common import Method, Problem


class Base(Method):
    @torch.no_grad()
    def run(self, problem: Problem) -> ItemResult:
        images, _ = problem.render(*problem.noise([problem.item.seed]))
        reward = float(problem.score(images)[0])
        return ItemResult(images[0], images[0], reward, reward)
