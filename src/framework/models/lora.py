"""LoRA adapters on the denoiser (the UNet, or a flow model's transformer) through peft (diffusers' PEFT
integration): attach, save and load in diffusers' own format (`pytorch_lora_weights.safetensors`, loadable with the
pipelines' `load_lora_weights`), switch off to get the base model from the same weights, and scale.

Switching adapters off (rather than keeping a frozen copy of the denoiser) is what makes DRaFT+KL's base prediction
and AIG's base branch free in memory.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

# Attention projections and feed-forward linears of every transformer block (SD1.x and SDXL share the names).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
# SD3's and FLUX's joint blocks add the text stream's projections and MLP; FLUX's single-stream blocks fuse their
# MLP into proj_mlp/proj_out (a regex, so that the transformer's final proj_out is left alone).
TRANSFORMER_TARGETS = (
    r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2)"
    r"|.*single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
)
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(denoiser: nn.Module, rank: int, alpha: float | None = None, seed: int = 0) -> list[nn.Parameter]:
    """Attach a fresh adapter (B = 0, so the model is unchanged; A random from `seed`, so every process and every
    rerun starts from the same adapter) and return its trainable parameters."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    targets = UNET_TARGETS if isinstance(denoiser, UNet2DConditionModel) else TRANSFORMER_TARGETS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True)
        )
    trainable = []
    for name, parameter in denoiser.named_parameters():
        parameter.requires_grad_("lora_" in name)
        if "lora_" in name:
            trainable.append(parameter)
    return trainable


def save_lora(backbone, directory: Path) -> Path:
    """The denoiser's adapter as the backbone's diffusers pipeline saves and loads LoRAs
    (`pipe.load_lora_weights(directory)`): keys under `unet.` (SD1.x, SDXL) or `transformer.` (SD3, FLUX), with the
    adapter's rank and alpha in the file's metadata."""
    from peft.utils import get_peft_model_state_dict

    denoiser, prefix = backbone.denoiser, lora_prefix(backbone.denoiser)
    type(backbone.pipe).save_lora_weights(
        str(directory),
        weight_name=WEIGHT_NAME,
        **{
            f"{prefix}_lora_layers": get_peft_model_state_dict(denoiser, adapter_name="default"),
            f"{prefix}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict(),
        },
    )
    return Path(directory) / WEIGHT_NAME


def lora_prefix(denoiser: nn.Module) -> str:
    from diffusers import UNet2DConditionModel

    return "unet" if isinstance(denoiser, UNet2DConditionModel) else "transformer"


def load_lora(denoiser: nn.Module, directory: str | Path) -> None:
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
    prefix = lora_prefix(denoiser)
    with safe_open(path / WEIGHT_NAME, framework="pt") as f:
        prefixed = any(key.startswith(f"{prefix}.") for key in f.keys())
    denoiser.load_lora_adapter(
        str(path), prefix=prefix if prefixed else None, weight_name=WEIGHT_NAME, adapter_name="default"
    )


def set_lora_scale(denoiser: nn.Module, scale: float) -> None:
    """W = W0 + scale·(α/r)·BA for the loaded adapter (0 = base, 1 = as trained)."""
    denoiser.set_adapters(["default"], weights=[scale])


@contextmanager
def adapters_disabled(denoiser: nn.Module):
    """The base model: the same denoiser with its adapters switched off, restored on exit."""
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()
