"""A reward served elsewhere (`python -m framework.serve`), scored over HTTP: `reward=remote reward.url=...`.

The wire format, shared with the server: a POST of JSON {"prompts": [...], "images": ...} to <url>/predict, the
images either as 8-bit PNG files (base64; what a run saves, so the score is the saved image's) or as the raw
float32 tensor (exactly the in-process score); the answer is {"scores": [...]}, one per image. A black box:
no gradients cross the network, so the gradient methods refuse it and Best-of-N, DNO-ZO and MIRA-DPO use it.

Start-up checks that a framework reward server answers and takes this client's API key (sent, if set, from the
environment variable `reward.api_key_env` names), one error line if not, and reads the server's limits of a request,
which batches are split to fit. During a run, a request that fails after its retries (server down, slow past the
timeout, refused, a wrong answer) fails the items of that request only.
"""

import base64
import binascii
import io
import math
import os
import time

import numpy as np
import requests
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from framework.config.rewards import IMAGE_FORMATS
from framework.core.errors import FrameworkError, first_line
from framework.core.images import load_png, save_png
from framework.rewards.base import Reward

API_PATH = "/predict"
RETRY_DELAY = 0.5  # seconds before the first retry; doubled for each further one
RETRYABLE = {502, 503, 504}  # answers a retry can change; a 500 is a reward that failed on these very images


def encode_images(images: Tensor, image_format: str) -> dict:
    images = images.detach().float().clamp(0, 1).cpu()
    if image_format == "png":
        files = []
        for image in images:
            buffer = io.BytesIO()
            save_png(image, buffer, compress_level=1)  # encoding time matters more than bytes on a fast link
            files.append(base64.b64encode(buffer.getvalue()).decode())
        return {"format": "png", "data": files}
    raw = base64.b64encode(images.contiguous().numpy().astype("<f4").tobytes()).decode()
    return {"format": "tensor", "shape": list(images.shape), "data": raw}


class TooLarge(ValueError):
    """A request over one of the server's limits (it answers 413, naming the limit)."""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_images(payload, max_images: int | None = None, max_pixels: int | None = None) -> Tensor:
    """The [B, 3, H, W] float32 images of a request, at most `max_images` of at most `max_pixels` pixels each (checked
    before anything is decoded: a small PNG may hold a huge image); ValueError says what is malformed, TooLarge
    which limit a request exceeds."""
    if not isinstance(payload, dict) or payload.get("format") not in IMAGE_FORMATS:
        shown = payload.get("format") if isinstance(payload, dict) else payload
        raise ValueError(f"images.format must be one of {IMAGE_FORMATS}, not {shown!r:.40}")
    if payload["format"] == "png":
        files = payload.get("data")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("images.data must be a list of base64 PNG files")
        _check_count(len(files), max_images)
        images = [_png(_base64(f), max_pixels) for f in files]
        if len({image.shape for image in images}) > 1:
            raise ValueError("the PNG images of one request must share one size")
        return torch.stack(images)
    shape = payload.get("shape")
    if not isinstance(shape, list) or len(shape) != 4 or shape[1] != 3 or not all(_count(d) for d in shape):
        raise ValueError(f"tensor images must have shape [B, 3, H, W] of positive integers, not {shape!r:.60}")
    _check_count(shape[0], max_images)
    _check_pixels(shape[2] * shape[3], max_pixels)
    if not isinstance(payload.get("data"), str):
        raise ValueError("images.data must be the base64 text of the float32 images")
    raw = _base64(payload["data"])
    if len(raw) != 4 * math.prod(shape):
        raise ValueError(
            f"tensor data holds {len(raw)} bytes; float32 images of shape {shape} take {4 * math.prod(shape)}"
        )
    images = torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy()).reshape(shape)
    if not torch.isfinite(images).all():
        raise ValueError("tensor images hold NaN or infinite values")
    return images


def _base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"images.data is not base64 ({first_line(e)})") from None


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_count(images: int, max_images: int | None) -> None:
    if images == 0:
        raise ValueError("the request holds no images")
    if max_images is not None and images > max_images:
        raise TooLarge(f"{images} images in one request; the server takes at most serve.max_images={max_images}")


def _check_pixels(pixels: int, max_pixels: int | None) -> None:
    if max_pixels is not None and pixels > max_pixels:
        raise TooLarge(f"an image of {pixels} pixels; the server takes at most serve.max_pixels={max_pixels}")


