"""The options of each config group, as the YAML files of conf/ list them (package data: <repo>/conf links here), and
the "module:name" references by which the tables (rewards, methods, model families) name code without importing it."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> tuple[str, ...]:
    """The options of a config group, e.g. options("reward") -> ("aesthetic", ..., "tiny_pickscore")."""
    return tuple(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def resolve(reference: str):
    """The object a "module:name" reference names, its module imported now."""
    from importlib import import_module

    module, _, name = reference.partition(":")
    return getattr(import_module(module), name)
