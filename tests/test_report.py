"""Run reports from the item records: per-step curves (also W&B's history) and win rates between runs."""

import json

import pytest

from framework.analysis.report import step_curve, versus
from framework.core.errors import FrameworkError
from framework.core.records import ItemRecord
from framework.runner.tracking import _log_step_curves


def write_run(run_dir, finals, steps=((0.1, 0.0), (0.2, 0.5))):
    for i, final in enumerate(finals):
        item = run_dir / "items" / f"p{i // 2:04d}_s{i % 2:03d}"
        item.mkdir(parents=True)
        record = ItemRecord(
            item.name,
            i // 2,
            i % 2,
            f"prompt {i // 2}",
            i,
            "ok",
            final_reward=final,
            metrics={"final": {"eval_jpeg": -final, "drift_rmse": 1.0}},
            steps=[{"step": k, "reward": r + i, "drift_rmse": d} for k, (r, d) in enumerate(steps)],
        )
        (item / "record.json").write_text(record.dumps())
    return run_dir


class FakeRun:
    def __init__(self):
        self.history = {}

    def log(self, values, step):
        self.history[step] = values


def test_step_curves_average_items_and_end_with_the_final_record(tmp_path):
    run_dir = write_run(tmp_path / "a", [1.0, 3.0])
    rows = step_curve(run_dir, [0, 1, 2], ["reward", "drift_rmse"])
    assert [r["reward"] for r in rows] == pytest.approx([0.6, 0.7, 2.0])
    assert [r["drift_rmse"] for r in rows] == pytest.approx([0.0, 0.5, 1.0])
    fake = FakeRun()
    _log_step_curves(fake, run_dir)
    assert fake.history[1] == {"per_step/reward": pytest.approx(0.7), "per_step/drift_rmse": pytest.approx(0.5)}
    assert fake.history[2]["per_step/reward"] == pytest.approx(2.0)


def test_win_rate_between_runs_and_against_itself(tmp_path):
    a = write_run(tmp_path / "a", [1.0, 2.0, 3.0, 4.0])
    b = write_run(tmp_path / "b", [0.0, 2.0, 5.0, 1.0])
    result = versus(a, b)
    assert result["rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4) and result["items"] == 4
    assert versus(b, a)["rate"] == pytest.approx(1 - result["rate"])  # the tie is half a win each way
    assert 0 <= result["low"] <= result["rate"] <= result["high"] <= 1
    assert versus(a, b, "eval_jpeg")["rate"] == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    with pytest.raises(FrameworkError, match="no 'eval_hps' in both runs"):
        versus(a, b, "eval_hps")


def test_held_out_metrics_read_the_step_the_stopping_rule_chose(tmp_path):
    from framework.analysis.statistics import final_values

    run_dir = write_run(tmp_path / "run", [1.0, 2.0, 3.0])
    for item, step in zip(sorted((run_dir / "items").iterdir()), (0, 1, 2)):  # step 2 = opt_steps: the final image
        record = json.loads((item / "record.json").read_text())
        (item / "record.json").write_text(json.dumps(record | {"info": {"held_out_step": step}}))
    assert final_values(run_dir, "held_out.reward").tolist() == [0.1, 0.2 + 1, 3.0]
    assert final_values(run_dir, "held_out.drift_rmse").tolist() == [0.0, 0.5, 1.0]
    assert final_values(run_dir, "last.reward").tolist() == [0.2, 1.2, 2.2]
