"""Train the testbed's proxy rewards: `python -m framework.tools.train_proxy [--comparisons 1000 4000 16000]`.

As HPSv2 and PickScore are made: images from the model (here the testbed model: base samples at CFG 5 and
variations of them: perturbed initial noise, CFG 2 to 7.5, deterministic or stochastic sampling), shown in pairs
for the same prompt (a tenth of the pairs show an image of another caption), labelled by a noisy rater and fit by
Bradley–Terry. The rater is gold with Bradley–Terry noise: it prefers A with probability σ((gold_A − gold_B) / τ),
τ = 0.05, so it agrees with gold on about 80 % of the testbed model's pairs, as human raters agree with each other
on preference data sets. Each proxy sees the first N comparisons of one stream (the data set is the only knob; the
networks and training steps are equal), then is tested on held-out pairs from fresh images: accuracy against gold's
ranking, against held-out noisy labels, and the noise ceiling (the rater's own expected accuracy against gold).
Writes `proxy_<N>.safetensors` and updates `proxy_report.json` in the testbed directory (or `--out`).

`--members K` also trains the K members of `reward=proxy_ensemble` (`proxy_1000_member<k>.safetensors`): each on a
bootstrap resample of the smallest proxy's comparisons, from its own initialisation and batch order, as Coste et
al. and Eisenstein et al. build reward ensembles. The report adds each member's accuracy, the ensemble mean's, and
whether the members are linearly connected (WARM's premise): the accuracy of the midpoint of each pair of members
and of their uniform weight average, against their endpoints'.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from framework.rewards.proxy import ProxyNet, TextFeatures
from framework.testbed import MODEL_DIR, PROXY_SIZES, TESTBED_DIR, proxy_file
from framework.testbed.gold import fit_scene, score
from framework.testbed.shapes import all_captions
from framework.tools.train_testbed import fit

LABEL_TEMPERATURE = 0.05  # τ of the simulated rater
FOREIGN = 0.1  # share of comparisons whose second image shows another caption
SETTINGS = ((5.0, 0.0), (2.0, 0.0), (3.5, 1.0), (5.0, 1.0), (7.5, 0.0), (3.5, 0.0))  # (CFG, η) of variations
NUM_STEPS = 10  # the sampler steps of the testbed experiments


@torch.no_grad()
def generate(n: int, seed: int, chunk: int = 128) -> tuple[torch.Tensor, list[str]]:
    """n images of the testbed model with their captions: each chunk holds base samples (CFG 5, η = 0) and
    variations of them (the same caption, initial noise rotated towards fresh noise by a random angle up to 60°,
    at the chunk's sampler setting)."""
    from framework.config import ModelConfig
    from framework.models import load_backbone
    from framework.models.sampling import num_noises, sample

    backbone = load_backbone(ModelConfig(kind="sd", source=str(MODEL_DIR), resolution=32))
    generator = torch.Generator().manual_seed(seed)
    captions, images = all_captions(), []
    prompts = []
    for k in range(0, n, chunk):
        half = min(chunk, n - k) // 2
        names = [captions[i] for i in torch.randint(len(captions), (half,), generator=generator)]
        x_T = torch.randn((half, *backbone.latent_shape()), generator=generator)
        angle = torch.rand(half, 1, 1, 1, generator=generator) * torch.pi / 3
        varied = angle.cos() * x_T + angle.sin() * torch.randn(x_T.shape, generator=generator)
        guidance, eta = SETTINGS[(k // chunk) % len(SETTINGS)]
        for start, scale, level in ((x_T, 5.0, 0.0), (varied, guidance, eta)):
            noises = torch.randn((num_noises(NUM_STEPS, level), *start.shape), generator=generator) if level else None
            traj = sample(
                backbone, backbone.encode(names), start, noises, num_steps=NUM_STEPS, eta=level, guidance_scale=scale
            )
            images.append(backbone.postprocess(backbone.decode(traj.latents)).float())
            prompts += names
        print(f"[images] {len(prompts)}/{n}", flush=True)
    return torch.cat(images), prompts


def gold_table(images: torch.Tensor) -> torch.Tensor:
    """Gold of every image under every caption: [N, 12] (one scene fit per image)."""
    scene = fit_scene(images)
    captions = all_captions()
    columns = []
    for caption in captions:
        columns.append(score(scene, [caption] * len(images)))
    return torch.stack(columns, 1)


def comparisons(prompts: list[str], n: int, generator: torch.Generator) -> torch.Tensor:
    """n pairs (i, j, caption index): i at random, j another image of i's caption, or, for a tenth, of another."""
    captions = all_captions()
    index = torch.tensor([captions.index(p) for p in prompts])
    by_caption = [torch.nonzero(index == c).flatten() for c in range(len(captions))]
    rows = []
    for _ in range(n):
        i = int(torch.randint(len(prompts), (1,), generator=generator))
        c = int(index[i])
        if torch.rand(1, generator=generator) < FOREIGN:
            pool = torch.nonzero(index != c).flatten()
        else:
            pool = by_caption[c][by_caption[c] != i]
        rows.append((i, int(pool[torch.randint(len(pool), (1,), generator=generator)]), c))
    return torch.tensor(rows)


def rate(gold: torch.Tensor, pairs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The rater's labels (1: the first image preferred) and gold's difference for each pair."""
    gap = gold[pairs[:, 0], pairs[:, 2]] - gold[pairs[:, 1], pairs[:, 2]]
    labels = (torch.rand(len(pairs), generator=generator) < torch.sigmoid(gap / LABEL_TEMPERATURE)).float()
    return labels, gap


def train(images, text, pairs, labels, steps: int, seed: int, batch: int = 64) -> ProxyNet:
    """Bradley–Terry: −log σ(±(s_A − s_B)) on the labelled pairs, AdamW with warm-up and cosine decay."""
    torch.manual_seed(seed)
    net = ProxyNet()
    generator = torch.Generator().manual_seed(seed)

    def loss_at(step):
        rows = torch.randint(len(pairs), (batch,), generator=generator)
        i, j, c = pairs[rows].T
        s = net(torch.cat([images[i], images[j]]), text[c].repeat(2, 1)).view(2, -1)
        return F.binary_cross_entropy_with_logits(s[0] - s[1], labels[rows])

    fit("proxy", net.parameters(), steps, 2e-3, loss_at, log_every=500)
    return net.eval()


@torch.no_grad()
def evaluate(net: ProxyNet, images, text, pairs, labels, gap) -> dict:
    """Held-out pairwise accuracy against gold's ranking (pairs gold ties left out), against the rater's labels,
    and the noise ceiling: the rater's expected accuracy against gold on the same pairs."""
    first, second = (net(images[pairs[:, k]], text[pairs[:, 2]]) for k in (0, 1))
    decided = gap.abs() > 1e-6
    return {
        "accuracy_vs_gold": round(float(((first > second) == (gap > 0))[decided].float().mean()), 4),
        "accuracy_vs_labels": round(float(((first > second) == labels.bool()).float().mean()), 4),
        "noise_ceiling": round(float(torch.sigmoid(gap[decided].abs() / LABEL_TEMPERATURE).mean()), 4),
    }


def averaged(nets: list[ProxyNet]) -> ProxyNet:
    """The uniform weight average of `nets` (WARM's merge)."""
    net = ProxyNet()
    net.load_state_dict({k: torch.stack([n.state_dict()[k] for n in nets]).mean(0) for k in net.state_dict()})
    return net.eval()


def train_members(count: int, images, text, stream, labels, steps: int, seed: int, evaluate_on) -> dict:
    """The ensemble's members on bootstraps of the first PROXY_SIZES[0] comparisons, and their report."""
    n, members, rows = PROXY_SIZES[0], [], []
    for k in range(count):
        generator = torch.Generator().manual_seed(seed + 1000 + k)
        sample = torch.randint(n, (n,), generator=generator)  # bootstrap of the smallest proxy's comparisons
        members.append(train(images, text, stream[:n][sample], labels[:n][sample], steps, seed + 1 + k))
        rows.append(evaluate_on(members[-1]))
        print(json.dumps({f"member {k}": rows[-1]}), flush=True)

    class Mean(torch.nn.Module):
        def forward(self, images, text):
            return torch.stack([m(images, text) for m in members]).mean(0)

    midpoints = [
        {"members": [a, b], **evaluate_on(averaged([members[a], members[b]]))}
        for a in range(count)
        for b in range(a + 1, count)
    ]
    endpoint = sum(row["accuracy_vs_gold"] for row in rows) / count
    barrier = endpoint - min(row["accuracy_vs_gold"] for row in midpoints) if midpoints else 0.0
    report = {
        "members": rows,
        "mean_of_members": evaluate_on(Mean()),
        "weight_average": evaluate_on(averaged(members)),
        "pair_midpoints": midpoints,
        # Frankle et al.'s barrier on accuracy: the members' mean accuracy minus the worst midpoint's
        "largest_barrier": round(barrier, 4),
        "linearly_connected": barrier <= 0.01,
    }
    return members, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comparisons", type=int, nargs="*", default=list(PROXY_SIZES))
    parser.add_argument("--members", type=int, default=0, help="ensemble members to train (reward=proxy_ensemble)")
    parser.add_argument("--images", type=int, default=4096, help="training images (the comparisons share them)")
    parser.add_argument("--eval-images", type=int, default=1024)
    parser.add_argument("--eval-pairs", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps of batch 64 pairs per proxy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TESTBED_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the report's numbers depend on the kernels' order
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    train_images, train_prompts = generate(args.images, args.seed)
    eval_images, eval_prompts = generate(args.eval_images, args.seed + 1)
    train_gold, eval_gold = gold_table(train_images), gold_table(eval_images)
    # One stream as long as the largest proxy's, whichever proxies this call rebuilds: each proxy's first N pairs,
    # their labels and the held-out pairs drawn after them are then the same as when all were built together.
    stream = comparisons(train_prompts, max([*args.comparisons, *PROXY_SIZES]), generator)
    stream_labels, _ = rate(train_gold, stream, generator)
    held_out = comparisons(eval_prompts, args.eval_pairs, generator)
    held_out_labels, held_out_gap = rate(eval_gold, held_out, generator)
    text = TextFeatures()(all_captions())
    data_minutes = (time.perf_counter() - started) / 60
    report_path = args.out / "proxy_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    for n in args.comparisons:
        started = time.perf_counter()
        net = train(train_images, text, stream[:n], stream_labels[:n], args.steps, args.seed)
        save_file(net.state_dict(), args.out / f"proxy_{n}.safetensors")
        report[str(n)] = {
            **evaluate(net, eval_images, text, held_out, held_out_labels, held_out_gap),
            "train_minutes": round((time.perf_counter() - started) / 60, 1),
        }
        print(json.dumps({n: report[str(n)]}), flush=True)
    command = "python -m framework.tools.train_proxy " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}".strip()
        for k, v in vars(args).items()
        if k != "out"
    )
    if args.members:
        evaluate_on = lambda net: evaluate(net, eval_images, text, held_out, held_out_labels, held_out_gap)  # noqa: E731
        members, report["ensemble"] = train_members(
            args.members, train_images, text, stream, stream_labels, args.steps, args.seed, evaluate_on
        )
        report["ensemble"]["command"] = command
        for k, net in enumerate(members):
            save_file(net.state_dict(), args.out / proxy_file(PROXY_SIZES[0], k).name)
    if args.comparisons:
        report["data"] = {"minutes": round(data_minutes, 1), "label_temperature": LABEL_TEMPERATURE, "command": command}
    report_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
