"""Golden reward values: each reward's score of the shipped images (tests/golden/images) computed with its
official implementation, written to tests/golden/values.json for tests/test_golden.py to compare ours against.

Run it on a machine with the weights and the official packages (network allowed there), then commit values.json:

    pip install image-reward hpsv2 hpsv3 git+https://github.com/openai/CLIP.git   # the official code
    python tests/golden/compute.py [--device cuda] [--only hps_v2.1 imagereward ...]

Each reward is computed as its authors' code computes it (the lines below follow their READMEs); a reward whose
package or weights are missing is skipped with the reason, and the others are still written. Nothing here imports
the framework: a golden value must not come from the code it checks.
"""

import argparse
import hashlib
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from PIL import Image

HERE = Path(__file__).parent
VALUES = HERE / "values.json"


AESTHETIC_MLP = Path("weights/sac+logos+ava1-l14-linearMSE.pth")  # from the improved-aesthetic-predictor repository


def aesthetic(paths, prompts, device):
    """improved-aesthetic-predictor's simple_inference.py: OpenAI CLIP ViT-L/14 image features, L2-normalised, then
    the five affine maps of sac+logos+ava1-l14-linearMSE.pth (its MLP has no activations)."""
    import clip  # OpenAI's package

    model, preprocess = clip.load("ViT-L/14", device=device)
    state = torch.load(AESTHETIC_MLP, map_location=device, weights_only=True)
    scores = []
    for image_path in paths:
        with torch.no_grad():
            features = model.encode_image(preprocess(Image.open(image_path)).unsqueeze(0).to(device)).float()
            h = features / features.norm(dim=-1, keepdim=True)
            for i in (0, 2, 4, 6, 7):
                h = torch.nn.functional.linear(h, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
        scores.append(h.item())
    return scores, f"clip (OpenAI) ViT-L/14 + {AESTHETIC_MLP.name}, simple_inference.py"


def hps(hps_version):
    def score(paths, prompts, device):
        import hpsv2

        scores = [hpsv2.score([str(p)], prompt, hps_version=hps_version)[0] for p, prompt in zip(paths, prompts)]
        return [
            100 * float(s) for s in scores
        ], f"hpsv2=={version('hpsv2')} hpsv2.score(hps_version={hps_version!r}) × 100"

    return score


def pickscore(paths, prompts, device):
    """PickScore's README: logit_scale.exp() · cos of PickScore_v1's embeddings, laion/CLIP-ViT-H-14's processor."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    model = AutoModel.from_pretrained("yuvalkirstain/PickScore_v1").eval().to(device)
    scores = []
    for path, prompt in zip(paths, prompts):
        image = processor(images=Image.open(path), return_tensors="pt").to(device)
        text = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        with torch.no_grad():
            i = model.get_image_features(**image)
            t = model.get_text_features(**text)
            i, t = (getattr(x, "pooler_output", x) for x in (i, t))
            i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
            scores.append((model.logit_scale.exp() * (i * t).sum()).item())
    return scores, f"transformers=={version('transformers')}, PickScore README"


def clipscore(paths, prompts, device):
    """torchmetrics' CLIPScore on openai/clip-vit-large-patch14: max(100 · cos, 0)."""
    import numpy as np
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path="openai/clip-vit-large-patch14").to(device)
    scores = []
    for path, prompt in zip(paths, prompts):
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).to(device)
        scores.append(metric(image, prompt).item())
        metric.reset()
    return scores, f"torchmetrics=={version('torchmetrics')} CLIPScore"


def imagereward(paths, prompts, device):
    import ImageReward as RM

    model = RM.load("ImageReward-v1.0", device=device)
    with torch.no_grad():
        return [float(model.score(prompt, str(path))) for path, prompt in zip(paths, prompts)], (
            f"image-reward=={version('image-reward')} ImageReward.load('ImageReward-v1.0').score"
        )


def hpsv3(paths, prompts, device):
    from hpsv3 import HPSv3RewardInferencer

    inferencer = HPSv3RewardInferencer(device=device)
    with torch.no_grad():
        rewards = inferencer.reward(prompts=prompts, image_paths=[str(p) for p in paths])
    return [r[0].item() for r in rewards], f"hpsv3=={version('hpsv3')} HPSv3RewardInferencer.reward (μ)"


REWARDS = {
    "aesthetic": aesthetic,
    "hps_v2.0": hps("v2.0"),
    "hps_v2.1": hps("v2.1"),
    "pickscore": pickscore,
    "clipscore": clipscore,
    "imagereward": imagereward,
    "hpsv3": hpsv3,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", choices=sorted(REWARDS), default=sorted(REWARDS))
    args = parser.parse_args()
    golden = json.loads(VALUES.read_text())
    names = sorted(golden["images"])
    for name in names:  # the values belong to these exact files
        digest = hashlib.sha256((HERE / "images" / name).read_bytes()).hexdigest()
        if digest != golden["images"][name]["sha256"]:
            sys.exit(f"images/{name} is not the image values.json describes (sha256 {digest})")
    paths = [HERE / "images" / name for name in names]
    prompts = [golden["images"][name]["prompt"] for name in names]
    for reward in args.only:
        try:
            scores, source = REWARDS[reward](paths, prompts, args.device)
        except (ImportError, PackageNotFoundError, OSError) as e:
            print(f"{reward}: skipped ({type(e).__name__}: {e})")
            continue
        golden["values"][reward] = {"source": source, "scores": dict(zip(names, scores))}
        print(f"{reward}: {dict(zip(names, scores))}")
    VALUES.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
