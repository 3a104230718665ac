"""Before a run (or every run of an experiment) starts: which weights and prompt files its config needs that this
machine lacks. It knows every reward's and metric's weights, so it sits above rewards and metrics; the weight
lookups themselves are in framework.core.weights, below them.
"""

from pathlib import Path

from framework.core.weights import unavailable


def missing_weights(cfg) -> list[tuple[str, str, str]]:
    """(config key, value, why) of every weight or prompt file that run config `cfg` needs and this machine lacks."""
    from framework.config import reward_config
    from framework.config.rewards import required_weights
    from framework.metrics import resolve_features

    needs = []  # (kind, spec, key, revision)
    if not cfg.model.tiny and cfg.model.source:
        needs.append(("pretrained", cfg.model.source, "model.source", cfg.model.revision))
    needs += [(kind, spec, key, None) for kind, spec, key in required_weights(cfg.reward, "reward")]
    for name in cfg.eval.rewards:
        needs += [
            (kind, spec, f"{key} of reward={name} (eval.rewards)", None)
            for kind, spec, key in required_weights(reward_config(name), "reward")
        ]
    if resolve_features(cfg.eval, cfg.model) == "clip":
        needs += [
            ("pretrained", source, key, None)
            for source, key in ((cfg.eval.clip, "eval.clip"), (cfg.eval.cmmd_clip, "eval.cmmd_clip"))
            if source not in ("tiny", "none")
        ]
    missing = [(key, spec, why) for kind, spec, key, revision in needs if (why := unavailable(kind, spec, revision))]
    if cfg.prompts.name == "file" and not Path(cfg.prompts.path or "").expanduser().is_file():
        missing.append(("prompts.path", cfg.prompts.path or "", "not found"))
    return missing
