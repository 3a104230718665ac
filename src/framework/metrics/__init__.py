"""Measurements besides the optimised reward, taken without gradients.

Per image (each optimisation step and the final image of every item): drift from the item's base image (same seed)
as pixel RMSE and embedding cosine distance, CLIPScore, held-out evaluation rewards and, on the testbed,
ground-truth prompt adherence and gold (the analysis-by-synthesis gold reward). Per run (`set_metrics`): CMMD and
spectral distances between the final and base image sets, diversity across the seeds of each prompt, and the win
rate of final over base images. CMMD is computed as published, on CLIP ViT-L/14 at 336 px (`eval.cmmd_clip`;
`cmmd`), or on the testbed judge's features (`cmmd_judge`, not comparable with published values).
"""

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framework.core.errors import item_work
from framework.core.records import ItemRecord
from framework.metrics.sets import (
    cmmd,
    log_spectral_distance,
    mean_pairwise_distance,
    spectral_distance,
    vendi_score,
    win_rate,
)
from framework.testbed.gold import fit_scene, parts
from framework.testbed.judge import judge_log_prob
from framework.testbed.shapes import is_caption

FEATURE_BATCH = 64


class ImageMetrics(nn.Module):
    """`features`: "clip" (the CLIP model of `clip`), "judge" (the testbed judge's penultimate layer) or None.
    `cmmd_clip`: the CLIP whose embeddings CMMD uses when features are CLIP's (ViT-L/14-336 for published CMMD).
    `eval_rewards`: held-out rewards reported as `eval_<name>`. `ensemble`: the optimised reward when it is an
    ensemble, whose members' scores and disagreement every record keeps. Every model is a submodule, so it moves
    with the runner to the run's device."""

    def __init__(
        self,
        judge=None,
        features: str | None = None,
        clip=None,
        eval_rewards: dict | None = None,
        cmmd_clip=None,
        ensemble=None,
    ):
        super().__init__()
        self.ensemble = ensemble
        self.judge, self.clip, self.features = judge, clip, features  # judge: testbed.judge.Judge; clip: CLIPSimilarity
        self.cmmd_clip = cmmd_clip
        self.eval_rewards = nn.ModuleDict(eval_rewards or {})

    @torch.no_grad()
    def embed(self, images: Tensor, model=None) -> Tensor | None:
        """Normalised embeddings of the configured features (or of the CLIP `model`), in chunks."""
        if model is None and self.features is None:
            return None
        if model is None and self.features == "clip":
            model = self.clip
        embed = self.judge.features if model is None else model.image_embeds
        chunks = [images[i : i + FEATURE_BATCH].to(self._device(images)) for i in range(0, len(images), FEATURE_BATCH)]
        return torch.cat([F.normalize(embed(c.float()).float(), dim=-1) for c in chunks])

    @torch.no_grad()
    def detector_embed(self, images: Tensor) -> Tensor:
        """The embeddings the hacking monitor's diversity signal reads: CLIP's where the features are CLIP's, else
        the images' own pixels at 16×16 (normalised). Never the testbed judge's: the detector must not read the
        truth it is scored against."""
        if self.features == "clip":
            return self.embed(images)
        small = F.interpolate(images.float(), size=(16, 16), mode="area", antialias=False)
        return F.normalize(small.flatten(1), dim=-1)

    def _device(self, images: Tensor) -> torch.device:
        parameter = next(self.parameters(), None)
        return images.device if parameter is None else parameter.device

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: list[str], base: Tensor | None = None) -> list[dict[str, float]]:
        """See `measure`; whatever a metric raises becomes an ItemError (the items it concerns fail, not the run)."""
        with item_work("a metric"):
            return self.measure(images, prompts, base)

    def measure(self, images: Tensor, prompts: list[str], base: Tensor | None = None) -> list[dict[str, float]]:
        """One record per image (image i was prompted with `prompts[i]`; `base[i]` is its base image): `drift_rmse`
        (pixel RMSE to the base), `drift_embedding` (1 − cos of the embeddings), `clipscore` (100·cos(image,
        prompt), clamped at 0), `eval_<name>`, an ensemble's `member_<label>` and `disagreement`, and for shapes-world
        prompts `adherence` (judge: colour and shape both right), `judge_log_prob`, `gold` and its factors
        (`gold_match`, `gold_quality`, `gold_clean`, and the `gold_residual` clean is computed from). Every value of
        an image depends on that image alone, never on its batch."""
        columns = {}
        if base is not None:
            columns["drift_rmse"] = (images - base).flatten(1).square().mean(1).sqrt()
            if self.features is not None:
                columns["drift_embedding"] = 1 - (self.embed(images) * self.embed(base)).sum(-1)
        on_device = images.to(self._device(images))
        if self.clip is not None:
            columns["clipscore"] = self.clip(on_device, prompts).clamp_min(0)
        for name, reward in self.eval_rewards.items():
            columns[f"eval_{name}"] = reward(on_device, prompts)
            if not torch.isfinite(columns[f"eval_{name}"]).all():  # cannot be averaged or ranked: the items fail
                raise ValueError(f"held-out reward {name} returned a non-finite score")
        if self.ensemble is not None:
            columns |= self.ensemble.details(on_device, prompts)
        columns = {key: column.tolist() for key, column in columns.items()}  # one device sync per metric
        records = [{key: column[i] for key, column in columns.items()} for i in range(len(images))]
        captions = [i for i, prompt in enumerate(prompts) if self.judge is not None and is_caption(prompt)]
        if captions:
            shown, named = on_device[captions].float(), [prompts[i] for i in captions]
            log_prob, correct = judge_log_prob(self.judge, shown, named)
            truth = {(k if k == "gold" else f"gold_{k}"): v.tolist() for k, v in parts(fit_scene(shown), named).items()}
            for j, (i, lp, right) in enumerate(zip(captions, log_prob.tolist(), correct.tolist())):
                records[i] |= {"adherence": right, "judge_log_prob": lp} | {k: v[j] for k, v in truth.items()}
        return records

    def set_metrics(self, records: list[ItemRecord], load_image) -> dict[str, float]:
        """Run-level metrics of finished items (records as the store writes them; `load_image(record, kind)`).
        Set statistics need embeddings and at least 2 items; diversity needs 2 seeds of a prompt."""
        out = {}
        if len(records) >= 1:
            out["win_rate_vs_base"] = dict(
                zip(
                    ("rate", "low", "high"),
                    win_rate(
                        [r.final_reward for r in records],
                        [r.base_reward for r in records],
                        [r.prompt_index for r in records],
                    ),
                )
            )
        if self.features is None or len(records) < 2:
            return out
        images = {kind: torch.stack([load_image(r, kind) for r in records]) for kind in ("base", "final")}
        base, final = (self.embed(images[kind]).cpu() for kind in ("base", "final"))
        if self.features == "judge":
            out["cmmd_judge"] = cmmd(final, base)
        elif self.cmmd_clip is not None:
            out["cmmd"] = cmmd(*(self.embed(images[kind], self.cmmd_clip).cpu() for kind in ("final", "base")))
        out |= {
            "spectral_distance": spectral_distance(base, final),
            "log_spectral_distance": log_spectral_distance(base, final),
        }
        by_prompt = defaultdict(list)
        for i, r in enumerate(records):
            by_prompt[r.prompt_index].append(i)
        groups = [rows for rows in by_prompt.values() if len(rows) >= 2]
        for name, embeds in (("base", base), ("final", final)):
            if groups:
                out[f"{name}_diversity_pairwise"] = sum(mean_pairwise_distance(embeds[g]) for g in groups) / len(groups)
                out[f"{name}_diversity_vendi"] = sum(vendi_score(embeds[g]) for g in groups) / len(groups)
        return out


