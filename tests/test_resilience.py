"""What happens when things go wrong: failing and killed sweeps, SIGTERM, internal errors, out of memory, resumes
into a directory of another configuration, and legal but unusual input."""

import json
import os
import signal

import pytest

from conftest import run_cli, start_cli, wait_for

FAST = ["model=tiny_sd", "model.resolution=32", "method.num_steps=3", "logger=none"]  # + method.opt_steps for MIRA
PROMPTS = ["prompts=inline", "prompts.prompts=[a cat,a dog,a bird,a fish]"]


def records(run_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "items").glob("*/record.json"))}


def mtimes(run_dir):
    return {p.parent.name: p.stat().st_mtime_ns for p in (run_dir / "items").glob("*/record.json")}


def read_table(path):
    import csv

    with open(path) as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_a_failing_job_leaves_the_rest_of_the_sweep_running_and_is_marked_in_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "--multirun",
        *FAST,
        "method.opt_steps=2",
        "prompts=inline",
        "prompts.prompts=[a cat]",
        "method.beta=0.1,-1,1",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 2  # the worst job: bad input
    assert result.stderr.count("error: ") == 1 and "method.beta=-1.0 is not valid" in result.stderr
    assert "Traceback" not in result.stderr
    assert records(sweep / "0") and records(sweep / "2") and not (sweep / "1" / "items").exists()
    table = read_table(sweep / "table.csv")
    assert table["method.beta=0.1"]["status"] == table["method.beta=1"]["status"] == "ok"
    assert table["method.beta=-1"]["status"].startswith("method.beta=-1.0 is not valid")
    assert "| method.beta=-1 | 0 |" in (sweep / "table.md").read_text()


