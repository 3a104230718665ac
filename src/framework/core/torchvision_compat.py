"""Keep torchvision importable when its compiled operator library cannot load.

PyPI only ships CUDA builds of torchvision. On a CPU-only torch, `torchvision/_C.so` fails to load, and
`torchvision._meta_registrations` then registers fake kernels for `torchvision::nms`/`qnms`, operators that were
never defined, so `import torchvision` raises. transformers, diffusers, lightning (via torchmetrics), peft and
open_clip all import torchvision when it is installed, so one broken import breaks the whole stack.

The fix defines just those two operator schemas before torchvision is first imported. We only use torchvision's
transforms and model code, never `torchvision.ops`/`io` kernels, which stay unavailable. On a machine whose
torchvision library loads (any matching CUDA or CPU build), this is a no-op.
"""

import glob
import importlib.util
import os
import sys

import torch

_library = None  # kept alive for the life of the process: dropping it would unregister the schemas


def ensure_torchvision_importable() -> None:
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    compiled = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C.*"))
    try:
        if compiled:
            torch.ops.load_library(compiled[0])
            return
    except OSError:
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        _library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
