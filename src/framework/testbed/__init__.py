"""The embedded testbed: a procedural shapes world, a small trained text-to-image model of it, a trained
ground-truth judge, an analysis-by-synthesis gold reward and proxy rewards trained on comparisons it labels, so that
reward hacking can be measured on a CPU with known truth."""

from pathlib import Path

TESTBED_DIR = Path(__file__).parent
MODEL_DIR = TESTBED_DIR / "model"  # diffusers StableDiffusionPipeline layout (safetensors)
JUDGE_FILE = TESTBED_DIR / "judge.safetensors"
PROXY_SIZES = (1000, 4000, 16000)  # comparisons behind each shipped proxy reward (reward=proxy)
ENSEMBLE_SIZE = 5  # members of the shipped proxy ensemble (reward=proxy_ensemble), each of PROXY_SIZES[0]


def proxy_file(comparisons: int, member: int | None = None) -> Path:
    """The shipped proxy of `comparisons`, or member k of the ensemble of PROXY_SIZES[0]-comparison proxies."""
    suffix = "" if member is None else f"_member{member}"
    return TESTBED_DIR / f"proxy_{comparisons}{suffix}.safetensors"
