"""The testbed's proxy rewards: small image–text networks fit by Bradley–Terry to noisy pairwise comparisons that
the gold reward labels (`python -m framework.tools.train_proxy`), as HPSv2 and PickScore are fit to human
comparisons. They agree with gold near the images they were trained on and err away from them, which is what
over-optimisation exploits. `reward=proxy reward.comparisons=1000|4000|16000` picks a shipped one."""

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from framework.rewards.base import Reward
from framework.testbed import MODEL_DIR
from framework.testbed.shapes import SIZE

TEXT_DIM = 32  # the testbed text encoder's width


class ProxyNet(nn.Module):
    """Score of 32×32 images in [0, 1] given the prompt's text features: a CNN over the image and two coordinate
    channels (so position is visible after pooling), gated by a projection of the text features, then a head."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(5, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.text = nn.Linear(TEXT_DIM, width)
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, images: Tensor, text: Tensor) -> Tensor:
        if images.shape[-1] != SIZE:
            images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        line = torch.linspace(-1, 1, SIZE, device=images.device, dtype=images.dtype)
        y, x = torch.meshgrid(line, line, indexing="ij")
        coords = torch.stack([x, y]).expand(len(images), 2, SIZE, SIZE)
        features = self.image(torch.cat([images, coords], 1))
        return self.head(torch.cat([features, features * self.text(text)], 1)).squeeze(1)


class TextFeatures(nn.Module):
    """The testbed text encoder's pooled output (frozen), as HPS and PickScore start from CLIP's text tower."""

    def __init__(self, model_dir=MODEL_DIR):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizerFast

        self.tokenizer = CLIPTokenizerFast.from_pretrained(model_dir / "tokenizer")
        self.encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32)
        self.encoder.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor:
        device = self.encoder.device
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        return self.encoder(tokens.to(device)).pooler_output.float()


class ProxyReward(Reward):
    """A trained proxy's score of each image for its prompt (differentiable)."""

    def __init__(self, net: ProxyNet, text: TextFeatures):
        super().__init__()
        self.net, self.text = net.requires_grad_(False).eval(), text

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.net(images.float(), self.text(prompts))


def load_proxy(path) -> ProxyReward:
    """The proxy reward of a file `train_proxy` wrote; a missing, corrupt or foreign file is one clear error."""
    from safetensors import SafetensorError

    from framework.core.errors import FrameworkError, first_line

    if not path.is_file():
        raise FrameworkError(
            f"proxy reward '{path}' not found; rebuild the shipped ones with `python -m framework.tools.train_proxy` "
            "(the ensemble's members: `--comparisons --members 5`)"
        )
    net, why = ProxyNet(), None
    try:
        missing, unexpected = net.load_state_dict(load_file(path), strict=False)
        if missing or unexpected:
            why = f"{len(missing)} of its weights missing (e.g. {missing[:1]}), {len(unexpected)} unexpected"
    except (SafetensorError, OSError) as e:
        why = f"not a safetensors file ({first_line(e)})"
    except RuntimeError as e:  # the keys are a proxy's, a shape is not
        why = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), first_line(e))
    if why:
        raise FrameworkError(f"'{path}' is not a proxy reward written by framework.tools.train_proxy: {why}")
    return ProxyReward(net, TextFeatures())
