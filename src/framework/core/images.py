"""Images on disk (or in memory, for a remote reward): tensors on the [0, 1] scale as 8-bit RGB PNG files, and back."""

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def save_png(image: Tensor, path: Path | BinaryIO, compress_level: int = 6) -> None:
    """`compress_level`: zlib's, 0-9 (PIL's default 6; 1 is several times faster for slightly larger files)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path, format="PNG", compress_level=compress_level)  # by content, not the suffix


def load_png(path: Path | BinaryIO | Image.Image) -> Tensor:
    image = path if isinstance(path, Image.Image) else Image.open(path)
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
