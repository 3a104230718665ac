"""Rewards served elsewhere: `python -m framework.serve` as a real server process on localhost, and `reward=remote`
scoring through it (the in-process reward as the reference); servers that are down, slow or wrong."""

import base64
import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch
from conftest import REPO, run_cli
from PIL import Image

from framework.config.rewards import RewardConfig
from framework.core.errors import FrameworkError, ItemError
from framework.rewards import build_reward
from framework.rewards.remote import RemoteReward, decode_images, encode_images

PROMPTS = ["a cat", "a red circle", "a dog"]
FAST = ["model=tiny_sd", "model.resolution=32", "method.num_steps=3", "logger=none"]
KEY = "test-key-0123"  # the API key of the module's server
AUTH, JSON = {"Authorization": f"Bearer {KEY}"}, {"Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(*overrides: str, port: int | None = None, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """A reward server in its own session (so that its process group is exactly its processes), once it answers
    /health."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "framework.serve", *overrides, f"serve.port={port}", "serve.device=cpu"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        try:
            if requests.get(f"{url}/health", timeout=1).text == "ok":
                return process, url
        except requests.RequestException:
            pass
        if process.poll() is not None:
            raise AssertionError(f"the server ended (exit {process.returncode}): {process.stderr.read()}")
        if time.monotonic() > deadline:
            kill(process)
            raise AssertionError("the server did not start")
        time.sleep(0.2)


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def server():
    """A server that requires an API key, with small limits; this process's clients send the key (the environment
    variable both sides read)."""
    limits = ["serve.max_images=4", "serve.max_pixels=4096", "serve.max_request_mb=1"]
    process, url = start_server(
        "reward=tiny_imagereward", "serve.max_batch_size=4", *limits, env={"REWARD_SERVER_KEY": KEY}
    )
    os.environ["REWARD_SERVER_KEY"] = KEY
    yield url
    del os.environ["REWARD_SERVER_KEY"]
    kill(process)


def test_the_remote_score_equals_the_in_process_score(server):
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    local = build_reward(RewardConfig(name="imagereward", tiny=True))
    exact = build_reward(RewardConfig(name="remote", url=server, image_format="tensor"))
    png = build_reward(RewardConfig(name="remote", url=server, request_batch=2))  # two requests: 2 + 1 images
    assert exact.served == "imagereward" and not exact.differentiable
    assert not exact(images.clone().requires_grad_(), PROMPTS).requires_grad  # a black box: no gradient comes back
    with torch.no_grad():
        torch.testing.assert_close(exact(images, PROMPTS), local(images, PROMPTS), rtol=0, atol=1e-6)
        # PNG: the score of the 8-bit image a run saves (and not, at this scale, of the float one)
        quantised = decode_images(encode_images(images, "png"))
        torch.testing.assert_close(png(images, PROMPTS), local(quantised, PROMPTS), rtol=0, atol=1e-6)
        assert (quantised - images).abs().max() <= 0.5 / 255 + 1e-6
    # Requests arriving together are merged by the server (LitServe batching): the scores stay each request's own.
    results = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, exact(images[i : i + 1], PROMPTS[i : i + 1])))
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.testing.assert_close(torch.cat([results[i] for i in range(3)]), local(images, PROMPTS), rtol=0, atol=1e-6)


def png_payload(*sizes: tuple[int, int], fmt: str = "PNG") -> dict:
    files = []
    for height, width in sizes:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format=fmt)
        files.append(base64.b64encode(buffer.getvalue()).decode())
    return {"format": "png", "data": files}


def tensor_payload(images: torch.Tensor, shape=None, data=None) -> dict:
    raw = base64.b64encode(images.numpy().astype("<f4").tobytes()).decode()
    return {
        "format": "tensor",
        "shape": list(images.shape) if shape is None else shape,
        "data": raw if data is None else data,
    }