def test_a_killed_sweep_rerun_into_its_directory_finishes_every_item_exactly_once(tmp_path):
    sweep, reference = tmp_path / "sweep", tmp_path / "reference"
    args = ["--multirun", *FAST, "method.opt_steps=2", *PROMPTS, "method.beta=0.1,1"]
    process = start_cli(*args, f"hydra.sweep.dir={sweep}")
    wait_for(lambda: len(list((sweep / "0" / "items").glob("*/record.json"))) >= 1, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = mtimes(sweep / "0")
    assert before and not (sweep / "1" / "summary.json").exists()  # killed before the sweep's last job finished
    stale = sweep / "0" / "items" / ".p0003_s000.999999999.tmp"  # as a kill mid-write leaves it (dead pid)
    stale.mkdir(exist_ok=True)

    resumed = run_cli(*args, f"hydra.sweep.dir={sweep}")
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = run_cli(*args, f"hydra.sweep.dir={reference}")
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert not stale.exists()
    for job in ("0", "1"):
        got, want = records(sweep / job), records(reference / job)
        assert sorted(got) == sorted(want) == ["p0000_s000", "p0001_s000", "p0002_s000", "p0003_s000"]
        for item in want:
            assert got[item]["final_reward"] == pytest.approx(want[item]["final_reward"], abs=1e-6)
    assert {k: v for k, v in mtimes(sweep / "0").items() if k in before} == before  # finished items not redone
    table, expected = read_table(sweep / "table.csv"), read_table(reference / "table.csv")
    for run in expected:
        assert float(table[run]["reward_mean"]) == pytest.approx(float(expected[run]["reward_mean"]), abs=1e-6)


def test_sigterm_stops_an_inference_run_after_its_finished_items_and_a_rerun_resumes(tmp_path):
    run_dir = tmp_path / "run"
    # Two items per batch: the first batch is written together, SIGTERM lands in the second, which is not written.
    args = [
        *FAST,
        "prompts=inline",
        "prompts.prompts=[a cat,a dog,a bird]",
        "method.opt_steps=5",
        "method.batch_size=2",
    ]
    process = start_cli(*args, run_dir=run_dir)
    wait_for(lambda: len(mtimes(run_dir)) >= 1, process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped: SIGTERM") and "Traceback" not in stderr
    assert json.loads((run_dir / "status.json").read_text())["exit_code"] == 143
    before = mtimes(run_dir)
    assert 1 <= len(before) < 3
    resumed = run_cli(*args, run_dir=run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert len(records(run_dir)) == 3 and {k: v for k, v in mtimes(run_dir).items() if k in before} == before


def test_sigterm_during_fine_tuning_saves_a_checkpoint_the_rerun_resumes_from(tmp_path):
    from test_finetune import train_log

    args = [
        "method=draft",
        *FAST,
        "method.train_steps=16",
        "method.save_every=1000",
        "method.sample_every=3",
        "method.train_batch_size=1",
        "method.lora_rank=4",
        "method.lr=0.01",
        "prompts=inline",
        "prompts.prompts=[a cat]",
    ]
    run_dir = tmp_path / "run"
    process = start_cli(*args, run_dir=run_dir)
    wait_for(lambda: (run_dir / "samples" / "step000003.png").exists(), process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped: SIGTERM at training step" in stderr and "Traceback" not in stderr
    import torch

    stopped_at = torch.load(run_dir / "checkpoints" / "interrupted.ckpt", weights_only=True)["global_step"]
    assert 3 <= stopped_at < 16 and not (run_dir / "adapter").exists()
    first_attempt = train_log(run_dir)

    resumed = run_cli(*args, run_dir=run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "adapter").exists() and len(records(run_dir)) == 1
    logs = sorted((run_dir / "train").glob("version_*/metrics.csv"))
    assert len(logs) == 2  # the second attempt logged steps stopped_at..15 only: nothing retrained, nothing skipped
    assert sorted(train_log(run_dir)) == list(range(16)) and set(first_attempt) <= set(range(stopped_at))


def test_an_internal_error_is_one_line_with_the_traceback_in_error_log(tmp_path):
    (tmp_path / "buggy.py").write_text("def score(images, prompts):\n    return 1 / 0\n")
    run_dir = tmp_path / "run"
    result = run_cli(
        *FAST,
        "method=base",
        "reward=callable",
        "reward.target=buggy:score",
        "prompts=inline",
        "prompts.prompts=[a cat]",
        run_dir=run_dir,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"internal error: ZeroDivisionError: division by zero; full traceback in {run_dir}/error.log"
    )
    log = (run_dir / "error.log").read_text()
    assert log.startswith("Traceback") and "return 1 / 0" in log


def test_out_of_memory_fails_that_item_with_a_hint_and_the_run_goes_on(tmp_path):
    (tmp_path / "greedy.py").write_text(
        "import torch\n"
        "def score(images, prompts):\n"
        "    if 'huge' in prompts:\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 80.00 GiB')\n"
        "    return images.mean((1, 2, 3))\n"
    )
    run_dir = tmp_path / "run"
    result = run_cli(
        *FAST,
        "method.opt_steps=2",
        "reward=callable",
        "reward.target=greedy:score",
        "reward.differentiable=true",
        "prompts=inline",
        "prompts.prompts=[a cat,huge,a dog]",
        run_dir=run_dir,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 3 and "Traceback" not in result.stderr
    written = records(run_dir)
    assert written["p0001_s000"]["status"] == "failed"
    assert written["p0001_s000"]["error"].startswith("out of memory (CUDA out of memory. Tried to allocate 80.00 GiB)")
    assert "method.batch_size" in written["p0001_s000"]["error"]
    assert written["p0000_s000"]["status"] == written["p0002_s000"]["status"] == "ok"
    compute = written["p0000_s000"]["compute"]
    assert compute["peak_memory_kind"] == "cpu_item_peak_rss" and compute["peak_memory_mb"] > 0


def test_the_fingerprint_covers_metrics_prompts_samples_and_the_adapter_content(tmp_path):
    from conftest import compose
    from framework.run import fingerprint

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"one")
    base = ["method=lora_scale", f"method.adapter={adapter}"]
    reference = fingerprint(compose(*base), ["a cat"])
    for change in (
        ["eval.rewards=[brightness]"],
        ["eval.features=none"],
        ["eval.cmmd_clip=none"],
        ["samples_per_prompt=2"],
        ["seed=1"],
        ["method.alpha=0.5"],
        ["reward.scale=2"],
    ):
        assert fingerprint(compose(*base, *change), ["a cat"]) != reference, change
    assert fingerprint(compose(*base), ["a dog"]) != reference
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"two")
    assert fingerprint(compose(*base), ["a cat"]) != reference
    runtime = ["logger=none", "trainer.devices=2", "method.batch_size=3", "model.vae_checkpointing=false"]
    runtime += ["model.unet_checkpointing=true", "model.channels_last=true", "model.compile=true"]
    assert fingerprint(compose(*base, *runtime), ["a cat"]) == fingerprint(compose(*base), ["a cat"])


def test_a_rerun_with_another_adapter_or_eval_into_a_finished_run_is_refused_with_one_line(tmp_path):
    import torch

    from framework.config import ModelConfig
    from framework.models import load_backbone
    from framework.models.lora import add_lora, save_lora

    def adapter(value):
        backbone = load_backbone(ModelConfig(kind="sd", tiny=True, resolution=32))
        for p in add_lora(backbone.unet, rank=2):
            p.data = torch.full_like(p, value)
        save_lora(backbone, tmp_path / "adapter")

    adapter(0.01)
    run_dir = tmp_path / "run"
    args = [
        *FAST,
        "method=lora_scale",
        f"method.adapter={tmp_path / 'adapter'}",
        "prompts=inline",
        "prompts.prompts=[a cat]",
    ]
    assert run_cli(*args, run_dir=run_dir).returncode == 0

    def assert_refused(result, changed):
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert f"holds results of a different configuration (changed: {changed});" in result.stderr

    assert_refused(run_cli(*args, "eval.rewards=[brightness]", run_dir=run_dir), "eval.rewards")
    adapter(0.02)
    assert_refused(run_cli(*args, run_dir=run_dir), "adapter_sha1")


def test_unicode_and_overlong_prompts_and_a_directory_with_spaces_work(tmp_path):
    long = "a very detailed photograph of " + ", ".join(f"a small red cube number {i}" for i in range(20))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"un chat sur la plage, été 🐱\n{long}\n", encoding="utf-8")
    run_dir = tmp_path / "my runs" / "first try"
    result = run_cli(*FAST, "method.opt_steps=2", "prompts=file", f"prompts.path={prompts}", run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    assert [r["prompt"] for r in records(run_dir).values()] == ["un chat sur la plage, été 🐱", long]
    warnings = [
        line for line in (result.stdout + result.stderr).splitlines() if "tokens; CLIP reads the first 77" in line
    ]
    assert len(warnings) == 1 and "a very detailed photograph" in warnings[0]
    assert (run_dir / "grid.png").exists()


def test_report_on_a_directory_without_results_says_so(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "framework.report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr == f"error: {tmp_path} has no finished item (items/*/record.json): give the directory of a "
        "framework.run run\n"
    )
