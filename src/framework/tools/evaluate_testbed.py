"""Ground-truth evaluation of a testbed model: sample every caption with several seeds and let the judge read them."""

from pathlib import Path

import torch

from framework.config import ModelConfig
from framework.models import load_backbone
from framework.models.sampling import sample
from framework.testbed import JUDGE_FILE, MODEL_DIR
from framework.testbed.judge import load_judge
from framework.testbed.shapes import BACKGROUND, all_captions, parse_caption


def shape_geometry(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid (x, y) in pixels and area in pixels of the foreground (pixels away from the background colour)."""
    background = torch.tensor(BACKGROUND, device=images.device).view(1, 3, 1, 1)
    mask = ((images - background).abs().amax(1) > 0.2).float()  # [B, H, W]
    area = mask.sum((1, 2)).clamp(min=1)
    ys, xs = torch.meshgrid(torch.arange(images.shape[-2]), torch.arange(images.shape[-1]), indexing="ij")
    centers = torch.stack([(mask * xs).sum((1, 2)), (mask * ys).sum((1, 2))], 1) / area[:, None]
    return centers, area


@torch.no_grad()
def evaluate_adherence(
    model_dir: Path = MODEL_DIR,
    judge_file: Path = JUDGE_FILE,
    seeds: int = 8,
    num_steps: int = 25,
    guidance_scale: float = 5.0,
) -> dict:
    backbone = load_backbone(ModelConfig(kind="sd", source=str(model_dir), resolution=32))
    judge = load_judge(judge_file)
    per_caption, correct, center_spread, area_spread = {}, 0, [], []
    for caption in all_captions():
        x_T = torch.randn((seeds, *backbone.latent_shape()), generator=torch.Generator().manual_seed(0))
        cond = backbone.encode([caption]).select([0] * seeds)
        images = backbone.postprocess(
            backbone.decode(sample(backbone, cond, x_T, num_steps=num_steps, guidance_scale=guidance_scale).latents)
        )
        colors, kinds = judge(images)
        color, shape = parse_caption(caption)
        hits = ((colors.argmax(1) == color) & (kinds.argmax(1) == shape)).sum().item()
        per_caption[caption] = hits / seeds
        correct += hits
        if seeds > 1:
            centers, areas = shape_geometry(images)
            center_spread.append(centers.std(0).mean().item())
            area_spread.append((areas.std() / areas.mean()).item())
    return {
        "adherence": correct / (seeds * len(per_caption)),
        "per_caption": per_caption,
        # spread across the seeds of one caption, averaged over captions
        "position_std_px": sum(center_spread) / len(center_spread) if center_spread else None,
        "area_relative_std": sum(area_spread) / len(area_spread) if area_spread else None,
        "eval": {"seeds": seeds, "num_steps": num_steps, "guidance_scale": guidance_scale, "eta": 0.0},
    }
