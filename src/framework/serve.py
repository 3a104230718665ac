"""`python -m framework.serve reward=<name> [reward.key=value ...] [serve.key=value ...]`: one reward of the zoo over
HTTP, for runs elsewhere to score with (`reward=remote reward.url=http://<host>:<port>`, or in `eval.rewards`).

LitServe (the Lightning ecosystem's model server) runs it: `serve.workers` inference processes per device, each
building the reward once; requests arriving together are merged into one forward pass (`serve.max_batch_size`
requests, waiting at most `serve.batch_timeout` s for them). GET /health answers "ok" once the workers are ready;
GET /info names the reward; POST /predict scores (the wire format: framework.rewards.remote). A malformed request
gets 400 and a reward that fails on a request 500, with the reason; the server keeps serving.

Exit codes as `framework.run`'s: 2 for bad input (an unknown option, a missing or unreadable weight file: one line
on stderr, before serving or from the worker that could not build the reward).
"""

import binascii
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import litserve as ls
import torch
from fastapi import HTTPException
from omegaconf import MISSING

from framework.errors import FrameworkError, described, first_line
from framework.rewards.registry import RewardConfig
from framework.rewards.remote import API_PATH, decode_images
from framework.validation import COUNT, NON_NEGATIVE, POSITIVE, OneOf, Range, Text, valid


@dataclass
class ServeSettings:
    host: str = valid("127.0.0.1", Text())  # 0.0.0.0 to accept other machines
    port: int = valid(8000, Range(1, 65535))
    device: str = valid("auto", OneOf(("auto", "cpu", "cuda")))  # auto: every GPU if there are any, else the CPU
    workers: int = valid(1, COUNT)  # inference processes per device
    max_batch_size: int = valid(4, COUNT)  # requests merged into one forward pass
    batch_timeout: float = valid(0.01, NON_NEGATIVE)  # seconds to wait for requests to merge
    timeout: float = valid(600.0, POSITIVE)  # seconds a request may take on the server before it answers 504


@dataclass
class ServeConfig:
    reward: RewardConfig = MISSING
    serve: ServeSettings = field(default_factory=ServeSettings)


class RewardAPI(ls.LitAPI):
    """Scores requests with `reward_cfg`'s reward, built once per inference worker on its device."""

    def __init__(self, reward_cfg: RewardConfig, settings: ServeSettings):
        super().__init__(
            max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout, api_path=API_PATH
        )
        self.reward_cfg = reward_cfg

    def setup(self, device):
        from framework.rewards import build_reward

        self.reward_device = torch.device(device)
        try:
            self.reward = build_reward(self.reward_cfg).to(self.reward_device)
        except Exception as e:  # one line says why (e.g. a corrupt weight file); LitServe then shuts down
            print(f"error: {e if isinstance(e, FrameworkError) else described(e)}", file=sys.stderr, flush=True)
            logging.getLogger("litserve.loops.loops").setLevel(logging.CRITICAL)  # not its traceback as well
            raise

    def decode_request(self, request: dict):
        try:
            if missing := {"images", "prompts"} - set(request):
                raise ValueError(f"the request has no {' or '.join(sorted(missing))}")
            images, prompts = decode_images(request["images"]), request["prompts"]
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompts must be a list of strings")
            if len(prompts) != len(images):
                raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise HTTPException(400, f"malformed request: {first_line(e)}") from None
        return images, prompts

    def batch(self, requests):  # merged in predict, by image size
        return requests

    def predict(self, x):
        requests = x if self.max_batch_size > 1 else [x]
        scores = [None] * len(requests)
        by_size = defaultdict(list)
        for i, (images, _) in enumerate(requests):
            by_size[tuple(images.shape[1:])].append(i)
        for indices in by_size.values():
            images = torch.cat([requests[i][0] for i in indices]).to(self.reward_device)
            prompts = [p for i in indices for p in requests[i][1]]
            try:
                with torch.no_grad():
                    merged = self.reward(images, prompts).float().cpu()
            except Exception as e:  # the reward failed on these images: tell the client why, keep serving
                raise HTTPException(500, first_line(e)) from None  # "reward <name> raised ..."
            for i, part in zip(indices, merged.split([len(requests[i][0]) for i in indices])):
                scores[i] = part.tolist()
        return scores if self.max_batch_size > 1 else scores[0]

    def unbatch(self, output):
        return output

    def encode_response(self, scores):
        return {"scores": scores}


def compose_config(overrides: list[str]) -> ServeConfig:
    """conf/serve.yaml with `overrides`, validated, and every weight the reward reads present (checked without
    loading: the workers load it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from framework.config import register_configs
    from framework.hydra_errors import compose_error
    from framework.options import CONF_DIR
    from framework.rewards.registry import required_weights
    from framework.validation import validate
    from framework.weights import unavailable

    register_configs()
    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("serve", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise compose_error(e) from None
    validate(cfg)
    if cfg.reward.name == "remote":
        raise FrameworkError("reward=remote: serve a reward of this machine (a server would only forward to another)")
    for kind, spec, key in required_weights(cfg.reward, "reward"):
        if why := unavailable(kind, spec):
            raise FrameworkError(f"{key}={spec!r}: {why}; put the weights there or set {key}")
    return OmegaConf.to_object(cfg)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = compose_config(sys.argv[1:] if argv is None else argv)
    except FrameworkError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s = cfg.serve
    server = ls.LitServer(
        RewardAPI(cfg.reward, s),
        accelerator=s.device,
        workers_per_device=s.workers,
        timeout=s.timeout,
        model_metadata={"reward": cfg.reward.name},
    )
    url = f"http://{s.host}:{s.port}"
    print(f"serving reward={cfg.reward.name} at {url}: POST /predict; GET /info; GET /health (ok once ready)")
    try:
        server.run(host=s.host, port=s.port, generate_client_file=False, log_level="warning")
    except RuntimeError as e:
        if "failed to start" not in str(e):
            raise
        sys.exit(2)  # a worker could not build the reward: it said why


if __name__ == "__main__":
    main()
