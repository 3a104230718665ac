"""The testbed's reward: the ground-truth judge's log-probability of the prompt's colour and shape. The judge
itself lives with the testbed, which also measures adherence with it."""

from torch import Tensor

from framework.rewards.base import Reward
from framework.testbed.judge import Judge, judge_log_prob


class JudgeReward(Reward):
    """Testbed reward: the judge's log-probability of the prompt's colour and shape (differentiable)."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return judge_log_prob(self.judge, images, prompts)[0]