BAD_REQUESTS = {  # body -> (status, the reason's start)
    "tensor data shorter than its shape": (
        {"prompts": ["a"], "images": tensor_payload(torch.rand(1, 3, 8, 8), data="AAAA")},
        400, "malformed request: tensor data holds 3 bytes; float32 images of shape [1, 3, 8, 8] take 768",
    ),
    "a shape of three axes": (
        {"prompts": ["a"], "images": tensor_payload(torch.rand(1, 3, 8, 8), shape=[1, 3, 8])},
        400, "malformed request: tensor images must have shape [B, 3, H, W]",
    ),
    "NaN pixels": (
        {"prompts": ["a"], "images": tensor_payload(torch.full((1, 3, 4, 4), math.nan))},
        400, "malformed request: tensor images hold NaN or infinite values",
    ),
    "no PNG files": ({"prompts": [], "images": png_payload()}, 400, "malformed request: the request holds no images"),
    "a JPEG as png": (
        {"prompts": ["a"], "images": png_payload((8, 8), fmt="JPEG")}, 400, "malformed request: an image is not a PNG",
    ),
    "not base64": (
        {"prompts": ["a"], "images": {"format": "png", "data": ["@@"]}}, 400, "malformed request: images.data is not",
    ),
    "no images": ({"prompts": ["a"]}, 400, "malformed request: the request has no images"),
    "prompts that are not text": (
        {"prompts": [1], "images": png_payload((8, 8))}, 400, "malformed request: prompts must be a list of strings",
    ),
    "fewer prompts than images": (
        {"prompts": ["a"], "images": png_payload((8, 8), (8, 8))}, 400, "malformed request: 1 prompts for 2 images",
    ),
    "a JSON list": ([1, 2], 400, "malformed request: the body is not a JSON object"),
    "too many images": (
        {"prompts": ["a"] * 5, "images": png_payload(*[(8, 8)] * 5)},
        413, "request too large: 5 images in one request; the server takes at most serve.max_images=4",
    ),
    "a small PNG of a large image": (
        {"prompts": ["a"], "images": png_payload((100, 100))},  # a flat 10,000-pixel image in a file of ~100 bytes
        413, "request too large: an image of 10000 pixels; the server takes at most serve.max_pixels=4096",
    ),
}  # fmt: skip


def test_the_client_splits_its_requests_to_fit_the_servers_limits(server):
    """/info tells the limits; a batch of 6 goes to a server taking 4 images per request as 4 + 2, scored as in
    process. A body limit splits by the images' encoded size (float32 tensors: 4 bytes per value, base64)."""
    reward = build_reward(RewardConfig(name="remote", url=server, image_format="tensor"))
    assert reward.limits == {"max_bytes": 2**20, "max_images": 4, "max_pixels": 4096}
    sent, post = [], reward.session.post
    reward.session.post = lambda url, json, **kw: sent.append(len(json["prompts"])) or post(url, json=json, **kw)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    local = build_reward(RewardConfig(name="imagereward", tiny=True))
    with torch.no_grad():
        torch.testing.assert_close(reward(images, ["a cat"] * 6), local(images, ["a cat"] * 6), rtol=0, atol=1e-6)
    assert sent == [4, 2]
    reward.limits = {"max_bytes": 2**20, "max_images": 100}
    assert reward._fitting(torch.rand(10, 3, 64, 64)) == 14  # ⌊0.9 · 2²⁰ / (4/3 · 4 · 12288 + 1024)⌋
    reward.image_format = "png"  # 8-bit: a quarter of the bytes
    assert reward._fitting(torch.rand(10, 3, 64, 64)) == 54


