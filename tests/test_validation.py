"""Every config value is checked before anything loads: each field's rule, the rules across fields, and the CLI's
one-line errors with exit code 2 (no traceback)."""

import copy
import dataclasses
import functools
import math
import typing

import pytest
from conftest import compose, run_cli
from omegaconf import OmegaConf

from framework.config import (
    Config,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    MonitorConfig,
    PromptsConfig,
    TrainerConfig,
)
from framework.config.methods import METHODS
from framework.config.rewards import RewardConfig
from framework.core.errors import FrameworkError
from framework.core.validation import OneOf, Range, Text, validate

ADAPTER = ["method.adapter=some/adapter"]  # lora_scale and aig need one to compose a complete config
SCHEMAS = [
    (ModelConfig, "model", []),
    (RewardConfig, "reward", []),
    (PromptsConfig, "prompts", []),
    (TrainerConfig, "trainer", []),
    (LoggerConfig, "logger", []),
    (EvalConfig, "eval", []),
    (MonitorConfig, "monitor", ["method=draft"]),
    (Config, "", []),
]
SCHEMAS += [
    (schema, "method", [f"method={name}"] + (ADAPTER if "adapter" in schema.__dataclass_fields__ else []))
    for name, schema in METHODS.items()
]


def is_bool(field) -> bool:
    return field.type in (bool, bool | None)


def is_group(field) -> bool:
    return dataclasses.is_dataclass(field.type) or field.type is typing.Any


def outside(rule, field) -> list:
    """Values that `rule` must reject."""
    if isinstance(rule, OneOf):
        if field.type is int:  # e.g. reward.comparisons: the shipped proxies' sizes
            return [max(rule.names()) + 1]
        return [["not_an_option"] if "list" in str(field.type) else "not_an_option"]
    integer = field.type in (int, int | None)
    bad = []
    if rule.low is not None:
        bad.append(rule.low if rule.low_open else rule.low - 1)
    if rule.high is not None and not math.isinf(rule.high):
        bad.append(rule.high if rule.high_open else rule.high + 1)
    if rule.multiple_of:
        bad.append(rule.low + 1)
    if not integer:
        bad += [math.nan] + ([math.inf] if rule.high is None else [])
    return [int(v) if integer else float(v) for v in bad]


@functools.cache
def composed(base: tuple[str, ...]):
    return compose(*base)


CASES = [
    (prefix, base, field, rule)
    for schema, prefix, base in SCHEMAS
    for field in dataclasses.fields(schema)
    if not is_bool(field) and not is_group(field) and not isinstance(rule := field.metadata.get("rule"), Text)
]


def test_every_field_of_every_schema_declares_its_valid_values():
    for schema, _, _ in SCHEMAS:
        for field in dataclasses.fields(schema):
            if not (is_bool(field) or is_group(field)):
                assert isinstance(field.metadata.get("rule"), (Range, OneOf, Text)), f"{schema.__name__}.{field.name}"
    assert len(CASES) >= 60


@pytest.mark.parametrize(
    "prefix,base,field,rule", CASES, ids=[f"{b[0] if b else p or 'top'}.{f.name}" for p, b, f, _ in CASES]
)
def test_a_value_outside_each_rule_is_rejected_naming_key_value_and_what_is_valid(prefix, base, field, rule):
    key = f"{prefix}.{field.name}" if prefix else field.name
    for value in outside(rule, field):
        cfg = copy.deepcopy(composed(tuple(base)))
        OmegaConf.update(cfg, key, value)  # as the command line would set it (the CLI test below types them)
        with pytest.raises(FrameworkError) as error:
            validate(cfg)
        message = str(error.value)
        assert message.startswith(f"{key}=") and "is not valid; " in message and rule.describe() in message
        assert "\n" not in message


def test_boolean_fields_take_booleans_only():
    booleans = [
        (prefix, base, f.name) for schema, prefix, base in SCHEMAS for f in dataclasses.fields(schema) if is_bool(f)
    ]
    assert len(booleans) >= 8
    for prefix, base, name in booleans:
        with pytest.raises(Exception, match=name):
            compose(*base, f"{prefix}.{name}=maybe")


def test_the_defaults_and_every_shipped_option_are_valid():
    validate(compose())
    for name in ("tiny_sd", "tiny_sdxl", "sd15", "sdxl"):
        validate(compose(f"model={name}"))


