"""Reward ensembles (`reward=ensemble`), the field's answer to over-optimising one learned reward: each member's score
becomes a z-score on a reference set (the run's base samples), and the members' z-scores are combined by their mean,
their minimum (worst-case optimisation, WCO) or their mean less λ times their variance (uncertainty-weighted, UWO),
after Coste et al. 2023. The members' spread is the ensemble's disagreement: what gates regularisation (GARDO) and
what the hacking monitor watches."""

import torch
from torch import Tensor, nn

from framework.rewards.base import Reward


class EnsembleReward(Reward):
    """Members keyed by label (member_labels). `mean` and `std` are each member's reference statistics (0 and 1 until
    `normalise` sets them, or for normalise=none)."""

    clamp = False  # each member clamps (or not) as it does alone

    def __init__(self, members: dict[str, Reward], aggregate: str, uwo_lambda: float):
        super().__init__()
        self.members, self.aggregate, self.uwo_lambda = nn.ModuleDict(members), aggregate, uwo_lambda
        self.register_buffer("mean", torch.zeros(len(members)))
        self.register_buffer("std", torch.ones(len(members)))

    def normalise(self, mean: list[float], std: list[float]) -> None:
        self.mean.copy_(torch.tensor(mean))
        self.std.copy_(torch.tensor(std))

    def raw_scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Each member's own score of each image: [members, B] (each member's errors fail the items they concern).
        With a member gradients do not reach the images through, none do: a partial gradient would mislead."""
        if not self.differentiable:
            images = images.detach()
        return torch.stack([member(images, prompts) for member in self.members.values()])

    def member_scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Each member's z-score of each image: [members, B]."""
        return (self.raw_scores(images, prompts) - self.mean[:, None]) / self.std[:, None]

    def combine(self, z: Tensor) -> Tensor:
        if self.aggregate == "wco":
            return z.min(0).values
        if self.aggregate == "uwo":
            return z.mean(0) - self.uwo_lambda * z.var(0, unbiased=False)
        return z.mean(0)

    def scored(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The ensemble's reward [B] and its members' disagreement [B] (the standard deviation of their z-scores)."""
        z = self.member_scores(images, prompts)
        return self.scale * self.combine(z), z.detach().std(0, unbiased=False)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.scored(images, prompts)[0]

    @torch.no_grad()
    def details(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """What records keep of each image: every member's z-score (`member_<label>`) and the disagreement."""
        z = self.member_scores(images, prompts)
        return {f"member_{label}": row for label, row in zip(self.members, z)} | {
            "disagreement": z.std(0, unbiased=False)
        }


def disagreement_gate(disagreement: Tensor, fraction: float) -> Tensor:
    """GARDO's gate: 1 for the ⌈fraction·B⌉ samples whose members disagree most, 0 for the others ([B], float)."""
    k = max(1, int(-(-fraction * len(disagreement) // 1)))
    gate = torch.zeros_like(disagreement)
    gate[disagreement.topk(k).indices] = 1.0
    return gate