def test_malformed_or_oversized_requests_are_refused_with_the_reason_and_the_server_keeps_serving(server):
    post = lambda body, **kw: requests.post(f"{server}/predict", json=body, headers=AUTH, timeout=30, **kw)  # noqa: E731
    for case, (body, status, reason) in BAD_REQUESTS.items():
        response = post(body)
        assert (response.status_code, response.json()["detail"][: len(reason)]) == (status, reason), case
    for raw, reason in [(b"{not json", "not valid JSON"), (b"", "empty")]:
        response = requests.post(f"{server}/predict", data=raw, headers=AUTH | JSON, timeout=30)
        assert (response.status_code, response.json()["detail"]) == (
            400, f'malformed request: the body is {reason}; send {{"prompts": [...], "images": {{...}}}}',
        )  # fmt: skip
    too_large = "request too large: the body exceeds serve.max_request_mb=1"
    response = requests.post(f"{server}/predict", data=b" " * (2**20 + 1), headers=AUTH | JSON, timeout=30)
    assert (response.status_code, response.json()["detail"]) == (413, too_large)  # refused by its Content-Length
    chunks = (b" " * 2**16 for _ in range(20))  # no Content-Length: counted as it arrives
    response = requests.post(f"{server}/predict", data=chunks, headers=AUTH | JSON, timeout=30)
    assert (response.status_code, response.json()["detail"]) == (413, too_large)
    assert len(post({"prompts": ["a", "b"], "images": png_payload((8, 8), (8, 8))}).json()["scores"]) == 2


def test_the_api_key_is_required_everywhere_but_health_and_sent_by_the_client(server, monkeypatch):
    ok = {"prompts": ["a"], "images": png_payload((8, 8))}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = requests.post(f"{server}/predict", json=ok, headers=headers, timeout=30)
        assert response.status_code == 401 and "API key" in response.json()["detail"]
        assert requests.get(f"{server}/info", headers=headers, timeout=30).status_code == 401
    assert requests.get(f"{server}/health", timeout=30).text == "ok"  # probes need no key
    assert build_reward(RewardConfig(name="remote", url=server)).served == "imagereward"  # sends REWARD_SERVER_KEY
    monkeypatch.setenv("REWARD_SERVER_KEY", "wrong")
    with pytest.raises(FrameworkError, match=r"the server refused the API key in the environment variable REWARD_SERV"):
        build_reward(RewardConfig(name="remote", url=server))
    monkeypatch.delenv("REWARD_SERVER_KEY")
    with pytest.raises(FrameworkError, match=r"the server requires an API key: set the environment variable REWARD_"):
        build_reward(RewardConfig(name="remote", url=server))
    monkeypatch.setenv("JUDGE_KEY", KEY)  # another variable, named by the client's config
    assert build_reward(RewardConfig(name="remote", url=server, api_key_env="JUDGE_KEY")).served == "imagereward"


def test_a_remote_reward_scores_as_a_held_out_reward(server, tmp_path):
    """eval.rewards=[remote]: the held-out score is the served reward's score of the saved image (and close to the
    in-process score of the float image, which the run optimised)."""
    from framework.core.images import load_png

    run_dir = tmp_path / "run"
    args = [*FAST, "method=base", "reward=tiny_imagereward", "eval.rewards=[remote]", f"eval.remote_url={server}"]
    result = run_cli(*args, "prompts=inline", "prompts.prompts=[a cat,a dog]", run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    local = build_reward(RewardConfig(name="imagereward", tiny=True))
    for item in (run_dir / "items").iterdir():
        record = json.loads((item / "record.json").read_text())
        with torch.no_grad():
            saved = local(load_png(item / "final.png")[None], [record["prompt"]]).item()
        assert record["metrics"]["final"]["eval_remote"] == pytest.approx(saved, abs=1e-6)
        assert record["metrics"]["final"]["eval_remote"] == pytest.approx(record["final_reward"], abs=1e-3)


@pytest.mark.parametrize("method", ["dno_zo", "mira_dpo"])
def test_the_zeroth_order_noise_methods_optimise_through_a_served_reward(server, tmp_path, method):
    run_dir = tmp_path / method
    args = [*FAST, f"method={method}", "method.opt_steps=2", "reward=remote", f"reward.url={server}"]
    result = run_cli(*args, "prompts=inline", "prompts.prompts=[a cat]", run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "items" / "p0000_s000" / "record.json").read_text())
    assert record["status"] == "ok" and len(record["steps"]) == 2 and record["compute"]["evals"] > 0


