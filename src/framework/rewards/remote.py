"""A reward served elsewhere (`python -m framework.serve`), scored over HTTP: `reward=remote reward.url=...`.

The wire format, shared with the server: a POST of JSON {"prompts": [...], "images": ...} to <url>/predict, the
images either as 8-bit PNG files (base64; what a run saves, so the score is the saved image's) or as the raw
float32 tensor (exactly the in-process score); the answer is {"scores": [...]}, one per image. A black box:
no gradients cross the network, so the gradient methods refuse it and Best-of-N, DNO-ZO and MIRA-DPO use it.

Start-up checks that a framework reward server answers (one error line if not); during a run, a request that
fails after its retries (server down, slow past the timeout, a wrong answer) fails the items of that request only.
"""

import base64
import io
import time

import numpy as np
import requests
import torch
from torch import Tensor

from framework.errors import FrameworkError, first_line
from framework.images import load_png, save_png
from framework.rewards.base import Reward
from framework.rewards.registry import IMAGE_FORMATS

API_PATH = "/predict"
RETRY_DELAY = 0.5  # seconds before the first retry; doubled for each further one


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


def decode_images(payload: dict) -> Tensor:
    """The [B, 3, H, W] float32 images of a request; ValueError says what is malformed."""
    if payload.get("format") == "png":
        images = [load_png(io.BytesIO(base64.b64decode(data))) for data in payload["data"]]
        if len({image.shape for image in images}) > 1:
            raise ValueError("the PNG images of one request must share one size")
        return torch.stack(images)
    if payload.get("format") == "tensor":
        shape = tuple(payload["shape"])
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"tensor images must have shape [B, 3, H, W], not {list(shape)}")
        array = np.frombuffer(base64.b64decode(payload["data"]), dtype="<f4")
        return torch.from_numpy(array.copy()).reshape(shape)
    raise ValueError(f"images.format must be one of {IMAGE_FORMATS}, not {payload.get('format')!r}")


class RemoteReward(Reward):
    differentiable = False

    def __init__(self, url: str, timeout: float, retries: int, image_format: str, request_batch: int):
        super().__init__()
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        self.image_format, self.request_batch = image_format, request_batch
        self.session = requests.Session()
        self.served = self._check_server()

    def _check_server(self) -> str:
        """The served reward's name, from the server's /info; one error line if nothing (or something else) answers."""
        how = "start one with `python -m framework.serve reward=<name> serve.port=<port>` or set reward.url"
        try:
            self.session.get(f"{self.url}/health", timeout=self.timeout).raise_for_status()
            info = self.session.get(f"{self.url}/info", timeout=self.timeout).json()
        except (requests.RequestException, ValueError) as e:
            raise FrameworkError(f"reward.url={self.url!r}: no reward server answers ({self._why(e)}); {how}") from None
        served = (info.get("model") or {}).get("reward") if isinstance(info, dict) else None
        if not served:
            raise FrameworkError(f"reward.url={self.url!r}: the server there is not a framework reward server; {how}")
        return served

    def _why(self, e: Exception) -> str:
        if isinstance(e, requests.Timeout):
            return f"no answer within reward.timeout={self.timeout} s"
        if isinstance(e, requests.ConnectionError):
            return "cannot connect: nothing listens there, or the host is unreachable"
        return first_line(e)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        step = self.request_batch or len(images)
        scores = [self._request(images[i : i + step], prompts[i : i + step]) for i in range(0, len(images), step)]
        return torch.cat(scores).to(images.device)

    def _request(self, images: Tensor, prompts: list[str]) -> Tensor:
        """One request, retried after connection errors, timeouts and server errors; the last failure raises (and
        the runner fails the items of this batch, not the run)."""
        body = {"prompts": prompts, "images": encode_images(images, self.image_format)}
        for attempt in range(self.retries + 1):
            try:
                response = self.session.post(f"{self.url}{API_PATH}", json=body, timeout=self.timeout)
                if response.status_code < 500 or attempt == self.retries:
                    break
            except (requests.ConnectionError, requests.Timeout) as e:
                if attempt == self.retries:
                    raise ConnectionError(f"reward server {self.url}: {self._why(e)}") from e
            time.sleep(RETRY_DELAY * 2**attempt)
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
