"""What happens when things go wrong: failing and killed sweeps, SIGTERM, internal errors, out of memory, resumes
into a directory of another configuration, and legal but unusual input."""

import json
import math
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


def test_ctrl_c_stops_an_inference_run_after_its_finished_items_and_a_rerun_resumes(tmp_path):
    """SIGINT to the process group, as a terminal sends it: stopped like SIGTERM (the current batch discarded), 130."""
    run_dir = tmp_path / "run"
    # Two items per batch: the first batch is written together, Ctrl-C lands in the second, which is not written.
    args = [
        *FAST,
        "prompts=inline",
        "prompts.prompts=[a cat,a dog,a bird]",
        "method.opt_steps=5",
        "method.batch_size=2",
    ]
    process = start_cli(*args, run_dir=run_dir)
    wait_for(lambda: len(mtimes(run_dir)) >= 1, process)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    # the signal lands in the second batch, or (on a loaded machine) just before it starts: either way it is not run
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(("stopped: SIGINT during items p0002_s000", "stopped: SIGINT: stopped after the finished"))
    assert "Traceback" not in stderr
    assert json.loads((run_dir / "status.json").read_text())["exit_code"] == 130
    before = mtimes(run_dir)
    assert len(before) == 2 and not list((run_dir / "items").glob(".*"))  # the first batch, nothing half-written
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


def test_a_reward_that_raises_on_one_prompt_fails_that_item_and_the_others_finish(tmp_path):
    """The batch of four is split until the raising item is alone; its record keeps the error and the traceback."""
    (tmp_path / "picky.py").write_text(
        "def score(images, prompts):\n"
        "    if 'bad' in prompts:\n"
        "        raise ValueError('cannot score a bad prompt')\n"
        "    return images.mean((1, 2, 3))\n"
    )
    run_dir = tmp_path / "run"
    args = [
        *FAST,
        "method.opt_steps=2",
        "method.batch_size=4",
        "reward=callable",
        "reward.target=picky:score",
        "reward.differentiable=true",
        "prompts=inline",
        "prompts.prompts=[a cat,bad,a dog,a bird]",
    ]
    result = run_cli(*args, run_dir=run_dir, pythonpath=tmp_path)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # after the progress bars
        "error: 1 of 4 items failed: p0001_s000 (reward callable raised ValueError: cannot score a bad prompt) "
        f"(see {run_dir}/summary.json); a rerun retries them"
    )
    written = records(run_dir)
    assert written["p0001_s000"]["status"] == "failed"
    assert "raise ValueError('cannot score a bad prompt')" in written["p0001_s000"]["traceback"]
    assert [written[i]["status"] for i in ("p0000_s000", "p0002_s000", "p0003_s000")] == ["ok"] * 3
    assert {written[i]["compute"]["batch_items"] for i in ("p0000_s000", "p0002_s000", "p0003_s000")} == {1, 2}
    # A rerun retries only the failed item (it fails again); the finished ones are kept as they are.
    before = mtimes(run_dir)
    again = run_cli(*args, run_dir=run_dir, pythonpath=tmp_path)
    assert again.returncode == 3
    assert {k: v for k, v in mtimes(run_dir).items() if k != "p0001_s000"} == {
        k: v for k, v in before.items() if k != "p0001_s000"
    }


