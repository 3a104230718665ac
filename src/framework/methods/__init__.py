"""Methods, one module each, registered with their schemas in framework.config.methods. Importing this package
loads no network: `build_method` imports a method's module when it builds it, and `Method`/`Problem` (the contract
and a batch's world, framework.methods.common) load on first use."""

from framework.config.methods import METHODS, gradient_problem
from framework.core.errors import FrameworkError
from framework.core.items import Item, ItemResult, derive_seed
from framework.core.options import resolve

__all__ = ["METHODS", "Item", "ItemResult", "Method", "Problem", "build_method", "derive_seed"]


def build_method(cfg, reward):
    """The method of config `cfg` (a schema instance or a composed DictConfig), checked against the reward it will
    use (gradient methods refuse a non-differentiable one, as validation does)."""
    schema = METHODS[cfg.name]
    if problem := gradient_problem(schema, reward.name, reward.differentiable):
        raise FrameworkError(problem)
    return resolve(schema.implementation)(cfg)


def __getattr__(name: str):
    if name in ("Method", "Problem"):
        from framework.methods import common

        return getattr(common, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
