"""Memory and FLOPs of the full-size path on the meta device: every tensor a step creates has its shape, dtype and
size, but nothing is computed and no weight exists, so SDXL at 1024² is accounted on any laptop in seconds.

Peak tensor memory is what CUDA's `max_memory_allocated` counts, less its block rounding (512 B) and the kernels'
workspaces (cuBLAS, cuDNN: tens of MiB). torch's own MemTracker would do this accounting but registers gradient
hooks on every parameter, which frozen networks refuse; the tracker here is the same idea in a few lines.
"""

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import framework  # noqa: F401  (torchvision workaround)
from framework.config import ModelConfig
from framework.config.methods import GRPOConfig, MIRAConfig
from framework.config.rewards import RewardConfig
from framework.methods import Item, Problem
from framework.methods.grpo import GRPO, Rollout
from framework.models import Cond, load_backbone
from framework.models.qwen_image import QwenImageBackbone
from framework.models.sampling import trajectory_divergence
from framework.rewards import build_reward

GiB = 2**30
PROMPT = "a photograph of an astronaut riding a horse"
LLM_CONDITIONED = ("qwen_image", "flux2")  # their text encoders cannot run on the meta device


class TensorMemory(TorchDispatchMode):
    """Bytes of live tensor storage created inside the context, and their peak. A storage counts from the op that
    creates it until its last user (a view, autograd's saved tensors) is gone, which the storage's Python object
    (kept alive exactly that long by PyTorch) reports through a finaliser."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output that shares an input's storage (a view, an in-place result) allocates nothing: without this, a
        # view of a weight (linear's transposed weight, saved for backward) would count as new memory
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage._cdata not in self.live and storage._cdata not in inputs:
                    self.live[storage._cdata] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, storage._cdata)
        self.peak = max(self.peak, self.current)
        return out


@contextlib.contextmanager
def fused_attention():
    """SDPA as CUDA runs it (a fused kernel that keeps its output and log-sum-exp for backward, never the attention
    matrix), where the meta device would take the math path. Swapped in as `F.scaled_dot_product_attention`, which
    diffusers looks up at each call, so checkpoint recomputation sees it too."""
    sdpa = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or enable_gqa:
            return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def meta_problem(kind: str, resolution: int, batch: int, num_steps: int, **options) -> Problem:
    """A MIRA problem of `batch` items on the full-size model of `kind` and HPS's ViT-H-14, all in bfloat16 (the
    VAE as the pipelines keep it), on the meta device."""
    with torch.device("meta"):
        model = ModelConfig(kind=kind, random_weights=True, resolution=resolution, dtype="bfloat16", **options)
        backbone = load_backbone(model)
        reward = build_reward(RewardConfig(name="hps", random_weights=True, dtype="bfloat16"))
    backbone.scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)  # tables must hold values
    if kind in LLM_CONDITIONED:
        stand_in_encodings(backbone, PROMPT)
    cfg = MIRAConfig(num_steps=num_steps, beta=1.0)
    return Problem(backbone, reward, [Item(i, 0, PROMPT, i) for i in range(batch)], cfg)


def stand_in_encodings(backbone, prompt: str) -> None:
    """Qwen-Image's and FLUX.2's LLM encoders read values in their forward (masks, rotary positions), which the meta
    device does not have: their offloaded state (`model.offload_text_encoder=true`) is set directly instead, the
    prompt's encodings as zeros of the shapes their pipelines give, the encoders dropped."""
    pipe, width = backbone.pipe, backbone.transformer.config.joint_attention_dim
    zeros = lambda length: torch.zeros(1, length, width, device="meta", dtype=backbone.transformer.dtype)  # noqa: E731
    if isinstance(backbone, QwenImageBackbone):  # the prompt's own tokens after the template's, and the negative's
        template, dropped = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
        length = lambda text: len(pipe.tokenizer(template.format(text)).input_ids) - dropped  # noqa: E731
        cond = Cond(zeros(length(prompt)), zeros(length(backbone.NEGATIVE_PROMPT)))
    else:  # FLUX.2-dev: padded to max_sequence_length, no negative branch
        cond = Cond(zeros(backbone.max_sequence_length))
    backbone.use_encodings(cond, [prompt])


