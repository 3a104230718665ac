"""The table of a `--multirun` sweep (written by framework.run's SweepTable callback, conf/config.yaml): one row per
job, failed jobs included.

<sweep dir>/table.{csv,md,tex} holds every job of the sweep directory, rows labelled by the overrides that differ
between jobs, with a status column when a job did not finish (its one-line error, from <job dir>/status.json).
Rerunning a sweep into the same directory resumes every job (finished items are kept) and rewrites the table.
"""

import json
from pathlib import Path

import yaml

from framework.analysis.experiments import Run
from framework.analysis.tables import aggregate
from framework.core.errors import FAILED, OK
from framework.core.records import read_records

METRICS = ["reward", "drift_rmse", "evals", "seconds"]


def job_status(job_dir: Path) -> tuple[int | None, str]:
    """(exit code or None, what to show): "ok", the job's error line, or that it never ended (killed)."""
    path = job_dir / "status.json"
    if not path.is_file():
        return None, "did not finish (killed?); rerun the sweep into this directory to resume it"
    status = json.loads(path.read_text())
    return status["exit_code"], "ok" if status["exit_code"] == OK else status["error"].removeprefix("error: ")


def write_sweep_table(sweep_dir: Path) -> list[int]:
    """The table of the sweep directory's jobs, printed; returns their exit codes (FAILED for a job that never ended:
    jobs of other processes, submitit's, count too)."""
    jobs = sorted(
        (d for d in sweep_dir.iterdir() if (d / ".hydra" / "overrides.yaml").is_file()),
        key=lambda d: (len(d.name), d.name),
    )
    if not jobs:
        return []
    overrides = {d: yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or [] for d in jobs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
    runs, statuses, codes = [], {}, []
    for d in jobs:
        run = Run(" ".join(o for o in overrides[d] if o not in shared) or d.name, {}, overrides[d], "", d)
        code, statuses[run.name] = job_status(d)
        codes.append(FAILED if code is None else code)
        runs.append(run)
    metrics = list(METRICS)
    if any(r.final("adherence") is not None for d in jobs for r in read_records(d)):
        metrics.insert(1, "adherence")
    spec = {"title": f"sweep {sweep_dir}", "kind": "table", "metrics": metrics}
    written = aggregate("table", spec, runs, sweep_dir, statuses)
    print("\n" + written[1].read_text() + f"\nsweep table: {', '.join(map(str, written))}")
    return codes
