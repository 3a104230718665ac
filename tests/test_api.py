"""The Python API (framework.api, docs/python.md): compose, execute, load_run and load_tables, against the command
line's runs."""

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

import framework
from framework.analysis.tables import write_tables

DNO = ["method=dno", "reward=saturation", "method.num_steps=6", "method.opt_steps=3", "method.lr=0.05"]
DNO += ["prompts.limit=2", "logger=none"]


def test_importing_framework_is_enough_for_hydras_own_compose():
    """In a fresh interpreter, with no call of ours but the import, as a notebook user composes."""
    code = (
        "import framework\n"
        "from hydra import compose, initialize_config_dir, initialize_config_module\n"
        f"with initialize_config_dir(config_dir={str(REPO / 'conf')!r}, version_base='1.3'):\n"
        "    print(compose('config', overrides=['model=sd15_arch']).model.kind)\n"
        "with initialize_config_module('framework.conf', version_base='1.3'):\n"
        "    print(compose('config', overrides=['method=grpo']).method.name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sd", "grpo"]


def test_execute_equals_the_command_line_and_resumes(tmp_path):
    cli_dir, api_dir = tmp_path / "cli", tmp_path / "api"
    assert run_cli(*DNO, run_dir=cli_dir).returncode == 0
    cfg = framework.compose([*DNO, f"hydra.run.dir={api_dir}"])
    assert cfg.output_dir == str(api_dir)
    run = framework.execute(cfg)
    cli = framework.load_run(cli_dir)
    assert [r.id for r in run.records] == [r.id for r in cli.records] == ["p0000_s000", "p0001_s000"]
    for mine, theirs in zip(run.records, cli.records):
        assert mine.status == "ok" and mine.final_reward > mine.base_reward
        for key in ("base_reward", "final_reward", "metrics", "steps", "info"):
            assert getattr(mine, key) == getattr(theirs, key), key
    assert run.summary.final_reward_mean == cli.summary.final_reward_mean
    assert json.loads((api_dir / "status.json").read_text()) == {"exit_code": 0, "error": None}
    assert run.config.method.name == cli.config.method.name == "dno" and cli.config.output_dir == str(cli_dir)
    rows = run.rows()
    assert rows[0]["final_reward"] == run.records[0].final_reward and "final_adherence" in rows[0]
    assert [s["step"] for s in run.steps()] == [0, 1, 2] * 2 and run.image("p0001_s000").is_file()
    written = {p: p.stat().st_mtime_ns for p in api_dir.glob("items/*/record.json")}
    again = framework.execute(framework.compose([*DNO, f"hydra.run.dir={api_dir}"]))
    assert {p: p.stat().st_mtime_ns for p in api_dir.glob("items/*/record.json")} == written  # nothing redone
    assert [r.final_reward for r in again.records] == [r.final_reward for r in run.records]


def test_bad_input_raises_one_line_naming_the_key_and_exits_nothing():
    cases = {
        "method.lr=-1": "method.lr=-1.0 is not valid; it must be > 0",
        "method.bogus=1": "unknown option method.bogus",
        "method=nope": "method=nope: no such option",
        "method=[mira,dno]": "a config group takes one option",
    }
    for override, message in cases.items():
        with pytest.raises(framework.FrameworkError, match=re.escape(message)) as caught:
            framework.compose(["method=dno", override])
        assert "\n" not in str(caught.value)
    cfg = framework.compose(["trainer.devices=2"])
    with pytest.raises(framework.FrameworkError, match="several processes start from the command line"):
        framework.execute(cfg)
    cfg.method.lr = -1.0  # changed after composing: execute validates again
    with pytest.raises(framework.FrameworkError, match=re.escape("method.lr=-1.0 is not valid")):
        framework.execute(cfg)


def test_a_hydra_the_caller_initialised_is_restored():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert framework.compose(["method=mira"]).method.name == "mira"
        assert compose("config", overrides=["method=dno"]).method.name == "dno"  # the caller's Hydra still there


def test_failed_items_raise_failure_and_load_run_reads_them(tmp_path, monkeypatch):
    (tmp_path / "picky_api.py").write_text(
        "def score(images, prompts):\n"
        "    if 'bad' in prompts:\n"
        "        raise ValueError('cannot score a bad prompt')\n"
        "    return images.mean((1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = ["model=tiny_sd", "model.resolution=32", "method=base", "method.num_steps=2", "logger=none"]
    overrides += ["reward=callable", "reward.target=picky_api:score", "prompts=inline", "prompts.prompts=[a cat,bad]"]
    cfg = framework.compose([*overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(framework.Failure, match="1 of 2 items failed: p0001_s000"):
        framework.execute(cfg)
    run = framework.load_run(tmp_path / "run")
    assert [r.status for r in run.records] == ["ok", "failed"] and "cannot score" in run.records[1].error
    assert run.summary.num_failed == 1
    assert json.loads((tmp_path / "run" / "status.json").read_text())["exit_code"] == 3
    with pytest.raises(framework.FrameworkError, match="not a run directory"):
        framework.load_run(tmp_path)


def test_load_tables_reads_what_the_experiments_write(tmp_path):
    folder = tmp_path / "tables" / "testbed"
    folder.mkdir(parents=True)
    rows = [{"run": "Base", "items": 4, "gold": (0.5, 0.4, 0.6)}, {"run": "DNO", "items": 4, "gold": (0.3, 0.2, 0.4)}]
    write_tables(rows, ["gold"], "title", folder / "demo")
    write_tables(rows[:1], ["gold"], "title", folder / "demo_peaks")
    write_tables(rows[:1], ["gold"], "title", folder / "demonstration")  # another experiment's name starts alike
    tables = framework.load_tables("demo", out=tmp_path)
    assert sorted(tables) == ["demo", "demo_peaks"]
    assert tables["demo"][1] == {"run": "DNO", "items": 4, "gold_mean": 0.3, "gold_low": 0.2, "gold_high": 0.4}
    with pytest.raises(framework.FrameworkError, match="make reproduce-tables SCALE=paper EXPERIMENT=demo"):
        framework.load_tables("demo", scale="paper", out=tmp_path)


def test_the_python_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/python.md's examples, in order, in one namespace, from an empty directory (an over-optimisation table
    written as the experiment writes it)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "outputs" / "tables" / "testbed"
    folder.mkdir(parents=True)
    rows = [{"run": "Base", "items": 24, "gold": (0.631, 0.599, 0.665)}]
    write_tables(rows, ["gold"], "over-optimisation", folder / "overoptimisation")
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "python.md").read_text(), re.S)
    assert len(blocks) >= 6
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/python.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "method.lr=-1.0 is not valid; it must be > 0" in out and "Base         gold 0.631 [0.599, 0.665]" in out
    assert namespace["raw"].model.kind == "sd" and math.isfinite(namespace["swept"].summary.final_reward_mean)