def test_grpo_fine_tunes_through_a_served_reward(server, tmp_path):
    """Online RL needs no reward gradient: a served reward scores GRPO's rollouts, each epoch's group in batches."""
    args = [*FAST, "method=grpo", "method.train_steps=1", "method.group_size=2", "method.prompts_per_epoch=1"]
    args += ["method.rollout_steps=2", "method.lora_rank=2", "method.sample_every=0", "method.batch_size=1"]
    result = run_cli(
        *args,
        "reward=remote",
        f"reward.url={server}",
        "prompts=inline",
        "prompts.prompts=[a cat]",
        run_dir=tmp_path / "run",
    )
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "run" / "train" / "version_0" / "metrics.csv") as f:
        assert "train/reward" in f.readline()
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()


class FakeServer(BaseHTTPRequestHandler):
    """A server that claims to serve a reward and then misbehaves: `mode` slow | wrong_shape | error (500: the reward
    failed on these images) | busy (503: not ready, overloaded) | nan (NaN scores, as Python's json writes them).
    `posts` counts the scoring requests it got."""

    mode, posts = "slow", 0

    def do_GET(self):
        self._send(200, {"model": {"reward": "fake"}} if self.path == "/info" else "ok")

    def do_POST(self):
        type(self).posts += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "slow":
            time.sleep(1.0)
        n = len(body["prompts"])
        if self.mode in ("error", "busy"):
            status, detail = (500, "reward fake raised ValueError: no") if self.mode == "error" else (503, "busy")
            return self._send(status, {"detail": detail})
        score = math.nan if self.mode == "nan" else 0.0
        self._send(200, {"scores": [score] * (n + 1 if self.mode == "wrong_shape" else n)})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def fake_server(mode: str):
    handler = type("Handler", (FakeServer,), {"mode": mode, "posts": 0})
    fake = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{fake.server_address[1]}", handler
    finally:
        fake.shutdown()


@pytest.mark.parametrize(
    "mode, message, posts",
    [
        ("slow", r"raised ConnectionError: reward server http://127\.0\.0\.1:\d+: no answer within reward\.timeout", 2),
        ("wrong_shape", r"raised ValueError: reward server .* returned \[0\.0, 0\.0, 0\.0\] for 2 images", 1),
        ("error", r"raised RuntimeError: reward server .* answered 500: reward fake raised ValueError: no$", 1),
        ("busy", r"raised RuntimeError: reward server .* answered 503: busy$", 2),
    ],
)  # fmt: skip
def test_slow_wrong_and_failing_servers_fail_the_request_with_one_line(mode, message, posts):
    """Timeouts and 503 are retried (retries=1: two requests); a reward that failed on the images (500) or a wrong
    answer is not, since the same request would fail the same way."""
    with fake_server(mode) as (url, handler):
        reward = build_reward(RewardConfig(name="remote", url=url, timeout=0.3, retries=1))
        started = time.monotonic()
        with pytest.raises(ItemError, match=f"^reward remote {message}"):
            reward(torch.rand(2, 3, 8, 8), PROMPTS[:2])
        assert time.monotonic() - started < 10  # never a hang: (retries + 1) × timeout plus the back-off
        assert handler.posts == posts


@pytest.mark.parametrize("method", ["base", "best_of_n"])
def test_a_server_answering_nan_fails_the_items_and_stores_no_nan(method, tmp_path):
    with fake_server("nan") as (url, _):
        run_dir = tmp_path / "run"
        args = [*FAST, f"method={method}", "reward=remote", f"reward.url={url}", "prompts=inline"]
        result = run_cli(*args, "prompts.prompts=[a cat,a dog]", run_dir=run_dir)
    assert result.returncode == 3
    assert "2 of 2 items failed" in result.stderr and "non-finite score (nan)" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_ok"] == 0 and {row["status"] for row in summary["items"]} == {"failed"}


