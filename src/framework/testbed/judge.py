"""The ground-truth judge: a small CNN trained on the generator's labels, predicting colour and shape."""

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from framework.testbed import JUDGE_FILE
from framework.testbed.shapes import COLORS, SHAPES


class Judge(nn.Module):
    """Logits of colour (first len(COLORS)) and shape (last len(SHAPES)) of 32×32 images in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, len(COLORS) + len(SHAPES)),
        )

    def features(self, images: Tensor) -> Tensor:
        """The 64-d penultimate activations: the testbed's image embedding for drift and diversity metrics."""
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.net[:-1](images)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.net[-1](self.features(images))
        return logits[:, : len(COLORS)], logits[:, len(COLORS) :]


def load_judge(path=JUDGE_FILE) -> Judge:
    from framework.core.errors import FrameworkError

    if not path.is_file():
        raise FrameworkError(
            f"testbed judge '{path}' not found; train it with `python -m framework.tools.train_testbed`"
        )
    judge = Judge()
    judge.load_state_dict(load_file(path))
    return judge.requires_grad_(False).eval()


def attribute_targets(prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Colour and shape indices named by each prompt; a prompt outside the shapes world is a clear error."""
    from framework.core.errors import FrameworkError
    from framework.testbed.shapes import parse_caption

    try:
        pairs = [parse_caption(p) for p in prompts]
    except ValueError as e:
        raise FrameworkError(f"the testbed judge only reads shapes-world prompts (prompts=shapes): {e}") from e
    return torch.tensor([c for c, _ in pairs]), torch.tensor([s for _, s in pairs])


def judge_log_prob(judge: Judge, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """log p(colour) + log p(shape) of the prompt's attributes, and whether both argmaxes are right."""
    colors, shapes_ = (t.to(images.device) for t in attribute_targets(prompts))
    color_logits, shape_logits = judge(images)
    rows = torch.arange(len(images), device=images.device)
    log_prob = color_logits.log_softmax(1)[rows, colors] + shape_logits.log_softmax(1)[rows, shapes_]
    correct = (color_logits.argmax(1) == colors) & (shape_logits.argmax(1) == shapes_)
    return log_prob, correct.float()
