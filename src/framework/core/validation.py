"""The rules every config value is checked against, and the check itself.

Each field of a schema declares what is valid next to its definition (`valid(default, rule)`), and a schema states
its rules across fields as `relations(c, run)`: `c` the schema's node, `run` the whole run config, yielding
(full key, why) for each broken rule. `validate` checks them all before anything is loaded, so a bad value is one
line naming the key, the value and what is valid.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import OmegaConf

from framework.core.errors import FrameworkError


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high`, bounds included unless open; None: no bound. NaN is never valid, and ±inf only
    where a bound is ±inf itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if math.isinf(value) and value not in (self.low, self.high):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below and (self.multiple_of is None or value % self.multiple_of == 0)

    def describe(self) -> str:
        show = lambda v: str(int(v)) if float(v).is_integer() else f"{v:g}"  # noqa: E731  (2147483647, not 2.1e+09)
        low = None if self.low is None else f"{'>' if self.low_open else '≥'} {show(self.low)}"
        high = None if self.high is None else f"{'<' if self.high_open else '≤'} {show(self.high)}"
        if low and high:
            bounds = (
                f"in {'(' if self.low_open else '['}{show(self.low)}, {show(self.high)}{')' if self.high_open else ']'}"
            )
        else:
            bounds = low or high or "finite"
        return f"it must be {bounds}" + (f" and a multiple of {self.multiple_of}" if self.multiple_of else "")


@dataclass(frozen=True)
class OneOf:
    """One of fixed names (for a list field: each element); `options` may be a function listing them."""

    options: tuple[str, ...] | Callable[[], tuple[str, ...]]

    def names(self) -> tuple[str, ...]:
        return self.options() if callable(self.options) else self.options

    def accepts(self, value) -> bool:
        values = value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
        return all(v in self.names() for v in values)

    def describe(self) -> str:
        return f"choose from: {', '.join(map(str, self.names()))}"


@dataclass(frozen=True)
class Text:
    """Free text of the field's type (a hub id, a path, a name): checked where it is used (e.g. weights exist)."""


def valid(default, rule: Range | OneOf | Text):
    """A dataclass field with its default and its rule."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


POSITIVE, NON_NEGATIVE, UNIT, COUNT = Range(0, low_open=True), Range(0), Range(0, 1), Range(1)


def unknown_key(group: str, key: str, schema: type) -> FrameworkError:
    """The error for `key` not declared by `schema` (group "" = the top level), naming the valid keys."""
    valid_keys = ", ".join(sorted(f.name for f in fields(schema)))
    if not group:
        return FrameworkError(f"unknown option {key}; valid top-level keys: {valid_keys} (and group keys: method.lr)")
    return FrameworkError(f"unknown option {group}.{key}; valid keys of {group}: {valid_keys}")


def _schema_nodes(cfg) -> Iterator[tuple[str, Any, type]]:
    """(key prefix, node, schema) of the top-level config and of every group with a schema."""
    yield "", cfg, OmegaConf.get_type(cfg)
    for group, node in cfg.items_ex(resolve=False):
        schema = OmegaConf.get_type(node) if OmegaConf.is_dict(node) else None
        if schema not in (None, dict):
            yield f"{group}.", node, schema


def check_fields(prefix: str, node, schema: type) -> None:
    """Every key of `node` is declared by `schema`, set, and valid by its field's rule; else one FrameworkError."""
    declared = {f.name: f for f in fields(schema)}
    for key in node.keys():
        if key not in declared:
            raise unknown_key(prefix.rstrip("."), key, schema)
    for name, spec in declared.items():
        if OmegaConf.is_missing(node, name):
            raise FrameworkError(f"{prefix}{name} is required (it has no default); set {prefix}{name}=...")
        rule = spec.metadata.get("rule")
        if rule is None or isinstance(rule, Text):  # bools are type-checked by OmegaConf; text where it is used
            continue
        value = node[name]
        if value is not None and not rule.accepts(value):
            shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            raise FrameworkError(f"{prefix}{name}={shown!r} is not valid; {rule.describe()}")


def validate(cfg) -> None:
    """Every value of a composed run config against its field's rule, then every schema's `relations`; the first
    problem is one FrameworkError naming the key, the value given and what is valid. Also rejects keys that no
    schema declares (added with Hydra's `+group.key=value`, which skips struct checks)."""
    nodes = list(_schema_nodes(cfg))
    for prefix, node, schema in nodes:
        check_fields(prefix, node, schema)
    for _, node, schema in nodes[1:] + nodes[:1]:  # the groups' rules first, then the run's
        for cls in schema.__mro__:  # each class states its own relations; subclasses inherit them
            relations = cls.__dict__.get("relations")
            for key, why in relations(node, cfg) if relations else ():
                raise FrameworkError(f"{key}={OmegaConf.select(cfg, key)!r} is not valid; {why}")
