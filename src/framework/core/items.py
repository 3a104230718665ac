"""Units of work and their results: an item is a prompt and one seed for it; its result is what a method returns.

They sit below both the methods that produce results and the store that writes them.
"""

import math
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor


def derive_seed(*keys: int) -> int:
    """A 31-bit seed that depends only on `keys` (never on process rank or batch layout)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass(frozen=True)
class Item:
    """One unit of work: a prompt and one seed for it."""

    prompt_index: int
    sample_index: int
    prompt: str
    seed: int

    @property
    def id(self) -> str:
        return f"p{self.prompt_index:04d}_s{self.sample_index:03d}"


@dataclass
class ItemResult:
    base_image: Tensor  # [3, H, W] as decoded (saved clamped to [0, 1]): the plain sample from the item's seed
    final_image: Tensor  # what the method returns for the item
    base_reward: float
    final_reward: float
    steps: list[dict] = field(default_factory=list)  # one record per optimisation step / candidate
    info: dict = field(default_factory=dict)  # method-specific values worth keeping

    def non_finite_score(self) -> str | None:
        """What is wrong when a reward this result records is not a finite number (a served reward answering NaN, a
        callable dividing by zero): such a score can be neither ranked nor averaged, so its item fails."""
        scores = {"the base image": self.base_reward, "the final image": self.final_reward}
        scores |= {f"step {s['step']}": s["reward"] for s in self.steps if isinstance(s.get("reward"), float)}
        for where, score in scores.items():
            if not math.isfinite(score):
                return f"the reward returned a non-finite score ({score}) for {where}"
        return None
