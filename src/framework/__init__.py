"""Reward alignment of text-to-image diffusion models, and measurement of reward hacking."""

from framework.core.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()
