"""Best-of-N: draw N seeded candidates, keep the one the reward likes best.

Candidate 0 is the item's base sample, so Best-of-N never does worse than base. With `match_opt_steps=K`,
N = 2K + 1 spends the model evaluations of K checkpointed DNO/MIRA steps (2 per sampler step, forward and
recompute) plus their final sample: the compute-matched baseline, equal in the backbone's evaluation count.
"""

import torch

from framework.core.items import ItemResult, derive_seed
from framework.methods.common import Method, Problem


def num_candidates(cfg) -> int:
    return cfg.n if cfg.match_opt_steps is None else 2 * cfg.match_opt_steps + 1


class BestOfN(Method):
    @torch.no_grad()
    def run(self, problem: Problem) -> list[ItemResult]:
        n, size, items = num_candidates(self.cfg), self.cfg.batch_size, problem.items
        seeds = [[item.seed] + [derive_seed(item.seed, k) for k in range(1, n)] for item in items]
        candidates = [(i, k) for i in range(len(items)) for k in range(n)]  # item i's candidate 0 comes first
        rewards, best, base, final, steps = [[] for _ in items], [0] * len(items), {}, {}, [[] for _ in items]
        chunks = range(0, len(candidates), size)
        for start in problem.progress(chunks, total=len(chunks), desc=f"{problem.describe()} candidates"):
            chunk = candidates[start : start + size]
            rows = [i for i, _ in chunk]
            images, _ = problem.render(*problem.noise([seeds[i][k] for i, k in chunk]), rows)
            for (i, k), image in zip(chunk, images):
                base.setdefault(i, image)
            measured = problem.measure(images, torch.stack([base[i] for i in rows]), rows)
            for (i, k), image, reward, measures in zip(chunk, images, problem.score(images, rows).tolist(), measured):
                if k == 0 or reward > rewards[i][best[i]]:
                    best[i], final[i] = k, image
                rewards[i].append(reward)
                steps[i].append({"step": k, "reward": reward, "best_reward": rewards[i][best[i]], **measures})
        return [
            ItemResult(
                base[i],
                final[i],
                rewards[i][0],
                rewards[i][best[i]],
                steps[i],
                {"n": n, "best_index": best[i], "candidate_seeds": seeds[i]},
            )
            for i in range(len(items))
        ]
