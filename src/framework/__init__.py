"""Reward alignment of text-to-image diffusion models, and measurement of reward hacking.

From Python (framework.api, docs/python.md): `framework.compose([...])` returns a validated config,
`framework.execute(cfg)` runs it in this process, `framework.load_run(dir)` and `framework.load_tables(experiment)`
read results back. Importing the package registers its configs in Hydra's ConfigStore, so Hydra's own compose API
reads conf/ with no further call.
"""

from framework.core.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

import framework.config  # noqa: E402,F401  (registers the configs in Hydra's ConfigStore)

__all__ = ["Failure", "FrameworkError", "Interrupted", "Run", "compose", "execute", "load_run", "load_tables"]


def __getattr__(name: str):
    """The API loads on first use, so that importing a lower module (a reward, a config) stays light."""
    if name in __all__:
        import framework.api

        return getattr(framework.api, name)
    raise AttributeError(f"module 'framework' has no attribute {name!r}")