def text_encoder_bytes(kind: str) -> int:
    """Bytes of a full-size model's text encoders in bfloat16: what offloading them keeps off the device."""
    with torch.device("meta"):
        backbone = load_backbone(ModelConfig(kind=kind, random_weights=True, dtype="bfloat16"))
    return sum(p.numel() * p.element_size() for p in backbone.text_encoders.parameters())


def weight_bytes(problem: Problem) -> int:
    return sum(p.numel() * p.element_size() for m in (problem.backbone, problem.reward) for p in m.parameters())


def mira_step(problem: Problem, reference: list, checkpoint: bool = True) -> None:
    """One MIRA optimisation step's forward and backward against the `reference` ε̂ (the optimiser's update of the
    noise is negligible)."""
    x_T, noises = problem.noise()
    x_T.requires_grad_(), noises.requires_grad_()
    with torch.enable_grad():
        images, traj = problem.render(x_T, noises, checkpoint=checkpoint)
        loss = (
            -problem.score(images).sum()
            + problem.sampling.beta * trajectory_divergence(traj.predictions, reference).sum()
        )
        loss.backward()


def peak_step_memory(problem: Problem, checkpoint: bool = True) -> int:
    """Peak bytes of one MIRA step on top of the weights. Its reference ε̂ are a no-grad sample's (at step 0 MIRA
    takes them from the step's own pass), run before, outside the count."""
    x_T, noises = problem.noise()
    with torch.no_grad():
        reference = [eps.detach() for eps in problem.render(x_T, noises)[1].predictions]
    with fused_attention(), TensorMemory() as memory:
        mira_step(problem, reference, checkpoint)
    return memory.peak


def peak_grpo_update_memory(problem: Problem, rollout_steps: int = 10, lora_rank: int = 8) -> int:
    """Peak bytes of one GRPO update (framework.methods.grpo, Flow-GRPO's defaults: CFG, the first 9 of 10 rollout
    steps trained, each checkpointed, the KL's adapter-free forward) of the problem's batch on top of the weights:
    the loss over every trained step and its one backward. The rollout that recorded x_t and log π_old ran before,
    without gradients; its latents (a few MiB) and the adapter's AdamW state (two copies of a rank-8 LoRA) are not
    counted."""
    cfg = GRPOConfig(rollout_steps=rollout_steps, lora_rank=lora_rank, guidance_scale=5.0)
    module = GRPO(problem.backbone, problem.reward, cfg, [PROMPT], 0, "unused")
    x_T, _ = problem.noise()
    trained, steps, batch = module.trained_steps(0), module.steps(0), len(x_T)
    zeros = torch.zeros(batch, device=x_T.device)
    recorded = [x_T] * len(trained)
    rollout = Rollout(problem.cond, recorded, recorded, [zeros] * len(trained), zeros, zeros + 1)
    with fused_attention(), TensorMemory() as memory, torch.enable_grad():
        loss = torch.stack([module.step_loss(rollout, j, steps[i])[0] for j, i in enumerate(trained)]).mean()
        loss.backward()
    return memory.peak


def flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def sample_and_step_flops(kind: str, resolution: int, num_steps: int) -> tuple[float, float]:
    """(FLOPs of a plain sample, model FLOPs of a MIRA step: forward and backward, recomputation not counted) at
    batch 1 and `num_steps` steps. Both are affine in the step count, so two short counts give them exactly."""
    per_steps = {}
    for steps in (1, 2):
        problem = meta_problem(kind, resolution, 1, steps)
        x_T, noises = problem.noise()
        sample = flops(torch.no_grad()(lambda: problem.score(problem.render(x_T, noises)[0])))
        step = flops(lambda: mira_step(problem, [torch.zeros_like(x_T)] * steps, checkpoint=False))
        per_steps[steps] = (sample, step)
    return tuple(one + (num_steps - 1) * (two - one) for one, two in zip(per_steps[1], per_steps[2]))
