import itertools

import pytest
from conftest import REPO, compose
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from framework.config import ModelConfig
from framework.config.methods import METHODS
from framework.config.rewards import RewardConfig
from framework.core.errors import FrameworkError
from framework.core.validation import validate


def options(group):
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


# A reward relates to a method only through whether the method follows reward gradients and has a held-out stopping
# rule (`select`): one method of each of the four kinds stands for its kind with every reward.
METHOD_KINDS = ("mira", "draft", "mira_dpo", "best_of_n")


def test_every_model_reward_method_pair_composes():
    """Every method with every model, every reward with a method of each kind (the rules across groups relate two
    groups at a time: model and method, reward and method), the third group at its default."""
    default_model, default_reward = "shapes", "brightness"
    combos = [(m, default_reward, method) for m, method in itertools.product(options("model"), options("method"))]
    combos += [(default_model, r, method) for r, method in itertools.product(options("reward"), METHOD_KINDS)]
    assert len(combos) >= 14 * 9 + 19 * 4
    kinds = {(METHODS[m].follows_reward_gradients, "select" in METHODS[m].__dataclass_fields__) for m in METHOD_KINDS}
    assert len(kinds) == 4
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):  # once: composing is the cheap part
        for model, reward, method in combos:
            overrides = [f"model={model}", f"reward={reward}", f"method={method}"]
            if reward == "callable":
                overrides.append("reward.target=math:fsum")
            if reward == "remote":
                overrides.append("reward.url=http://127.0.0.1:8000")
            if reward == "ensemble":
                overrides.append("reward.members=[brightness,contrast]")
            if method in ("lora_scale", "aig"):
                overrides.append("method.adapter=some/adapter")
            check_composed(hydra_compose("config", overrides=overrides), reward, method)


def check_composed(cfg, reward: str, method: str) -> None:
    assert OmegaConf.get_type(cfg.model) is ModelConfig
    assert OmegaConf.get_type(cfg.reward) is RewardConfig
    assert OmegaConf.get_type(cfg.method) is METHODS[method]
    assert cfg.method.name == method
    if reward in ("jpeg", "callable", "remote") and METHODS[method].follows_reward_gradients:
        with pytest.raises(FrameworkError, match=f"reward {reward} is not differentiable"):
            validate(cfg)
    else:
        validate(cfg)


def test_groups_have_their_documented_options():
    assert {"sd14", "sd15", "sdxl", "sd3", "sd35", "flux", "qwen_image", "flux2", "flux2_klein"} <= set(
        options("model")
    )
    assert {"tiny_sd", "tiny_sdxl", "tiny_sd3", "tiny_flux", "tiny_qwen_image", "tiny_flux2"} <= set(options("model"))
    assert {
        "aesthetic",
        "hps",
        "pickscore",
        "clipscore",
        "jpeg",
        "brightness",
        "darkness",
        "tiny_aesthetic",
        "tiny_hps",
        "tiny_pickscore",
        "tiny_clipscore",
        "imagereward",
        "tiny_imagereward",
        "imagereward_arch",
        "hpsv3",
        "tiny_hpsv3",
        "hpsv3_arch",
        "remote",
    } <= set(options("reward"))
    assert {"inline", "file", "animal_animal", "simple_animals"} <= set(options("prompts"))
    assert {"cpu", "gpu", "ddp"} <= set(options("trainer")) and {"wandb", "none"} <= set(options("logger"))


def test_method_defaults_follow_the_papers():
    dno = compose("method=dno").method
    assert (dno.num_steps, dno.eta, dno.guidance_scale, dno.opt_steps, dno.lr, dno.grad_clip) == (
        50,
        1.0,
        5.0,
        100,
        0.01,
        1.0,
    )
    assert compose("model=sd15").model.source == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_unknown_key_added_with_plus_is_rejected_with_the_valid_keys():
    cfg = compose("+method.learning_rate=0.1")
    with pytest.raises(FrameworkError, match=r"unknown option method\.learning_rate; valid keys of method: .*lr"):
        validate(cfg)


def test_unknown_key_and_bad_type_fail_at_compose():
    with pytest.raises(Exception, match="model.resolutio"):
        compose("model.resolutio=3")
    with pytest.raises(Exception, match="opt_steps"):
        compose("method.opt_steps=many")