@pytest.mark.parametrize("method", ["base", "best_of_n"])
def test_a_reward_that_answers_nan_fails_that_item_and_the_others_finish(tmp_path, method):
    """A black-box reward whose score is NaN for one prompt: that item fails with the reason, the others are
    written, exit 3; no NaN is stored as a result."""
    (tmp_path / "nan_score.py").write_text(
        "import torch\n"
        "def score(images, prompts):\n"
        "    bad = torch.tensor([p == 'bad' for p in prompts])\n"
        "    return torch.where(bad, torch.nan, images.mean((1, 2, 3)))\n"
    )
    run_dir = tmp_path / "run"
    args = [*FAST, f"method={method}", "reward=callable", "reward.target=nan_score:score", "method.batch_size=3"]
    result = run_cli(*args, "prompts=inline", "prompts.prompts=[a cat,bad,a dog]", run_dir=run_dir, pythonpath=tmp_path)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: 1 of 3 items failed: p0001_s000 (the reward returned a non-finite score")
    written = records(run_dir)
    assert written["p0001_s000"]["status"] == "failed" and "nan" in written["p0001_s000"]["error"]
    assert [written[i]["status"] for i in ("p0000_s000", "p0002_s000")] == ["ok"] * 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_failed"] == 1 and math.isfinite(summary["final_reward_mean"])


def test_a_non_finite_candidate_score_fails_its_item():
    """Best-of-N's NaN candidate is never chosen (NaN > r is false), but its item is not a valid result either."""
    from framework.core.items import ItemResult

    steps = [{"step": 0, "reward": 0.5}, {"step": 1, "reward": math.nan}, {"step": 2, "reward": 0.7}]
    assert ItemResult(None, None, 0.5, 0.7, steps).non_finite_score() == (
        "the reward returned a non-finite score (nan) for step 1"
    )
    assert ItemResult(None, None, 0.5, math.inf).non_finite_score() == (
        "the reward returned a non-finite score (inf) for the final image"
    )
    assert ItemResult(None, None, 0.5, 0.7, steps[:1]).non_finite_score() is None


def test_a_metric_that_raises_fails_the_items_it_concerns(tmp_path, monkeypatch):
    from framework.metrics import ImageMetrics

    measure = ImageMetrics.measure

    def fragile(self, images, prompts, base=None):
        if "a dog" in prompts:
            raise RuntimeError("feature extractor broke")
        return measure(self, images, prompts, base)

    monkeypatch.setattr(ImageMetrics, "measure", fragile)
    run_dir = tmp_path / "run"
    result = run_cli(*FAST, "method=base", "method.batch_size=3", *PROMPTS, run_dir=run_dir)
    assert result.returncode == 3
    written = records(run_dir)
    assert written["p0001_s000"]["error"] == "a metric raised RuntimeError: feature extractor broke"
    assert [written[i]["status"] for i in ("p0000_s000", "p0002_s000", "p0003_s000")] == ["ok"] * 3


def test_a_bug_in_the_framework_is_an_internal_error_with_the_traceback_in_error_log(tmp_path, monkeypatch):
    """Outside the per-item work of rewards and metrics, an exception is a bug: the run ends, the traceback kept."""
    from framework.methods.common import Problem

    def broken(self, *args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(Problem, "render", broken)
    run_dir = tmp_path / "run"
    result = run_cli(*FAST, "method=base", "prompts=inline", "prompts.prompts=[a cat]", run_dir=run_dir)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"internal error: ZeroDivisionError: division by zero; full traceback in {run_dir}/error.log"
    )
    log = (run_dir / "error.log").read_text()
    assert log.startswith("Traceback") and "return 1 / 0" in log
    assert json.loads((run_dir / "status.json").read_text())["exit_code"] == 1


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
        pythonpath=tmp_path,
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

    from framework.runner.identity import fingerprint, identity_hash

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
    # The experiments name run directories by the same identity: same runs, same directory.
    assert identity_hash(compose(*base, *runtime)) == identity_hash(compose(*base))
    assert identity_hash(compose(*base, "seed=1")) != identity_hash(compose(*base))


def test_a_testbed_run_is_the_same_run_wherever_the_package_is_installed(monkeypatch, tmp_path):
    """The shipped testbed model's path (another checkout, another virtualenv) is not part of a run's identity."""
    from conftest import compose
    from omegaconf import OmegaConf

    from framework.runner import identity
    from framework.testbed import MODEL_DIR

    here = identity.identity_hash(compose("model=shapes"))
    assert "${testbed_model:}" in json.dumps(identity.run_identity(compose("model=shapes")))
    moved = tmp_path / "elsewhere" / "model"
    monkeypatch.setattr(identity, "MODEL_DIR", moved)
    OmegaConf.register_new_resolver("testbed_model", lambda: str(moved), replace=True)
    try:
        assert identity.identity_hash(compose("model=shapes")) == here
    finally:
        OmegaConf.register_new_resolver("testbed_model", lambda: str(MODEL_DIR), replace=True)


def test_a_rerun_with_another_adapter_or_eval_into_a_finished_run_is_refused_with_one_line(tmp_path):
    import torch

    from framework.config import ModelConfig
    from framework.config.families import UNET_LORA
    from framework.models import load_backbone
    from framework.models.lora import add_lora, save_lora

    def adapter(value):
        backbone = load_backbone(ModelConfig(kind="sd", tiny=True, resolution=32))
        for p in add_lora(backbone.unet, UNET_LORA, rank=2):
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

    result = subprocess.run(
        [sys.executable, "-m", "framework.analysis.report", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr == f"error: {tmp_path} has no finished item (items/*/record.json): give the directory of a "
        "framework.run run\n"
    )


def bad_adapters(directory):
    """name -> (adapter directory, what the error line says): every way an adapter file can be wrong."""
    import torch
    from safetensors.torch import load_file, save_file

    from framework.config import ModelConfig
    from framework.config.families import TRANSFORMER_LORA, UNET_LORA
    from framework.models import load_backbone
    from framework.models.lora import WEIGHT_NAME, add_lora, save_lora

    def model(kind):
        options = {"max_sequence_length": 16} if kind == "sd3" else {}
        return load_backbone(ModelConfig(kind=kind, tiny=True, resolution=32, **options))

    sd = model("sd")
    add_lora(sd.unet, UNET_LORA, rank=2)
    good = save_lora(sd, directory / "good")
    sd3 = model("sd3")
    add_lora(sd3.denoiser, TRANSFORMER_LORA, rank=2)
    save_lora(sd3, directory / "sd3")
    weights = load_file(good)
    cases = {
        "missing": (directory / "nowhere", "not found; train an adapter"),
        "sd3": (directory / "sd3", "not for this model's"),
    }

    def write(name, data, why):
        (directory / name).mkdir()
        if isinstance(data, bytes):
            (directory / name / WEIGHT_NAME).write_bytes(data)
        else:
            save_file(data, directory / name / WEIGHT_NAME)
        cases[name] = (directory / name, why)

    write("truncated", good.read_bytes()[: good.stat().st_size // 2], "not a complete safetensors file")
    write("pickle", b"\x80\x04\x95" + bytes(64), "not a complete safetensors file")
    renamed = {k.replace("attn1.to_q", "attn1.to_query"): v for k, v in weights.items()}
    write("unknown module", renamed, "attn1.to_query' is not a layer of this model's UNet2DConditionModel")
    write("not lora", {"unet.conv_in.weight": torch.zeros(2, 2)}, "is not a LoRA weight in diffusers' format")
    one_half = {k: v for k, v in weights.items() if "lora_B" not in k}
    write("half", one_half, "has lora_A without its other half")
    ranks = {k: (torch.zeros(v.shape[0], 3) if "lora_B" in k else v) for k, v in weights.items()}
    write("rank", ranks, "lora_A has rank 2, lora_B rank 3")
    wide = {k: (torch.zeros(v.shape[0] + 1, v.shape[1]) if "lora_B" in k else v) for k, v in weights.items()}
    write("shape", wide, "features in the adapter")
    return cases


def test_a_wrong_adapter_file_is_one_line_naming_it_before_any_sampling(tmp_path):
    for name, (adapter, why) in bad_adapters(tmp_path).items():
        run_dir = tmp_path / "runs" / name.replace(" ", "_")
        result = run_cli(*FAST, "method=lora_scale", f"method.adapter={adapter}", *PROMPTS, run_dir=run_dir)
        assert result.returncode == 2, (name, result.stderr)
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"error: method.adapter: {adapter}") and why in line, (name, line)
        assert not list(run_dir.glob("items/*")), name


def test_an_output_directory_that_cannot_be_written_is_one_line_before_models_load(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    (tmp_path / "a file").write_text("")
    below_a_file = tmp_path / "a file" / "run"
    result = run_cli(*FAST, "method=base", *PROMPTS, run_dir=below_a_file)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: cannot create or write {below_a_file} (Not a directory)")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    loaded = []
    monkeypatch.setattr("framework.models.load_backbone", lambda *a: loaded.append(a))
    monkeypatch.setattr(Path, "write_text", full)  # a full disk (or a read-only directory: the same path)
    result = run_cli(*FAST, "method=base", *PROMPTS, run_dir=tmp_path / "run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and not loaded
    assert result.stderr.startswith(f"error: cannot create or write {tmp_path / 'run'} (No space left on device)")


def test_a_write_that_fails_mid_run_keeps_finished_items_and_a_rerun_resumes(tmp_path, monkeypatch):
    import errno

    import framework.runner.store

    save_png = framework.runner.store.save_png

    def disk_fills(image, path):
        if "p0001_s000" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save_png(image, path)

    monkeypatch.setattr(framework.runner.store, "save_png", disk_fills)
    run_dir = tmp_path / "run"
    args = [*FAST, "method=base", "prompts=inline", "prompts.prompts=[a cat,a dog,a bird]"]
    result = run_cli(*args, run_dir=run_dir)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot write item p0001_s000 (No space left on device); the run stopped")
    assert sorted(p.name for p in (run_dir / "items").iterdir()) == ["p0000_s000"]  # nothing half-written
    before = mtimes(run_dir)
    monkeypatch.setattr(framework.runner.store, "save_png", save_png)  # space freed
    resumed = run_cli(*args, run_dir=run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert len(records(run_dir)) == 3 and mtimes(run_dir)["p0000_s000"] == before["p0000_s000"]


def test_an_unreadable_record_is_redone_and_an_unreadable_run_json_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, "method=base", "prompts=inline", "prompts.prompts=[a cat,a dog]"]
    assert run_cli(*args, run_dir=run_dir).returncode == 0
    before = mtimes(run_dir)
    (run_dir / "items" / "p0001_s000" / "record.json").write_text("{not json")  # edited by hand, say
    again = run_cli(*args, run_dir=run_dir)
    assert again.returncode == 0 and "p0001_s000: unreadable" in again.stdout + again.stderr
    after = mtimes(run_dir)
    assert after["p0000_s000"] == before["p0000_s000"] and after["p0001_s000"] != before["p0001_s000"]
    assert records(run_dir)["p0001_s000"]["status"] == "ok"
    (run_dir / "run.json").write_text("")
    broken = run_cli(*args, run_dir=run_dir)
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1
    assert broken.stderr.startswith(f"error: {run_dir / 'run.json'} is not readable")


def test_a_full_disk_anywhere_is_failed_work_not_a_bug(tmp_path, capsys):
    """E.g. DRaFT's checkpoint or a table hitting a full disk: exit 3 with one line, no error.log."""
    import errno

    from framework.core.errors import guarded

    def fill(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    code, line = guarded(lambda: fill(tmp_path / "checkpoints" / "last.ckpt"), tmp_path / "error.log")
    assert code == 3 and not (tmp_path / "error.log").exists()
    assert line.startswith(f"error: cannot create or write {tmp_path}/checkpoints/last.ckpt (No space left on device)")
    assert capsys.readouterr().err == line + "\n"
    code, _ = guarded(lambda: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")), tmp_path / "e.log")
    assert code == 1 and (tmp_path / "e.log").exists()  # any other OSError is still a bug
