"""The embedded testbed: a procedural shapes world, a small trained text-to-image model of it, a trained
ground-truth judge, an analysis-by-synthesis gold reward and proxy rewards trained on comparisons it labels, so that
reward hacking can be measured on a CPU with known truth."""

from pathlib import Path

TESTBED_DIR = Path(__file__).parent
MODEL_DIR = TESTBED_DIR / "model"  # diffusers StableDiffusionPipeline layout (safetensors)
JUDGE_FILE = TESTBED_DIR / "judge.safetensors"
PROXY_SIZES = (1000, 4000, 16000)  # comparisons behind each shipped proxy reward (reward=proxy)


def proxy_file(comparisons: int) -> Path:
    return TESTBED_DIR / f"proxy_{comparisons}.safetensors"