def _png(data: bytes, max_pixels: int | None) -> Tensor:
    """One PNG file, its size checked from its header before it is decoded."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("an image is not a PNG file")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            _check_pixels(image.width * image.height, max_pixels)
            return load_png(image)
    except UnidentifiedImageError:
        raise ValueError("an image is not a readable PNG file") from None
    except (OSError, Image.DecompressionBombError) as e:  # e.g. truncated
        raise ValueError(f"an image is not a readable PNG file ({first_line(e)})") from None


class RemoteReward(Reward):
    differentiable = False

    def __init__(self, url: str, timeout: float, retries: int, image_format: str, request_batch: int, api_key_env: str):
        super().__init__()
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        self.image_format, self.request_batch, self.api_key_env = image_format, request_batch, api_key_env
        self.session = requests.Session()
        if key := os.environ.get(api_key_env):
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.served, self.limits = self._check_server()

    def _check_server(self) -> tuple[str, dict]:
        """The served reward's name and the server's limits of a request, from its /info; one error line if nothing
        (or something else) answers, or if the server refuses this client's key."""
        how = "start one with `python -m framework.serve reward=<name> serve.port=<port>` or set reward.url"
        try:
            self.session.get(f"{self.url}/health", timeout=self.timeout).raise_for_status()
            response = self.session.get(f"{self.url}/info", timeout=self.timeout)
            if response.status_code == 401:
                raise FrameworkError(f"reward.url={self.url!r}: {self._refused()}")
            info = response.json()
        except (requests.RequestException, ValueError) as e:
            raise FrameworkError(f"reward.url={self.url!r}: no reward server answers ({self._why(e)}); {how}") from None
        model = (info.get("model") or {}) if isinstance(info, dict) else {}
        if not model.get("reward"):
            raise FrameworkError(f"reward.url={self.url!r}: the server there is not a framework reward server; {how}")
        return model["reward"], model.get("limits") or {}

    def _refused(self) -> str:
        if "Authorization" not in self.session.headers:
            return f"the server requires an API key: set the environment variable {self.api_key_env} to its key"
        return f"the server refused the API key in the environment variable {self.api_key_env}"

    def _why(self, e: Exception) -> str:
        if isinstance(e, requests.Timeout):
            return f"no answer within reward.timeout={self.timeout} s"
        if isinstance(e, requests.ConnectionError):
            return "cannot connect: nothing listens there, or the host is unreachable"
        return first_line(e)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        step = min(self.request_batch or len(images), self._fitting(images))
        scores = [self._request(images[i : i + step], prompts[i : i + step]) for i in range(0, len(images), step)]
        return torch.cat(scores).to(images.device)

    def _fitting(self, images: Tensor) -> int:
        """How many of these images one request may carry under the server's limits: its images per request, and its
        body size with room for the prompts (an 8-bit PNG is taken at its raw size, which noise reaches)."""
        fits = self.limits.get("max_images", len(images))
        if "max_bytes" in self.limits:
            per_image = 4 / 3 * images[0].numel() * (4 if self.image_format == "tensor" else 1) + 1024  # base64
            fits = min(fits, int(0.9 * self.limits["max_bytes"] / per_image))
        return max(1, fits)

    def _request(self, images: Tensor, prompts: list[str]) -> Tensor:
        """One request, retried after connection errors, timeouts and answers that a retry can change (502, 503,
        504: a proxy or server not ready or overloaded); a refusal (4xx) or a reward that failed on these images
        (500) is not retried. The last failure raises, and the runner fails the items of this batch, not the run."""
        body = {"prompts": prompts, "images": encode_images(images, self.image_format)}
        for attempt in range(self.retries + 1):
            try:
                response = self.session.post(f"{self.url}{API_PATH}", json=body, timeout=self.timeout)
                if response.status_code not in RETRYABLE or attempt == self.retries:
                    break
            except (requests.ConnectionError, requests.Timeout) as e:
                if attempt == self.retries:
                    raise ConnectionError(f"reward server {self.url}: {self._why(e)}") from e
            time.sleep(RETRY_DELAY * 2**attempt)
        if response.status_code == 401:
            raise PermissionError(f"reward server {self.url}: {self._refused()}")
        if not response.ok:
            try:  # the server's reason (framework.serve and FastAPI send {"detail": ...})
                reason = str(response.json()["detail"])
            except (ValueError, KeyError, TypeError):
                reason = response.text
            reason = (reason.strip().splitlines() or ["no reason given"])[0][:200]
            raise RuntimeError(f"reward server {self.url} answered {response.status_code}: {reason}")
        scores = response.json().get("scores")
        if not isinstance(scores, list) or len(scores) != len(images):
            raise ValueError(f"reward server {self.url} returned {scores!r:.80} for {len(images)} images")
        return torch.tensor(scores, dtype=torch.float32)
