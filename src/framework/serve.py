"""`python -m framework.serve reward=<name> [reward.key=value ...] [serve.key=value ...]`: one reward of the zoo over
HTTP, for runs elsewhere to score with (`reward=remote reward.url=http://<host>:<port>`, or in `eval.rewards`).

LitServe (the Lightning ecosystem's model server) runs it: `serve.workers` inference processes per device, each
building the reward once; requests arriving together are merged into one forward pass (`serve.max_batch_size`
requests, waiting at most `serve.batch_timeout` s for them). GET /health answers "ok" once the workers are ready;
GET /info names the reward; POST /predict scores (the wire format: framework.rewards.remote).

Each request stands alone: a malformed one gets 400 with the reason, one over a limit (body size, images, pixels per
image) 413 naming the limit, and a reward that fails on a request 500 with the reason; a merged pass that fails is
split until the failing request is alone, so its neighbours are still scored. With an API key (the environment
variable `serve.api_key_env` names) every endpoint but /health needs `Authorization: Bearer <key>` (401 otherwise,
before the body is read); without one only 127.0.0.1 is served.

Stopping the server (SIGTERM, Ctrl-C, or its process killed outright) ends every process it started and frees the
port. Exit codes as `framework.run`'s: 2 for bad input (one line on stderr, before serving: an unknown option, a
missing or unreadable weight file, a port in use, a device this machine lacks), 143 / 130 when stopped.
"""

import logging
import os
import signal
import socket
import sys
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import litserve as ls
import torch
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from omegaconf import MISSING

from framework.config.rewards import API_KEY_ENV, RewardConfig
from framework.core.errors import STOPPED, FrameworkError, described, first_line
from framework.core.guard import Guard, die_with_parent, forked_child, malformed_body
from framework.core.validation import COUNT, NON_NEGATIVE, POSITIVE, OneOf, Range, Text, valid
from framework.rewards.remote import API_PATH, TooLarge, decode_images

LOOPBACK = "127.0.0.1"
GRACE = 5.0  # seconds the HTTP processes get to finish their requests when the server stops


@dataclass
class ServeSettings:
    host: str = valid(LOOPBACK, OneOf((LOOPBACK, "0.0.0.0", "::")))  # 0.0.0.0 / ::: other machines (needs a key)
    port: int = valid(8000, Range(1024, 65535))
    device: str = valid("auto", OneOf(("auto", "cpu", "cuda")))  # auto: every GPU if there are any, else the CPU
    workers: int = valid(1, COUNT)  # inference processes per device
    max_batch_size: int = valid(4, COUNT)  # requests merged into one forward pass
    batch_timeout: float = valid(0.01, NON_NEGATIVE)  # seconds to wait for requests to merge
    timeout: float = valid(600.0, POSITIVE)  # seconds a request may take on the server before it answers 504
    # the environment variable holding the API key clients must send (unset or empty: none, and loopback only)
    api_key_env: str = valid(API_KEY_ENV, Text())
    # limits of one request (413 beyond them): its body, its images, the pixels of each image (2048²)
    max_request_mb: float = valid(64.0, POSITIVE)
    max_images: int = valid(16, COUNT)
    max_pixels: int = valid(2048 * 2048, COUNT)

    @staticmethod
    def relations(c, run):
        if c.host != LOOPBACK and not os.environ.get(c.api_key_env):
            yield (
                "serve.host",
                f"serving other machines needs an API key: set the environment variable {c.api_key_env} (clients "
                "send theirs from the same variable; put TLS in front across networks, see docs/configuration.md)",
            )
        if c.device == "cuda" and not torch.cuda.is_available():
            yield "serve.device", "this machine has no CUDA device (serve.device=cpu or auto)"


@dataclass
class ServeConfig:
    reward: RewardConfig = MISSING
    serve: ServeSettings = field(default_factory=ServeSettings)


@dataclass(frozen=True)
class Refusal:
    """A request that gets an error answer of its own, while the others of its merged pass are scored."""

    status: int
    detail: str


