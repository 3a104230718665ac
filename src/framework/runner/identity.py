"""What makes two runs the same run, defined once: the run directory's resume check (`run.json`) and the experiments'
choice of directory both read it.

A run's results depend on its configuration except where and how it executes: the logger, the trainer (devices,
processes), the output directory, how many items share a batch (`method.batch_size`) and how the networks run (the
models' runtime options change nothing beyond float rounding).
"""

import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf

from framework.config import RUNTIME_OPTIONS
from framework.testbed import MODEL_DIR

EXECUTION_GROUPS = ("logger", "trainer", "output_dir")
# Keys added after runs existed, with their defaults: at the default a key is left out, so a run that does not use it
# keeps the identity (and the results) it had before the key existed.
ADDED_KEYS = {
    "model": {"height": None, "width": None},
    "reward": {
        "member": None,
        "members": [],
        "aggregate": "mean",
        "uwo_lambda": 1.0,
        "normalise": "base",
        "reference_images": 16,
    },
    "method": {"kl_gate": 1.0},
}


def run_identity(cfg) -> dict:
    """The composed config without what only decides where and how a run executes, resolved."""
    identity = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k not in EXECUTION_GROUPS]), resolve=True
    )
    identity["method"].pop("batch_size")
    identity["reward"].pop("api_key_env")  # which variable holds a served reward's key: access, not the reward
    if not identity["monitor"]["every"]:  # no probe set: the monitor changes nothing a run computes
        identity.pop("monitor")
    for key in RUNTIME_OPTIONS:
        identity["model"].pop(key)
    for group, defaults in ADDED_KEYS.items():
        for key, default in defaults.items() if group in identity else ():
            if identity[group].get(key, default) == default:
                identity[group].pop(key, None)
    if identity["model"]["source"] == str(MODEL_DIR):  # the shipped testbed: the same run wherever the package lies
        identity["model"]["source"] = "${testbed_model:}"
    return identity


def identity_hash(cfg) -> str:
    """10 hex digits naming a run's configuration (an experiment's run directory is `<label>-<hash>`)."""
    return hashlib.sha1(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()[:10]


def fingerprint(cfg, prompts: list[str]) -> dict:
    """`run.json`, what the results in a run directory depend on: the run identity with the prompt list itself in
    place of the prompts group (two ways of naming the same prompts are the same run), and the content of a LoRA
    adapter the method reads."""
    from framework.config.methods import WEIGHT_NAME

    digest = lambda data: hashlib.sha1(data).hexdigest()  # noqa: E731
    identity = run_identity(cfg)
    identity["prompts"] = {"count": len(prompts), "sha1": digest(json.dumps(prompts).encode())}
    adapter = Path(cfg.method.adapter) / WEIGHT_NAME if "adapter" in cfg.method else None
    if adapter is not None and adapter.is_file():
        identity["adapter_sha1"] = digest(adapter.read_bytes())
    return identity
