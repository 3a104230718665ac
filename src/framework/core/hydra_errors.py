"""Hydra's and OmegaConf's errors as the one-line FrameworkError every entry point prints (exit 2)."""

from framework.core.errors import FrameworkError, first_line
from framework.core.options import CONF_DIR
from framework.core.validation import unknown_key


def compose_error(e: Exception) -> FrameworkError:
    """A composition error as one line: an unknown option with the valid ones, an unknown key as `validate` reports it
    (Hydra says "Could not override" without `+` and nothing at all with it), an override that does not parse."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = e.__cause__
    if isinstance(e, OverrideParseException):
        return FrameworkError(parse_error(e))
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return FrameworkError(f"{group}={option}: no such option; choose from: {', '.join(e.options)}")
    key = getattr(cause, "full_key", None)
    schema = getattr(cause, "object_type", None)
    if key and isinstance(cause, AttributeError) and schema is not None and hasattr(schema, "__dataclass_fields__"):
        group, _, name = key.rpartition(".")
        return unknown_key(group, name, schema)
    return FrameworkError(f"{key}: {first_line(cause)}" if key else first_line(e))


def parse_error(e) -> str:
    """An OverrideParseException as one line naming the override and what the grammar expected."""
    lines = [line for line in str(e).splitlines() if line.strip() and not line.startswith(("Error parsing", "See "))]
    detail = lines[0] if lines else "not valid override syntax"
    if detail.startswith("LexerNoViableAltException") and len(lines) > 1:  # a caret line points at the character
        position = len(lines[1]) - len(lines[1].lstrip()) - len("LexerNoViableAltException: ")
        detail = f"unexpected character {e.override[position]!r} at position {position + 1}"
    return (
        f"cannot parse the override {e.override!r}: {detail}; write key=value, a list as key=[a,b], and quote a "
        "value holding brackets, commas, quotes or $ (key='a, b')"
    )


def check_group_lists(args: list[str]) -> None:
    """`method=[mira,dno]` outside a sweep: Hydra would merge both options into one config and fail obscurely."""
    if {"--multirun", "-m"} & set(args):
        return
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        if key in groups and value.startswith("["):
            raise FrameworkError(
                f"{arg}: a config group takes one option; to run each, add --multirun and write {key}="
                f"{value.strip('[]')}"
            )