RELATIONS = {
    "method.grad_steps": ["method=dno", "method.num_steps=10", "method.grad_steps=11"],
    "method.k": ["method=draft", "method.num_steps=5", "method.k=6"],
    "method.weighting": ["method=mira", "method.weighting=girsanov", "method.eta=0"],
    "method.weighting ": ["method=mira", "method.weighting=girsanov", "method.final_step_noise=false"],
    "method.train_batch_size": ["method=draft", "method.train_batch_size=4", "trainer.devices=3"],
    "model.dtype": ["method=draft", "model.dtype=float16"],
    "reward.name": ["method=dno", "reward=jpeg"],
    "reward.target": ["reward=callable"],
    "model.source": ["model=sd15", "model.source=null"],
    "model.max_sequence_length": ["model=sd15", "model.max_sequence_length=77"],  # SD reads no T5 tokens
    "model.max_sequence_length ": ["model=tiny_sd3", "model.max_sequence_length=600"],  # T5 ≤ 512; Qwen's LLM 1024
    "model.random_weights": ["model=tiny_flux2_klein", "model.tiny=false", "model.random_weights=true"],  # no arch
    "model.offload_text_encoder": ["model=sd15", "model.offload_text_encoder=true"],  # flow models only
    "prompts.path": ["prompts=file"],
    "prompts.prompts": ["prompts=inline", "prompts.prompts=[]"],
    "method.select": ["method=dno", "method.select=best_held_out"],  # no eval.rewards to choose with
    "method.select ": ["method=mira", "method.select=best_held_out", "eval.rewards=[judge]"],  # the judge only
    "method.held_out": ["method=dno", "method.held_out=contrast", "eval.rewards=[saturation]"],
    "method.held_out ": ["method=mira_dpo", "method.held_out=judge", "eval.rewards=[judge]"],
    "method.held_out  ": ["method=dno", "reward=contrast", "method.held_out=contrast", "eval.rewards=[contrast]"],
    "method.select  ": ["method=dno", "reward=contrast", "method.select=best_held_out", "eval.rewards=[contrast]"],
    "monitor.every": ["method=dno", "monitor.every=5"],  # the noise methods' rule reads their step records
    "monitor.stop": ["method=draft", "monitor.stop=true"],  # no probe set to act on
    "monitor.select": ["method=draft", "monitor.select=best_held_out"],
    "monitor.select ": ["method=draft", "monitor.every=5", "monitor.select=best_held_out", "eval.rewards=[judge]"],
}


def test_the_default_held_out_reward_is_neither_the_judge_nor_the_optimised_reward():
    from framework.config import held_out_reward

    rewards = "eval.rewards=[judge,contrast,saturation]"
    assert held_out_reward(compose("method=dno", "reward=contrast", rewards)) == "saturation"
    assert held_out_reward(compose("method=dno", "reward=saturation", rewards)) == "contrast"
    assert held_out_reward(compose("method=dno", "reward=contrast", "eval.rewards=[judge,contrast]")) is None
    assert held_out_reward(compose("method=best_of_n", rewards)) is None  # no stopping rule to choose for


@pytest.mark.parametrize("key", list(RELATIONS))
def test_rules_across_fields(key):
    with pytest.raises(FrameworkError, match=rf"^{key.strip()}=.* is not valid; "):
        validate(compose(*RELATIONS[key]))


def test_a_scale_of_one_with_inf_power_and_a_negative_lora_scale_stay_valid():
    validate(compose("method=aig", *ADAPTER, "method.p=inf"))
    validate(compose("method=lora_scale", *ADAPTER, "method.alpha=-0.5"))
    validate(compose("method=dno", "method.opt_steps=0"))


