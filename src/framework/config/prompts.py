"""Prompt sets: built-in lists, inline prompts, or a user's file (.txt one per line, or .json list of strings)."""

import json
from pathlib import Path

from framework.config import PromptsConfig
from framework.core.errors import FrameworkError

# Animal-Animal (from Attend-and-Excite, Chefer et al. 2023; MIRA evaluates on it): "a {A} and a {B}" for every
# pair A before B in this order (66 prompts).
PAIR_ANIMALS = [
    "cat",
    "dog",
    "bird",
    "bear",
    "lion",
    "horse",
    "elephant",
    "monkey",
    "frog",
    "turtle",
    "rabbit",
    "mouse",
]
# DDPO's simple animals, used bare as prompts, as DDPO and the AIG paper do (45 prompts).
SIMPLE_ANIMALS = [
    "cat",
    "dog",
    "horse",
    "monkey",
    "rabbit",
    "zebra",
    "spider",
    "bird",
    "sheep",
    "deer",
    "cow",
    "goat",
    "lion",
    "tiger",
    "bear",
    "raccoon",
    "fox",
    "wolf",
    "lizard",
    "beetle",
    "ant",
    "butterfly",
    "fish",
    "shark",
    "whale",
    "dolphin",
    "squirrel",
    "mouse",
    "rat",
    "snake",
    "turtle",
    "frog",
    "chicken",
    "duck",
    "goose",
    "bee",
    "pig",
    "turkey",
    "fly",
    "llama",
    "camel",
    "bat",
    "gorilla",
    "hedgehog",
    "kangaroo",
]


def animal_animal() -> list[str]:
    return [f"a {a} and a {b}" for i, a in enumerate(PAIR_ANIMALS) for b in PAIR_ANIMALS[i + 1 :]]


def read_prompt_file(path: str | None) -> list[str]:
    if not path:
        raise FrameworkError("prompts.path is not set: prompts=file needs prompts.path=/path/to/prompts.txt")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FrameworkError(f"prompts.path: file '{path}' not found")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FrameworkError(f"prompts file '{path}' is not UTF-8 text (byte {e.start})") from e
    if "\x00" in text:
        raise FrameworkError(f"prompts file '{path}' contains NUL bytes: is it a binary file?")
    if file.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise FrameworkError(f"prompts file '{path}' is not valid JSON: {e.msg} at line {e.lineno}") from e
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise FrameworkError(f"prompts file '{path}' must hold a JSON list of non-empty strings")
        prompts = [p.strip() for p in prompts]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise FrameworkError(f"prompts file '{path}' holds no prompts")
    return prompts


def load_prompts(cfg: PromptsConfig) -> list[str]:
    from framework.testbed.shapes import all_captions

    sets = {
        "inline": lambda: list(cfg.prompts),
        "file": lambda: read_prompt_file(cfg.path),
        "animal_animal": animal_animal,
        "simple_animals": lambda: list(SIMPLE_ANIMALS),
        "shapes": all_captions,
    }
    name = cfg.name
    prompts = sets[name]()
    prompts = prompts[: cfg.limit] if cfg.limit is not None else prompts
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise FrameworkError(f"prompts ({name}) must be a non-empty list of non-empty strings")
    return prompts
