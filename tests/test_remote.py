"""Rewards served elsewhere: `python -m framework.serve` as a real server process on localhost, and `reward=remote`
scoring through it (the in-process reward as the reference); servers that are down, slow or wrong."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import torch
from conftest import REPO, run_cli

from framework.errors import FrameworkError, ItemError
from framework.rewards import build_reward
from framework.rewards.registry import RewardConfig
from framework.rewards.remote import RemoteReward, decode_images, encode_images

PROMPTS = ["a cat", "a red circle", "a dog"]
FAST = ["model=tiny_sd", "model.resolution=32", "method.num_steps=3", "logger=none"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(*overrides: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A reward server in its own session (so that killing its group kills its LitServe workers too), once it
    answers /health."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "framework.serve", *overrides, f"serve.port={port}", "serve.device=cpu"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
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
    process, url = start_server("reward=tiny_imagereward", "serve.max_batch_size=4")
    yield url
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


def test_malformed_requests_get_400_with_the_reason_and_the_server_keeps_serving(server):
    post = lambda body: requests.post(f"{server}/predict", json=body, timeout=30)  # noqa: E731
    bad_shape = {"prompts": ["a"], "images": {"format": "tensor", "shape": [1, 3, 8], "data": ""}}
    assert post(bad_shape).status_code == 400
    assert (
        post(bad_shape).json()["detail"]
        == "malformed request: tensor images must have shape [B, 3, H, W], not [1, 3, 8]"
    )
    assert post({"prompts": ["a"]}).json()["detail"] == "malformed request: the request has no images"
    images = encode_images(torch.rand(2, 3, 32, 32), "png")
    assert post({"prompts": ["a"], "images": images}).json()["detail"] == "malformed request: 1 prompts for 2 images"
    assert len(post({"prompts": ["a", "b"], "images": images}).json()["scores"]) == 2


def test_a_remote_reward_scores_as_a_held_out_reward(server, tmp_path):
    """eval.rewards=[remote]: the held-out score is the served reward's score of the saved image (and close to the
    in-process score of the float image, which the run optimised)."""
    from framework.images import load_png

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


class FakeServer(BaseHTTPRequestHandler):
    """A server that claims to serve a reward and then misbehaves: `mode` slow | wrong_shape | error."""

    mode = "slow"

    def do_GET(self):
        self._send(200, {"model": {"reward": "fake"}} if self.path == "/info" else "ok")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "slow":
            time.sleep(1.0)
        n = len(body["prompts"])
        if self.mode == "error":
            return self._send(500, {"detail": "reward fake: out of memory"})
        self._send(200, {"scores": [0.0] * (n + 1 if self.mode == "wrong_shape" else n)})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "mode, message",
    [
        ("slow", r"raised ConnectionError: reward server http://127\.0\.0\.1:\d+: no answer within reward\.timeout"),
        ("wrong_shape", r"raised ValueError: reward server .* returned \[0\.0, 0\.0, 0\.0\] for 2 images"),
        ("error", r"raised RuntimeError: reward server .* answered 500: reward fake: out of memory$"),
    ],
)  # fmt: skip
def test_slow_wrong_and_failing_servers_fail_the_request_with_one_line(mode, message):
    handler = type("Handler", (FakeServer,), {"mode": mode})
    fake = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        reward = build_reward(RewardConfig(name="remote", url=url, timeout=0.3, retries=1))
        started = time.monotonic()
        with pytest.raises(ItemError, match=f"^reward remote {message}"):
            reward(torch.rand(2, 3, 8, 8), PROMPTS[:2])
        assert time.monotonic() - started < 10  # never a hang: (retries + 1) × timeout plus the back-off
    finally:
        fake.shutdown()


def test_no_server_or_a_foreign_one_is_one_error_line_at_start():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(FrameworkError, match=rf"^reward\.url='{url}': no reward server answers \(cannot connect"):
        RemoteReward(url, timeout=1, retries=0, image_format="png", request_batch=0)
    handler = type("Handler", (FakeServer,), {"do_GET": lambda self: self._send(200, {"name": "other"})})
    other = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        with pytest.raises(FrameworkError, match="the server there is not a framework reward server"):
            RemoteReward(url, timeout=1, retries=0, image_format="png", request_batch=0)
    finally:
        other.shutdown()


def test_the_serve_command_refuses_bad_input_with_one_line():
    from framework.serve import compose_config

    with pytest.raises(FrameworkError, match=r"reward=nope: no such option; choose from: aesthetic"):
        compose_config(["reward=nope"])
    with pytest.raises(FrameworkError, match=r"unknown option serve\.gpus; valid keys of serve: batch_timeout"):
        compose_config(["reward=brightness", "+serve.gpus=2"])
    with pytest.raises(FrameworkError, match=r"reward\.checkpoint='/nowhere/ImageReward\.pt': not found"):
        compose_config(["reward=imagereward", "reward.checkpoint=/nowhere/ImageReward.pt"])
    assert compose_config(["reward=tiny_hps", "serve.port=9000"]).serve.port == 9000


def test_a_reward_the_server_cannot_build_ends_it_with_one_line(tmp_path):
    """The weights are there (the check before serving passes) but unreadable: the worker says why; exit 2."""
    from framework.models.tokenizer import build_bert_tokenizer

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


def test_the_server_merges_requests_by_image_size_and_reports_a_failing_reward(tmp_path, monkeypatch):
    """The LitAPI in this process: requests of two sizes merged into two forward passes, each request getting its
    own scores; a reward that raises answers 500 with the reason."""
    from fastapi import HTTPException

    from framework.serve import RewardAPI, ServeSettings

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
    with pytest.raises(HTTPException) as failure:
        api.predict(api.batch([(small[:1], ["bad"])]))
    assert failure.value.status_code == 500
    assert failure.value.detail == "reward callable raised ValueError: cannot score a bad prompt"