BAD_VALUES = {  # what a user types -> the start of the one error line
    "method.beta=-1": "method.beta=-1.0 is not valid; it must be ≥ 0",
    "method.eta=-0.5": "method.eta=-0.5 is not valid; it must be in [0, 1]",
    "method.num_steps=0": "method.num_steps=0 is not valid",
    "method.lr=-0.1": "method.lr=-0.1 is not valid; it must be > 0",
    "samples_per_prompt=0": "samples_per_prompt=0 is not valid",
    "trainer.devices=0": "trainer.devices=0 is not valid; it must be ≥ 1",
    "method=best_of_n method.n=0": "method.n=0 is not valid",
    "model.resolution=1001": "model.resolution=1001 is not valid; it must be ≥ 8 and a multiple of 8",
    "method.grad_steps=60": "method.grad_steps=60 is not valid; it must be ≤ method.num_steps=50",
    "method=draft method.k=30": "method.k=30 is not valid; it must be ≤ method.num_steps=25",
    "method=mira_dpo method.num_candidates=1": "method.num_candidates=1 is not valid; it must be ≥ 2",
    "method.weighting=girsanov method.eta=0": "method.weighting='girsanov' is not valid; girsanov needs method.eta > 0",
    "model.dtype=float64": "model.dtype='float64' is not valid; choose from: float32, float16, bfloat16",
    "reward.jpeg_quality=0": "reward.jpeg_quality=0 is not valid",
    "reward.scale=0": "reward.scale=0.0 is not valid; it must be > 0",
    "prompts.limit=0": "prompts.limit=0 is not valid",
    "eval.features=pixels": "eval.features='pixels' is not valid",
    "eval.rewards=[hpsv9]": "eval.rewards=['hpsv9'] is not valid; choose from: aesthetic",
    "logger.mode=sometimes": "logger.mode='sometimes' is not valid",
    "trainer.strategy=fsdp": "trainer.strategy='fsdp' is not valid",
    "seed=-1": "seed=-1 is not valid",
    "method=aig method.adapter=x method.f=2": "method.f=2.0 is not valid; it must be in [0, 1]",
    "method=dno method.gamma=-1": "method.gamma=-1.0 is not valid",
    "method=draft trainer.devices=3": "method.train_batch_size=4 is not valid; it must be a multiple of the 3",
    "method=dno reward=jpeg": "reward.name='jpeg' is not valid; method dno follows reward gradients",
    "method.guidance_scale=-1": "method.guidance_scale=-1.0 is not valid",
    "method.optimize=everything": "method.optimize='everything' is not valid; choose from: all, x_T",
    "method=lora_scale": "method.adapter is required",
    "reward=callable": "reward.target=None is not valid; reward=callable needs",
    "method.betta=1": "unknown option method.betta; valid keys of method: batch_size, beta,",
    "+method.betta=1": "unknown option method.betta; valid keys of method: batch_size, beta,",
    "method.opt_steps=many": "method.opt_steps: Value 'many' of type 'str' could not be converted to Integer",
    "method=dpo": "method=dpo: no such option; choose from: aig, base",
    "reward=contrast method.held_out=contrast eval.rewards=[contrast]": "method.held_out='contrast' is not valid; "
    "it is the optimised reward",
}
# What only the command line meets: Hydra's override grammar, and a list of options outside a sweep.
COMMAND_LINE_ONLY = {
    "method.beta=[": "cannot parse the override 'method.beta=[': no viable alternative at input '['; write key=value",
    "method.beta=1)": "cannot parse the override 'method.beta=1)': extraneous input ')' expecting <EOF>",
    "prompts.prompts=[it's]": 'cannot parse the override "prompts.prompts=[it\'s]": unexpected character "\'" at '
    "position 20",
    "method=[mira,dno]": "method=[mira,dno]: a config group takes one option; to run each, add --multirun and write "
    "method=mira,dno",
    "=3": "the command line: Config group override must be a string or a list",
}


def test_bad_values_on_the_command_line_end_in_one_error_line_and_exit_2(tmp_path):
    """As a user types them: each exits 2 with exactly one `error:` line, runs nothing, prints no traceback."""
    for i, (typed, expected) in enumerate((BAD_VALUES | COMMAND_LINE_ONLY).items()):
        result = run_cli(*typed.split(), "logger=none", run_dir=tmp_path / str(i))
        assert result.returncode == 2, (typed, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {expected}"), (typed, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout and result.stdout == "", typed
    assert list(tmp_path.glob("*/items/*")) == []


def test_the_status_of_a_rejected_run_is_written_for_sweeps(tmp_path):
    result = run_cli("method.beta=-1", "logger=none", run_dir=tmp_path)
    status = OmegaConf.load(tmp_path / "status.json")
    assert result.returncode == status.exit_code == 2 and "method.beta=-1.0" in status.error


def mean_pixel(images, prompts):
    return images.mean((1, 2, 3))


def test_the_registry_says_truly_which_rewards_gradients_reach_the_images_through():
    """For every reward that needs no weights: a gradient reaches the images exactly when the registry says so (the
    remote reward, which needs a server: test_remote); an ensemble is differentiable when every member is."""
    import torch

    from framework.config.rewards import REWARDS, is_differentiable
    from framework.rewards import build_reward

    configs = [
        RewardConfig(name=name)
        for name, entry in REWARDS.items()
        if not entry.network and name not in ("callable", "remote", "ensemble")
    ]
    configs += [RewardConfig(name="ensemble", members=["brightness", other]) for other in ("contrast", "jpeg")]
    target = "test_validation:mean_pixel"
    configs += [RewardConfig(name="callable", target=target, differentiable=flag) for flag in (True, False)]
    images = torch.rand(2, 3, 32, 32)
    for cfg in configs:
        pixels = images.clone().requires_grad_()
        scores = build_reward(cfg)(pixels, ["a red circle", "a blue square"])
        reaches = scores.requires_grad and torch.autograd.grad(scores.sum(), pixels)[0].abs().sum() > 0
        assert bool(reaches) == is_differentiable(cfg), cfg.name


def test_every_registered_method_builds_its_implementation():
    from framework.methods import Method, build_method
    from framework.rewards import build_reward

    reward = build_reward(RewardConfig(name="brightness"))
    for name, schema in METHODS.items():
        config = schema(adapter="-") if "adapter" in schema.__dataclass_fields__ else schema()
        method = build_method(config, reward)
        assert isinstance(method, Method) and method.cfg is config, name
