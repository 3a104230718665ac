"""The text HPSv3's official code gives its model for a prompt, written to tests/golden/hpsv3_prompt.json for
tests/test_rewards.py to compare ours against, byte for byte.

HPSv3 builds it in two steps: its collator (`hpsv3/dataset/data_collator_qwen.py`, `_clean_message`) puts its
instruction around the prompt in a user message with the image, and Qwen2-VL-7B-Instruct's processor renders that
message with the model's chat template (`chat_template.json`), adding the generation prompt. This script runs both
pieces as published; nothing here imports the framework.

    pip install --no-deps hpsv3==1.0.0        # the official package (only its collator module is imported)
    python tests/golden/hpsv3_prompt.py      # fetches chat_template.json at the pinned revision (network)
    python tests/golden/hpsv3_prompt.py --chat-template chat_template.json   # or a copy of that file
"""

import argparse
import importlib.util
import json
import sys
import types
from importlib.metadata import version
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

HERE = Path(__file__).parent
QWEN2_VL = "Qwen/Qwen2-VL-7B-Instruct"
REVISION = "db8ce505bd3d523ac372f552648175c684c6f3f7"  # its chat_template.json as of 2025 (the `generation` tags)


def official_collator():
    """hpsv3's collator module, imported without the package's __init__ (which loads the whole trainer)."""
    spec = importlib.util.find_spec("hpsv3")
    if spec is None:
        sys.exit("the official package is not installed: pip install --no-deps hpsv3==1.0.0")
    package = types.ModuleType("hpsv3")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["hpsv3"] = package
    from hpsv3.dataset.data_collator_qwen import QWen2VLDataCollator

    return QWen2VLDataCollator(processor=None)  # the defaults HPSv3's inference uses: instruction, <|Reward|>


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat-template", type=Path, help=f"{QWEN2_VL}'s chat_template.json (default: fetch it)")
    args = parser.parse_args()
    path = args.chat_template
    if path is None:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(QWEN2_VL, "chat_template.json", revision=REVISION)
    template = json.loads(Path(path).read_text())["chat_template"]
    values = json.loads((HERE / "values.json").read_text())
    prompts = sorted({image["prompt"] for image in values["images"].values()})
    collator = official_collator()
    messages = collator._clean_message(prompts, ["image.png"] * len(prompts))  # the image's path is not rendered
    texts, _ = render_jinja_template(messages, chat_template=template, add_generation_prompt=True)
    golden = {
        "source": f"hpsv3=={version('hpsv3')} QWen2VLDataCollator._clean_message, {QWEN2_VL}@{REVISION} "
        f"chat_template.json rendered by transformers=={version('transformers')} (add_generation_prompt=True)",
        "texts": dict(zip(prompts, texts)),
    }
    (HERE / "hpsv3_prompt.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {HERE / 'hpsv3_prompt.json'} ({len(texts)} prompts)")


if __name__ == "__main__":
    main()
