"""Best-of-N: draw N seeded candidates, keep the one the reward likes best.

Candidate 0 is the item's base sample, so Best-of-N never does worse than base. With `match_opt_steps=K`,
N = 2K + 1 spends the model evaluations of K checkpointed DNO/MIRA steps (2 per sampler step, forward and
recompute) plus their final sample: the compute-matched baseline, equal in the backbone's evaluation count.
"""

import math

import torch

from framework.items import ItemResult, derive_seed
from framework.methods.common import Method, Problem


def num_candidates(cfg) -> int:
    return cfg.n if cfg.match_opt_steps is None else 2 * cfg.match_opt_steps + 1


class BestOfN(Method):
    @torch.no_grad()
    def run(self, problem: Problem) -> ItemResult:
        n, batch = num_candidates(self.cfg), self.cfg.batch_size
        seeds = [problem.item.seed] + [derive_seed(problem.item.seed, k) for k in range(1, n)]
        rewards, steps, base_image, best, best_image = [], [], None, 0, None
        for start in problem.progress(range(0, n, batch), total=math.ceil(n / batch), desc="candidates"):
            images, _ = problem.render(*problem.noise(seeds[start : start + batch]))
            for image, reward in zip(images, problem.score(images).tolist()):
                if not rewards:
                    base_image = image
                if not rewards or reward > rewards[best]:
                    best, best_image = len(rewards), image
                rewards.append(reward)
                steps.append(
                    {
                        "step": len(rewards) - 1,
                        "reward": reward,
                        "best_reward": rewards[best],
                        **problem.measure(image[None], base_image[None]),
                    }
                )
        return ItemResult(
            base_image,
            best_image,
            rewards[0],
            rewards[best],
            steps,
            {"n": n, "best_index": best, "candidate_seeds": seeds},
        )
