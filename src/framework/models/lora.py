"""LoRA adapters on the UNet through peft (diffusers' PEFT integration): attach, save and load in diffusers' own
format (`pytorch_lora_weights.safetensors`), switch off to get the base model from the same weights, and scale.

Switching adapters off (rather than keeping a frozen copy of the UNet) is what makes DRaFT+KL's base prediction
and AIG's base branch free in memory.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

# Attention projections and feed-forward linears of every transformer block (SD1.x and SDXL share the names).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None, seed: int = 0) -> list[nn.Parameter]:
    """Attach a fresh adapter (B = 0, so the model is unchanged; A random from `seed`, so every process and every
    rerun starts from the same adapter) and return its trainable parameters."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=LORA_TARGETS, init_lora_weights=True)
        )
    trainable = []
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_("lora_" in name)
        if "lora_" in name:
            trainable.append(parameter)
    return trainable


def save_lora(unet: nn.Module, directory: Path) -> Path:
    """The adapter as diffusers' pipelines save and load LoRAs (`pipe.load_lora_weights(directory)`): keys under
    `unet.`, with the adapter's rank and alpha in the file's metadata (the same format for SD1.x and SDXL)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(
        str(directory),
        unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="default"),
        weight_name=WEIGHT_NAME,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return Path(directory) / WEIGHT_NAME


def load_lora(unet: nn.Module, directory: str | Path) -> None:
    """Load an adapter in the pipelines' format (`save_lora`, or a LoRA trained elsewhere and saved with diffusers'
    `save_lora_weights`) or in the bare UNet format of `unet.save_lora_adapter`; safetensors only."""
    from safetensors import safe_open

    from framework.errors import FrameworkError

    path = Path(directory)
    if not (path / WEIGHT_NAME).is_file():
        raise FrameworkError(
            f"method.adapter: no LoRA weights at '{path / WEIGHT_NAME}'; train one with "
            "method=draft (its run directory holds adapter/) or point to a diffusers LoRA directory"
        )
    with safe_open(path / WEIGHT_NAME, framework="pt") as f:
        prefixed = any(key.startswith("unet.") for key in f.keys())
    unet.load_lora_adapter(
        str(path), prefix="unet" if prefixed else None, weight_name=WEIGHT_NAME, adapter_name="default"
    )


def set_lora_scale(unet: nn.Module, scale: float) -> None:
    """W = W0 + scale·(α/r)·BA for the loaded adapter (0 = base, 1 = as trained)."""
    unet.set_adapters(["default"], weights=[scale])


@contextmanager
def adapters_disabled(unet: nn.Module):
    """The base model: the same UNet with its adapters switched off, restored on exit."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
