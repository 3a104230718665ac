"""The reference an ensemble's members are normalised on (`reward.normalise=base`): the run's base samples, drawn
before any optimisation as method=base draws them, so that each member's score is a z-score on the images the run
starts from and members of different scales (HPSv2, PickScore, ImageReward) weigh alike. The statistics are kept in
the run directory: a rerun resumes with the same normalisation, bit for bit."""

import json
import math
from pathlib import Path

import torch

from framework.core.atomic import write_text
from framework.core.errors import FrameworkError
from framework.runner.alignment import make_items

REFERENCE = "reward_reference.json"


def reference_items(prompts: list[str], seed: int, count: int):
    """The first `count` base samples of the run: its items' seeds, prompt by prompt, then further seeds of each
    prompt where the run has fewer items."""
    per_prompt = math.ceil(count / len(prompts))
    items = make_items(prompts, seed, per_prompt)
    return sorted(items, key=lambda item: (item.sample_index, item.prompt_index))[:count]


@torch.no_grad()
def normalise_ensemble(cfg, reward, backbone, prompts: list[str], device, run_dir: Path) -> dict | None:
    """Set the ensemble `reward`'s member statistics (mean and standard deviation over the reference images) and
    return them, as written to `reward_reference.json`; None where there is nothing to normalise."""
    from framework.methods.common import Problem
    from framework.rewards.ensemble import EnsembleReward

    if not isinstance(reward, EnsembleReward) or cfg.reward.normalise == "none":
        return None
    path = run_dir / REFERENCE
    if path.is_file():
        stats = json.loads(path.read_text())
    else:
        backbone.to(device)
        reward.to(device)
        items = reference_items(prompts, cfg.seed, cfg.reward.reference_images)
        scores = []
        for start in range(0, len(items), cfg.method.batch_size):
            problem = Problem(backbone, reward, items[start : start + cfg.method.batch_size], cfg.method)
            images, _ = problem.render(*problem.noise())
            scores.append(reward.raw_scores(images, [item.prompt for item in problem.items]))
        members = {
            label: {"mean": row.mean().item(), "std": row.std().item()}
            for label, row in zip(reward.members, torch.cat(scores, 1))
        }
        flat = [label for label, s in members.items() if not s["std"] > 0]
        if flat:
            raise FrameworkError(
                f"reward.members: {', '.join(flat)} scored the {len(items)} reference images alike (standard "
                "deviation 0), so no z-score exists; set reward.normalise=none or raise reward.reference_images"
            )
        stats = {"images": len(items), "members": members}
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(stats, indent=1))
    members = stats["members"]
    reward.normalise([members[k]["mean"] for k in reward.members], [members[k]["std"] for k in reward.members])
    return stats
