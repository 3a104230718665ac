"""LoRA adapters on the denoiser (the UNet, or a flow model's transformer) through peft (diffusers' PEFT
integration): attach, save and load in diffusers' own format (`pytorch_lora_weights.safetensors`, loadable with the
pipelines' `load_lora_weights`), switch off to get the base model from the same weights, and scale.

Switching adapters off (rather than keeping a frozen copy of the denoiser) is what makes DRaFT+KL's base prediction
and AIG's base branch free in memory.
"""

import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from framework.config.methods import WEIGHT_NAME


def add_lora(denoiser: nn.Module, targets, rank: int, alpha: float | None = None, seed: int = 0) -> list[nn.Parameter]:
    """Attach a fresh adapter on `targets` (peft's target_modules: the family's `lora_targets`, B = 0, so the model
    is unchanged; A random from `seed`, so every process and every rerun starts from the same adapter) and return
    its trainable parameters."""
    from peft import LoraConfig

    targets = list(targets) if isinstance(targets, tuple) else targets
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
    (`pipe.load_lora_weights(directory)`): keys under `unet.` (SD1.x, SDXL) or `transformer.` (the flow models), with
    the adapter's rank and alpha in the file's metadata."""
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


def restore_lora(denoiser: nn.Module, directory: Path) -> None:
    """Set the denoiser's attached adapter, in place, to the weights `save_lora` wrote to `directory` (e.g. an
    earlier checkpoint of the adapter being trained)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    prefix = f"{lora_prefix(denoiser)}."
    state = {key.removeprefix(prefix): value for key, value in load_file(Path(directory) / WEIGHT_NAME).items()}
    set_peft_model_state_dict(denoiser, state, adapter_name="default")


def lora_prefix(denoiser: nn.Module) -> str:
    from diffusers import UNet2DConditionModel

    return "unet" if isinstance(denoiser, UNet2DConditionModel) else "transformer"


def load_lora(denoiser: nn.Module, directory: str | Path) -> None:
    """Load an adapter in the pipelines' format (`save_lora`, or a LoRA trained elsewhere and saved with diffusers'
    `save_lora_weights`) or in the bare UNet format of `unet.save_lora_adapter`; safetensors only. The file is checked
    against the denoiser first (`check_adapter`), so a wrong file is one line naming it, before any sampling."""
    from framework.core.errors import FrameworkError, first_line

    path, prefixed = check_adapter(denoiser, directory)
    try:
        denoiser.load_lora_adapter(
            str(path.parent),
            prefix=lora_prefix(denoiser) if prefixed else None,
            weight_name=WEIGHT_NAME,
            adapter_name="default",
        )
    except (RuntimeError, ValueError, KeyError) as e:  # what the checks above did not foresee, still one line
        raise FrameworkError(f"method.adapter: {path}: cannot be loaded into this model: {first_line(e)}") from None


LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<half>A|B)\.weight")


def check_adapter(denoiser: nn.Module, directory: str | Path) -> tuple[Path, bool]:
    """The adapter file of `directory` and whether its keys carry the pipeline prefix (`unet.`/`transformer.`), after
    checking that it is a complete safetensors file of peft LoRA pairs (`<module>.lora_A.weight` [r, in] and
    `.lora_B.weight` [out, r]) whose every module is a layer of this denoiser with those sizes. Anything else is a
    FrameworkError naming the file and what is wrong (missing, truncated, another format, another model)."""
    from safetensors import SafetensorError, safe_open

    from framework.core.errors import FrameworkError, first_line

    path = Path(directory).expanduser() / WEIGHT_NAME

    def wrong(why: str) -> FrameworkError:
        return FrameworkError(f"method.adapter: {path}: {why}")

    if not path.is_file():
        raise wrong(
            "not found; train an adapter with method=draft (its run directory holds adapter/) or point to a diffusers "
            "LoRA directory"
        )
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise wrong(f"not a complete safetensors file ({first_line(e)}); copy it again or re-save it") from None
    if not shapes:
        raise wrong("holds no tensors")
    prefix, family = lora_prefix(denoiser), type(denoiser).__name__
    for other in {"unet", "transformer"} - {prefix}:
        if any(key.startswith(f"{other}.") for key in shapes):
            raise wrong(f"an adapter for a model with a {other}, not for this model's {family}")
    prefixed = any(key.startswith(f"{prefix}.") for key in shapes)
    pairs: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        match = LORA_KEY.fullmatch(key.removeprefix(f"{prefix}.") if prefixed else key)
        if match is None:
            raise wrong(
                f"key {key!r} is not a LoRA weight in diffusers' format (<module>.lora_A.weight, .lora_B.weight)"
            )
        pairs.setdefault(match["module"], {})[match["half"]] = shape
    modules = dict(denoiser.named_modules())
    for name, halves in pairs.items():
        layer = modules.get(name)
        sizes = layer_sizes(layer)
        if sizes is None:
            raise wrong(f"module {name!r} is not a layer of this model's {family} (an adapter for another model?)")
        if set(halves) != {"A", "B"}:
            raise wrong(f"module {name!r} has lora_{next(iter(halves))} without its other half")
        (rank, fan_in), (fan_out, rank_b) = halves["A"][:2], halves["B"][:2]
        if rank != rank_b:
            raise wrong(f"module {name!r}: lora_A has rank {rank}, lora_B rank {rank_b}")
        if (fan_in, fan_out) != sizes:
            raise wrong(
                f"module {name!r} maps {fan_in} → {fan_out} features in the adapter, {sizes[0]} → {sizes[1]} in "
                f"this model's {family} (an adapter for another model?)"
            )
    return path, prefixed


def layer_sizes(layer: nn.Module | None) -> tuple[int, int] | None:
    """(inputs, outputs) of a layer LoRA can adapt: a linear layer's features, a convolution's channels."""
    for fan_in, fan_out in (("in_features", "out_features"), ("in_channels", "out_channels")):
        if hasattr(layer, fan_in):
            return getattr(layer, fan_in), getattr(layer, fan_out)
    return None


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