def test_no_server_or_a_foreign_one_is_one_error_line_at_start():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(FrameworkError, match=rf"^reward\.url='{url}': no reward server answers \(cannot connect"):
        RemoteReward(url, timeout=1, retries=0, image_format="png", request_batch=0, api_key_env="NO_SUCH_KEY")
    handler = type("Handler", (FakeServer,), {"do_GET": lambda self: self._send(200, {"name": "other"})})
    other = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        with pytest.raises(FrameworkError, match="the server there is not a framework reward server"):
            RemoteReward(url, timeout=1, retries=0, image_format="png", request_batch=0, api_key_env="NO_SUCH_KEY")
    finally:
        other.shutdown()


def test_a_held_out_remote_reward_without_a_server_names_eval_remote_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    args = [*FAST, "method=base", "eval.rewards=[remote]", f"eval.remote_url={url}", "prompts=inline"]
    result = run_cli(*args, "prompts.prompts=[a cat]", run_dir=tmp_path / "run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        f"error: eval.rewards=remote (conf/reward/remote.yaml): eval.remote_url='{url}': no"
    )
    assert result.stderr.strip().endswith("or set eval.remote_url")


def test_the_serve_command_refuses_bad_input_with_one_line(monkeypatch):
    from framework.serve import compose_config

    with pytest.raises(FrameworkError, match=r"reward=nope: no such option; choose from: aesthetic"):
        compose_config(["reward=nope"])
    with pytest.raises(FrameworkError, match=r"unknown option serve\.gpus; valid keys of serve: api_key_env, batch_"):
        compose_config(["reward=brightness", "+serve.gpus=2"])
    with pytest.raises(FrameworkError, match=r"reward\.checkpoint='/nowhere/ImageReward\.pt': not found"):
        compose_config(["reward=imagereward", "reward.checkpoint=/nowhere/ImageReward.pt"])
    # what LitServe would refuse with a traceback, refused here with one line: a privileged port, a host it cannot
    # bind, a device this machine lacks
    with pytest.raises(FrameworkError, match=r"^serve\.port=80 is not valid; it must be in \[1024, 65535\]$"):
        compose_config(["reward=brightness", "serve.port=80"])
    with pytest.raises(FrameworkError, match=r"^serve\.host='localhost' is not valid; choose from: 127\.0\.0\.1, 0\."):
        compose_config(["reward=brightness", "serve.host=localhost"])
    if not torch.cuda.is_available():
        with pytest.raises(FrameworkError, match=r"^serve\.device='cuda' is not valid; this machine has no CUDA"):
            compose_config(["reward=brightness", "serve.device=cuda"])
    # other machines only with a key
    monkeypatch.delenv("REWARD_SERVER_KEY", raising=False)
    with pytest.raises(FrameworkError, match=r"serving other machines needs an API key: set the environment variable"):
        compose_config(["reward=brightness", "serve.host=0.0.0.0"])
    monkeypatch.setenv("REWARD_SERVER_KEY", "k")
    assert compose_config(["reward=brightness", "serve.host=0.0.0.0"]).serve.host == "0.0.0.0"
    assert compose_config(["reward=tiny_hps", "serve.port=9000"]).serve.port == 9000


def test_a_port_in_use_is_one_line_before_anything_starts():
    from conftest import call_main

    from framework.serve import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = call_main(main, "reward=brightness", f"serve.port={port}")
    assert result.returncode == 2 and result.stdout == ""  # nothing says "starting"
    assert result.stderr == (
        f"error: serve.port={port}: cannot listen on 127.0.0.1:{port} (Address already in use); another process uses "
        "it, or choose another serve.port\n"
    )


