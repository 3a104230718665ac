"""What a GRPO epoch costs, split into its parts, against plain sampling of the same images; ratios measured in one
run (no absolute-time claims).

    python benchmarks/bench_grpo.py [--model shapes|tiny_sd3] [--repeats 3]

Per image of an epoch (prompts × group):
1. rollouts (stochastic sampling that keeps each step's x_t and log π_old, no gradient; then decoding, scoring and
   advantages) / plain sampling
2. of which scoring (the reward on the decoded images, in batches) / plain sampling
3. the update (one checkpointed forward and backward per trained step, the KL's adapter-free forward) / plain
   sampling
4. the whole epoch / plain sampling
Plain sampling: the same number of images, the rollout's step count, no log-probabilities.
"""

import argparse
import statistics
from types import SimpleNamespace

import torch
from bench_sampler import seconds  # benchmarks/ is the script's directory
from omegaconf import OmegaConf

import framework  # noqa: F401  (torchvision workaround)
from framework.config import ModelConfig, register_configs
from framework.config.methods import GRPOConfig
from framework.core.options import CONF_DIR
from framework.methods.common import draw_noise
from framework.methods.grpo import GRPO
from framework.models import load_backbone
from framework.models.sampling import sample
from framework.rewards import load_named_reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="a conf/model option (shapes: the testbed)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    register_configs()  # ${testbed_model:}
    model = OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml")
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), model.get("model", model)))
    backbone = load_backbone(model)
    reward = load_named_reward("brightness")
    cfg = OmegaConf.structured(GRPOConfig(group_size=8, prompts_per_epoch=2, lora_rank=8))
    module = GRPO(backbone, reward, cfg, ["a red circle", "a blue square"], 0, "/tmp/bench_grpo")
    module._trainer = SimpleNamespace(world_size=1, global_rank=0)
    optimiser = torch.optim.AdamW(module.trainable, lr=cfg.lr)
    prompts = [p for p in module.prompts for _ in range(cfg.group_size)]
    seeds, trained = list(range(len(prompts))), module.trained_steps(0)

    def plain():
        with torch.no_grad():
            x_T, noises = draw_noise(backbone, module.rollout_sampler, seeds)
            traj = sample(backbone, backbone.encode(prompts), x_T, noises, num_steps=cfg.rollout_steps, eta=0.7)
            state["images"] = backbone.decode(traj.latents)

    state = {}

    def rollouts():
        state["rollout"] = module.rollout(prompts, seeds, 0)

    def scoring():
        with torch.no_grad():
            for i in range(0, len(prompts), cfg.batch_size):
                reward(state["images"][i : i + cfg.batch_size], prompts[i : i + cfg.batch_size])

    def update():
        steps = module.steps(0)
        losses = [module.step_loss(state["rollout"], j, steps[i])[0] for j, i in enumerate(trained)]
        torch.stack(losses).mean().backward()
        optimiser.step()
        optimiser.zero_grad()

    rows = {"plain": [], "rollouts": [], "scoring": [], "update": []}
    plain(), rollouts(), update()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("rollouts", rollouts), ("scoring", scoring), ("update", update)):
            rows[name].append(seconds(fn))
    base = statistics.median(rows["plain"])
    print(f"GRPO epoch on {args.model}: {len(prompts)} images, {cfg.rollout_steps} steps, {len(trained)} trained")
    for name in ("rollouts", "scoring", "update"):
        print(f"  {name:9} / plain sampling: {statistics.median(rows[name]) / base:5.2f}")
    epoch = sum(statistics.median(rows[n]) for n in ("rollouts", "update"))
    print(f"  epoch     / plain sampling: {epoch / base:5.2f}")


if __name__ == "__main__":
    main()
