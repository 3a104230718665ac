"""End-to-end: `python -m framework.run` in subprocesses, as a user types it."""

import json

import pytest
from conftest import REBATCHED, run_cli, run_nodes, run_process

QUICK = ["model=tiny_sd", "method.num_steps=3", "method.opt_steps=2", "prompts=inline", "prompts.prompts=[a cat,a dog]"]


def records(run_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "items").glob("*/record.json"))}


def test_run_writes_items_summary_and_wandb_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(*QUICK, run_dir=run_dir)
    assert first.returncode == 0, first.stderr
    assert "2/2 items ok" in first.stdout and f"images:  {run_dir}/items" in first.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    written = records(run_dir)
    assert set(written) == {"p0000_s000", "p0001_s000"}
    for row in summary["items"]:
        record = written[row["id"]]
        assert record["status"] == "ok" and row["final_reward"] == record["final_reward"]
        assert len(record["steps"]) == 2 and record["compute"]["evals"] == 2 * (3 + 3) + 3
        assert (run_dir / "items" / row["id"] / "final.png").stat().st_size > 0
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run_dir / ".hydra" / "config.yaml").exists()

    # A rerun skips finished items; a deleted item is redone, and only it.
    mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "items").glob("*/record.json")}
    (run_dir / "items" / "p0001_s000" / "record.json").unlink()
    second = run_cli(*QUICK, run_dir=run_dir)
    assert second.returncode == 0, second.stderr
    kept = run_dir / "items" / "p0000_s000" / "record.json"
    assert kept.stat().st_mtime_ns == mtimes[kept]
    redone = records(run_dir)["p0001_s000"]  # alone now, in a batch of two before
    assert redone["final_reward"] == pytest.approx(written["p0001_s000"]["final_reward"], abs=REBATCHED)
    assert redone["compute"]["batch_items"] == 1 and written["p0001_s000"]["compute"]["batch_items"] == 2

    changed = run_cli(*QUICK, "method.lr=0.5", run_dir=run_dir)
    assert changed.returncode == 2
    assert "holds results of a different configuration (changed: method.lr)" in changed.stderr


ERRORS = {
    "missing model weights": (
        ["model=sd15"],
        2,
        "model.source: weights for 'stable-diffusion-v1-5/stable-diffusion"
        "-v1-5' are not in the local Hugging Face cache",
    ),
    "missing reward weights": (
        ["reward=aesthetic"],
        2,
        "reward.checkpoint: weight file 'weights/sac+logos+ava1-l14-linearMSE.pth' not found",
    ),
    "unknown option": (["method=dpo"], 2, "method=dpo: no such option; choose from: aig, base"),
    "unknown key": (["+method.learning_rate=1"], 2, "unknown option method.learning_rate"),
    "non-differentiable reward": (["reward=jpeg"], 2, "reward jpeg is not differentiable"),
    "empty prompts file": (["prompts=file", "prompts.path={tmp}/empty.txt"], 2, "holds no prompts"),
    "malformed prompts file": (["prompts=file", "prompts.path={tmp}/bad.json"], 2, "is not valid JSON"),
    "a reward target that is no function": (
        ["reward=callable", "reward.target=math:pi", "reward.differentiable=true"],
        2,
        "reward.target='math:pi' cannot be imported as 'package.module:function': pi of math is a float",
    ),
    "a device this machine lacks": (["trainer.accelerator=mps"], 2, "trainer.accelerator='mps': `MPSAccelerator`"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_gives_one_clear_error_line(case, tmp_path):
    overrides, code, message = ERRORS[case]
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.json").write_text("[1, ")
    result = run_cli(*[o.format(tmp=tmp_path) for o in overrides], "logger=none", run_dir=tmp_path / "run")
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr
    if code == 2:
        assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")


def test_nan_loss_marks_the_item_failed_and_keeps_the_others(tmp_path):
    (tmp_path / "nan_reward.py").write_text(
        "import torch\n"
        "def score(images, prompts):\n"
        "    bad = torch.tensor([p == 'bad' for p in prompts], dtype=images.dtype)\n"
        "    return images.mean((1, 2, 3)) / (1 - bad)  * (1 - bad)\n"
    )
    run_dir = tmp_path / "run"
    result = run_cli(
        "model=tiny_sd",
        "reward=callable",
        "reward.target=nan_reward:score",
        "reward.differentiable=true",
        "method.num_steps=3",
        "method.opt_steps=2",
        "prompts=inline",
        "prompts.prompts=[a cat,bad,a dog]",
        "logger=none",
        run_dir=run_dir,
        pythonpath=tmp_path,
    )
    assert result.returncode == 3 and "Traceback" not in result.stderr
    # the error on a line of its own (no progress bar drawn into a log before it): `grep ^error:` finds it
    assert result.stderr.startswith("error: 1 of 3 items failed") and result.stderr.count("\n") == 1
    written = records(run_dir)
    assert written["p0001_s000"]["status"] == "failed" and "non-finite loss" in written["p0001_s000"]["error"]
    assert written["p0000_s000"]["status"] == written["p0002_s000"]["status"] == "ok"
    assert (run_dir / "items" / "p0002_s000" / "final.png").exists()
    assert "FAILED: non-finite loss" in result.stdout


def test_two_processes_and_two_nodes_equal_one_process(tmp_path):
    """Items sharded over 2 DDP processes started by Lightning (trainer.devices=2), then over 2 "nodes" started as a
    multi-node launch does (torchrun): each item's result equals the single-process run's. The shards run other
    batches than the single process (rank 0: items 0 and 2), so floats agree to the rounding of rebatched float32
    kernels, not bitwise."""
    common = [
        "model=tiny_sd",
        "method.num_steps=3",
        "method.opt_steps=2",
        "prompts=inline",
        "prompts.prompts=[a cat,a dog,a bird]",
        "logger=none",
    ]
    single = run_cli(*common, run_dir=tmp_path / "one")
    two = run_process(
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        run_dir=tmp_path / "two",
        env={"OMP_NUM_THREADS": "1"},
    )
    nodes = run_nodes(*common, run_dir=tmp_path / "nodes")
    assert single.returncode == two.returncode == 0, two.stderr
    assert [node.returncode for node in nodes] == [0, 0], nodes[0].stderr + nodes[1].stderr
    assert "3/3 items ok" in nodes[0].stdout and nodes[1].stdout == ""  # rank 0 summarises
    one = records(tmp_path / "one")
    for other in ("two", "nodes"):
        sharded = records(tmp_path / other)
        assert set(one) == set(sharded) == {"p0000_s000", "p0001_s000", "p0002_s000"}, other
        for item in one:
            assert one[item]["seed"] == sharded[item]["seed"]
            assert one[item]["final_reward"] == pytest.approx(sharded[item]["final_reward"], abs=REBATCHED)
            steps = [s["reward"] for s in sharded[item]["steps"]]
            assert [s["reward"] for s in one[item]["steps"]] == pytest.approx(steps, abs=REBATCHED)


def test_a_testbed_run_mixing_captions_and_free_text_finishes_and_logs(tmp_path):
    """Adherence and gold exist for the testbed's captions only: the free-text item has none, and the console
    summary, summary.json and W&B take the run as it is."""
    run_dir = tmp_path / "run"
    result = run_cli("method=base", "prompts=inline", "prompts.prompts=[a red circle,hello world]", run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    assert "2/2 items ok" in result.stdout
    [free_text] = [line for line in result.stdout.splitlines() if "hello world" in line]
    assert "—" in free_text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_adherence_mean"] == 1.0  # over the one caption
    assert "adherence" not in records(run_dir)["p0001_s000"]["metrics"]["final"]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
