"""The embedded testbed: a procedural shapes world, a small trained text-to-image model of it, and a trained
ground-truth judge, so that reward hacking can be measured on a CPU with known truth."""

from pathlib import Path

TESTBED_DIR = Path(__file__).parent
MODEL_DIR = TESTBED_DIR / "model"  # diffusers StableDiffusionPipeline layout (safetensors)
JUDGE_FILE = TESTBED_DIR / "judge.safetensors"