class RewardAPI(ls.LitAPI):
    """Scores requests with `reward_cfg`'s reward, built once per inference worker on its device. `parent`: the
    server's process, whose end ends the worker too."""

    def __init__(self, reward_cfg: RewardConfig, settings: ServeSettings, parent: int | None = None):
        super().__init__(
            max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout, api_path=API_PATH
        )
        self.reward_cfg, self.settings, self.parent = reward_cfg, settings, parent

    def setup(self, device):
        from framework.rewards import build_reward

        if self.parent is not None:
            die_with_parent(self.parent)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
        self.reward_device = torch.device(device)
        try:
            self.reward = build_reward(self.reward_cfg).to(self.reward_device)
        except Exception as e:  # one line says why (e.g. a corrupt weight file); LitServe then shuts down
            print(f"error: {e if isinstance(e, FrameworkError) else described(e)}", file=sys.stderr, flush=True)
            logging.getLogger("litserve.loops.loops").setLevel(logging.CRITICAL)  # not its traceback as well
            raise

    def decode_request(self, request: dict):
        """(images, prompts), or the Refusal of this request alone (raising would fail its whole merged pass)."""
        try:
            if missing := {"images", "prompts"} - set(request):
                raise ValueError(f"the request has no {' or '.join(sorted(missing))}")
            s = self.settings
            images = decode_images(request["images"], s.max_images, s.max_pixels)
            prompts = request["prompts"]
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompts must be a list of strings")
            if len(prompts) != len(images):
                raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        except TooLarge as e:
            return Refusal(413, f"request too large: {e}")
        except ValueError as e:
            return Refusal(400, f"malformed request: {first_line(e)}")
        return images, prompts

    def batch(self, requests):  # merged in predict, by image size
        return requests

    def predict(self, x):
        requests = x if self.max_batch_size > 1 else [x]
        answers = list(requests)  # Refusals stay as they are
        by_size = defaultdict(list)
        for i, request in enumerate(requests):
            if not isinstance(request, Refusal):
                by_size[tuple(request[0].shape[1:])].append(i)
        for indices in by_size.values():
            for i, answer in zip(indices, self._score([requests[i] for i in indices])):
                answers[i] = answer
        return answers if self.max_batch_size > 1 else answers[0]

    def _score(self, requests: list) -> list:
        """Each request's scores from one forward pass; if the pass fails, each half alone, until the request that
        fails is alone and gets its 500 with the reason."""
        try:
            with torch.no_grad():
                images = torch.cat([images for images, _ in requests]).to(self.reward_device)
                merged = self.reward(images, [p for _, prompts in requests for p in prompts]).float().cpu()
        except Exception as e:  # the reward failed on these images: say why, keep serving
            if len(requests) == 1:
                return [Refusal(500, first_line(e))]  # "reward <name> raised ..."
            half = len(requests) // 2
            return self._score(requests[:half]) + self._score(requests[half:])
        parts = merged.split([len(images) for images, _ in requests])
        non_finite = Refusal(500, f"reward {self.reward.name} returned a non-finite score for these images")
        return [part.tolist() if torch.isfinite(part).all() else non_finite for part in parts]

    def unbatch(self, output):
        return output

    def encode_response(self, scores):
        if isinstance(scores, Refusal):
            return JSONResponse({"detail": scores.detail}, status_code=scores.status)
        return {"scores": scores}


def announce_when_serving(app, line: str) -> None:
    """Print `line` when the first HTTP process starts (LitServe starts them once a worker has built the reward)."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app):
        async with inner(app) as state:
            if os.environ.get("LITSERVE_WORKER_ID") == "0":
                print(line, flush=True)
            yield state

    app.router.lifespan_context = lifespan


def limits(s: ServeSettings) -> dict:
    """The limits of one request, which /info tells clients (reward=remote splits its requests to fit them)."""
    return {"max_bytes": int(s.max_request_mb * 2**20), "max_images": s.max_images, "max_pixels": s.max_pixels}


def check_port(host: str, port: int) -> None:
    """One error line, before anything starts, if the port cannot be listened on (as uvicorn will bind it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise FrameworkError(
                f"serve.port={port}: cannot listen on {host}:{port} ({e.strerror}); another process uses it, or "
                "choose another serve.port"
            ) from None


def compose_config(overrides: list[str]) -> ServeConfig:
    """conf/serve.yaml with `overrides`, validated, and every weight the reward reads present (checked without
    loading: the workers load it)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from framework.config import compose
    from framework.config.rewards import required_weights
    from framework.core.weights import unavailable

    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)
    cfg = compose(overrides, "serve")
    if cfg.reward.name == "remote":
        raise FrameworkError("reward=remote: serve a reward of this machine (a server would only forward to another)")
    for kind, spec, key in required_weights(cfg.reward, "reward"):
        if why := unavailable(kind, spec):
            raise FrameworkError(f"{key}={spec!r}: {why}; put the weights there or set {key}")
    return OmegaConf.to_object(cfg)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = compose_config(sys.argv[1:] if argv is None else argv)
        check_port(cfg.serve.host, cfg.serve.port)
    except FrameworkError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s = cfg.serve
    server = ls.LitServer(
        RewardAPI(cfg.reward, s, parent=os.getpid()),
        accelerator=s.device,
        workers_per_device=s.workers,
        timeout=s.timeout,
        model_metadata={"reward": cfg.reward.name, "limits": limits(s)},
        middlewares=[(Guard, {"key": os.environ.get(s.api_key_env) or None, "max_bytes": limits(s)["max_bytes"]})],
    )
    server.app.add_exception_handler(RequestValidationError, malformed_body)
    server.uvicorn_graceful_timeout = GRACE
    os.register_at_fork(after_in_child=forked_child)  # LitServe's HTTP and manager processes
    received = []

    def stop(signum, frame):  # LitServe shuts its processes down on KeyboardInterrupt
        if not received:
            received.append(signal.Signals(signum).name)
            raise KeyboardInterrupt
        if signum == signal.SIGINT:  # a second Ctrl-C ends at once (the workers end with this process); a repeated
            os._exit(STOPPED["SIGINT"])  # SIGTERM (`timeout` sends one to the process and one to its group) waits

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"starting reward={cfg.reward.name} on {s.host}:{s.port} (the workers build the reward first)", flush=True)
    url = f"http://{f'[{s.host}]' if ':' in s.host else s.host}:{s.port}"
    announce_when_serving(
        server.app, f"serving reward={cfg.reward.name} at {url}: POST /predict; GET /info; GET /health"
    )
    try:
        server.run(host=s.host, port=s.port, generate_client_file=False, log_level="warning")
    except RuntimeError as e:
        if "failed to start" not in str(e):
            raise
        sys.exit(2)  # a worker could not build the reward: it said why
    except KeyboardInterrupt:  # stopped while starting: end now, and the workers with this process (not joined
        stopped(received, os._exit)  # as multiprocessing would at exit, waiting for them to build the reward)
    stopped(received, sys.exit)


def stopped(signals: list[str], exit) -> None:
    if signals:
        print(f"stopped: {signals[0]}; the server and its workers have ended", file=sys.stderr, flush=True)
        sys.stdout.flush()
        exit(STOPPED[signals[0]])


if __name__ == "__main__":
    main()