def test_a_reward_the_server_cannot_build_ends_it_with_one_line(tmp_path):
    """The weights are there (the check before serving passes) but unreadable: the worker says why; exit 2."""
    from framework.core.tokenizer import build_bert_tokenizer

    (tmp_path / "ImageReward.pt").write_bytes(b"not a checkpoint")
    build_bert_tokenizer().save_pretrained(tmp_path / "bert")
    args = [
        "reward=imagereward",
        f"reward.checkpoint={tmp_path / 'ImageReward.pt'}",
        f"reward.processor={tmp_path / 'bert'}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "framework.serve", *args, f"serve.port={free_port()}", "serve.device=cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: reward.checkpoint: cannot load '{tmp_path / 'ImageReward.pt'}'")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def group_members(pgid: int) -> list[int]:
    """The processes of process group `pgid`, from /proc (zombies included: a process not yet reaped is still there)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(name)": state, ppid, pgrp, ...
        except OSError:  # it ended meanwhile
            continue
        if int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize(
    "how, signal_, whole_group, code",
    [("SIGTERM to the server", signal.SIGTERM, False, 143), ("Ctrl-C in its terminal", signal.SIGINT, True, 130),
     ("the server killed outright", signal.SIGKILL, False, -9)],
)  # fmt: skip
def test_stopping_the_server_ends_every_process_it_started_and_frees_the_port(how, signal_, whole_group, code):
    """The server, LitServe's manager, its HTTP process, its inference worker and multiprocessing's resource tracker,
    in the server's own session: after the stop none is left (by the process group) and the port can be bound again,
    within seconds."""
    port = free_port()
    process, _ = start_server("reward=brightness", port=port)
    assert len(group_members(process.pid)) >= 5
    (os.killpg if whole_group else os.kill)(process.pid, signal_)
    assert process.wait(timeout=30) == code
    deadline = time.monotonic() + 15
    while left := group_members(process.pid):
        assert time.monotonic() < deadline, f"left running: {left}"
        time.sleep(0.1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # free again
    if code > 0:
        assert process.stderr.read().strip() == f"stopped: {signal_.name}; the server and its workers have ended"


@pytest.mark.slow
def test_a_run_survives_its_reward_server_dying_and_a_rerun_resumes(tmp_path, monkeypatch):
    """Best-of-N scoring through a real server that is killed (its whole process group) as the second item is about
    to be scored: the first item is finished and kept, the two others fail with the connection error and the run
    exits 3; against a new server the rerun redoes only them."""
    port = free_port()
    first, url = start_server("reward=tiny_imagereward", port=port)
    request = RemoteReward._request

    def dies_before_a_dog(self, images, prompts):
        if "a dog" in prompts and first.poll() is None:
            kill(first)
        return request(self, images, prompts)

    monkeypatch.setattr(RemoteReward, "_request", dies_before_a_dog)
    run_dir = tmp_path / "run"
    args = [*FAST, "method=best_of_n", "method.n=3", "method.batch_size=1", "reward=remote", f"reward.url={url}"]
    args += ["reward.retries=1", "prompts=inline", "prompts.prompts=[a cat,a dog,a bird]"]
    result = run_cli(*args, run_dir=run_dir)
    assert result.returncode == 3, result.stderr
    assert "2 of 3 items failed" in result.stderr and "cannot connect" in result.stderr
    written = {p.parent.name: json.loads(p.read_text()) for p in (run_dir / "items").glob("*/record.json")}
    assert {k: r["status"] for k, r in written.items()} == {
        "p0000_s000": "ok",
        "p0001_s000": "failed",
        "p0002_s000": "failed",
    }
    kept = (run_dir / "items" / "p0000_s000" / "record.json").stat().st_mtime_ns
    second, url = start_server("reward=tiny_imagereward", port=port)
    try:
        again = run_cli(*args, run_dir=run_dir)
    finally:
        kill(second)
    assert again.returncode == 0, again.stderr
    written = {p.parent.name: json.loads(p.read_text()) for p in (run_dir / "items").glob("*/record.json")}
    assert {r["status"] for r in written.values()} == {"ok"}
    assert (run_dir / "items" / "p0000_s000" / "record.json").stat().st_mtime_ns == kept


def test_the_server_merges_requests_by_image_size_and_a_failing_request_fails_alone(tmp_path, monkeypatch):
    """The LitAPI in this process: requests of two sizes merged into two forward passes, each request getting its
    own scores; a pass that fails is split until the failing request is alone, which gets its 500 with the reason,
    and a malformed one its 400, while their neighbours are scored."""
    from fastapi.responses import JSONResponse

    from framework.serve import Refusal, RewardAPI, ServeSettings

    (tmp_path / "picky.py").write_text(
        "def score(images, prompts):\n"
        "    if 'bad' in prompts:\n"
        "        raise ValueError('cannot score a bad prompt')\n"
        "    return images.mean((1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    api = RewardAPI(RewardConfig(name="callable", target="picky:score"), ServeSettings(max_batch_size=4))
    api.setup("cpu")
    calls, score = [], api.reward.score
    monkeypatch.setattr(
        api.reward, "score", lambda images, prompts: calls.append(len(images)) or score(images, prompts)
    )
    small, large = torch.rand(3, 3, 8, 8), torch.rand(2, 3, 16, 16)
    requests_ = [(small[:2], ["a", "b"]), (large, ["c", "d"]), (small[2:], ["e"])]
    scores = api.predict(api.batch(requests_))
    assert sorted(calls) == [2, 3]  # one pass per image size
    for (images, _), got in zip(requests_, api.unbatch(scores)):
        torch.testing.assert_close(torch.tensor(got), images.mean((1, 2, 3)))

    calls.clear()
    malformed = api.decode_request({"prompts": ["x"], "images": {"format": "png", "data": []}})
    poisoned = [(small[:2], ["a", "b"]), (small[2:], ["bad"]), malformed, (small[:1], ["c"])]
    answers = api.unbatch(api.predict(api.batch(poisoned)))
    assert calls == [4, 2, 2, 1, 1]  # the merged pass (4 images), its halves (by request), the bad half in halves
    torch.testing.assert_close(torch.tensor(answers[0]), small[:2].mean((1, 2, 3)))
    torch.testing.assert_close(torch.tensor(answers[3]), small[:1].mean((1, 2, 3)))
    assert answers[1] == Refusal(500, "reward callable raised ValueError: cannot score a bad prompt")
    assert answers[2] == Refusal(400, "malformed request: the request holds no images")
    response = api.encode_response(answers[1])
    assert isinstance(response, JSONResponse) and response.status_code == 500
    assert json.loads(response.body) == {"detail": "reward callable raised ValueError: cannot score a bad prompt"}
    assert api.encode_response(answers[0]) == {"scores": answers[0]}


def test_a_served_reward_is_an_ensemble_member(server):
    """An ensemble of the served tiny ImageReward and the same reward in-process: both members score alike, so their
    mean is the in-process score and they never disagree; a served member makes the ensemble a black box."""
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    served = {"name": "remote", "url": server, "image_format": "tensor"}
    cfg = RewardConfig(name="ensemble", members=[served, "tiny_imagereward"], normalise="none")
    ensemble, local = build_reward(cfg), build_reward(RewardConfig(name="imagereward", tiny=True))
    assert not ensemble.differentiable and list(ensemble.members) == ["remote", "tiny_imagereward"]
    with torch.no_grad():
        scores, disagreement = ensemble.scored(images, PROMPTS)
        torch.testing.assert_close(scores, local(images, PROMPTS), rtol=0, atol=1e-6)
    assert disagreement.abs().max() < 1e-5