def resolve_features(eval_cfg, model_cfg) -> str:
    """`eval.features`, with auto meaning the judge on the testbed, CLIP on real models and none on random-weight
    models, tiny or full-size (whose images carry no meaning)."""
    features = eval_cfg.features
    if features == "auto":
        features = "judge" if eval_cfg.adherence else "none" if model_cfg.tiny or model_cfg.random_weights else "clip"
    return features


def build_metrics(eval_cfg, model_cfg, reward=None) -> ImageMetrics:
    """The metrics `eval` asks for, and the members of the optimised `reward` if it is an ensemble."""
    from framework.config.rewards import RewardConfig
    from framework.core.errors import FrameworkError
    from framework.rewards import build_reward, load_named_reward
    from framework.rewards.ensemble import EnsembleReward
    from framework.testbed.judge import load_judge

    features = resolve_features(eval_cfg, model_cfg)
    judge = load_judge() if eval_cfg.adherence or features == "judge" else None

    def clip_model(source: str, key: str, alternative: str):
        tiny = source == "tiny"
        try:
            return build_reward(RewardConfig(name="clipscore", source=None if tiny else source, tiny=tiny))
        except FrameworkError as e:  # name the key the user sets here
            raise FrameworkError(str(e).replace("reward.source", key) + f" (or {alternative})") from None

    clip = cmmd_clip = None
    if features == "clip":  # CLIP embeddings, and CLIPScore adherence from the same model
        clip = clip_model(eval_cfg.clip, "eval.clip", "eval.features=none")
        if eval_cfg.cmmd_clip != "none":
            cmmd_clip = clip_model(eval_cfg.cmmd_clip, "eval.cmmd_clip", "eval.cmmd_clip=none")

    def held_out(name: str):
        if name != "remote":
            return load_named_reward(name)
        try:  # eval.rewards=[remote]: its server is eval.remote_url's
            return load_named_reward(name, url=eval_cfg.remote_url)
        except FrameworkError as e:
            raise FrameworkError(str(e).replace("reward.url", "eval.remote_url")) from None

    rewards = {name: held_out(name) for name in eval_cfg.rewards}
    ensemble = reward if isinstance(reward, EnsembleReward) else None
    return ImageMetrics(judge, None if features == "none" else features, clip, rewards, cmmd_clip, ensemble)
