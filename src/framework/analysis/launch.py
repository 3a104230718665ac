"""Running an experiment's runs (`framework.analysis.experiments`): each in a process of its own, `jobs` at a
time, a run that reads another's directory after that one, and each run directory computed by one process at a time
(a lock in it, `.lock`), so that two `experiments` calls on the same outputs share the work instead of doing it twice.

Stopping: Ctrl-C or SIGTERM to the `experiments` process is passed to every run in progress (each stops as
`framework.run` does: after its finished items, exit 130 or 143), no run starts after it, and none is counted as
failed; then the call raises Interrupted (exit 130 or 143). A run stopped by someone else stops the call the same
way. A second Ctrl-C is passed on too, and the runs stop at once. A rerun finishes exactly what is missing.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import nullcontext
from pathlib import Path

from framework.core.errors import STOPPED, Interrupted
from framework.core.records import RunSummary

POLL = 0.5  # seconds between looks at runs another process holds


class Stopping:
    """The stop of the whole call: the signal's name once one arrived, and the run processes it must reach."""

    def __init__(self):
        self.signal: str | None = None
        self.processes: set[subprocess.Popen] = set()

    def handle(self, signum, frame) -> None:  # the signal handler, in the main thread
        self.signal = self.signal or signal.Signals(signum).name
        for process in list(self.processes):
            process.send_signal(signum)


STOPPING = Stopping()


def launch_process(overrides: list[str], threads: int | None = None) -> tuple[int, str]:
    """`framework.run` with these overrides in a process of its own (memory and failures stay with that run; its own
    session, so that a stop reaches it once, from here), on `threads` CPU threads (OMP_NUM_THREADS, unless the
    environment sets it): its exit code and stderr."""
    env = dict(os.environ)
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    command = [sys.executable, "-m", "framework.run", *overrides]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    STOPPING.processes.add(process)
    try:
        if STOPPING.signal:  # it arrived while this run was starting
            process.send_signal(getattr(signal, STOPPING.signal))
        _, stderr = process.communicate()
    finally:
        STOPPING.processes.discard(process)
    return process.returncode, stderr


def finished(run_dir: Path) -> bool:
    """Every item of the run finished and the run itself ended well (its summary, grid and W&B run written)."""
    try:
        status = json.loads((run_dir / "status.json").read_text())
        return RunSummary.load(run_dir).finished and status["exit_code"] == 0
    except (OSError, ValueError, KeyError, TypeError):  # absent, or written by hand
        return False


def ensure_run(run, group: str, launch: Callable[[list[str]], tuple[int, str]]) -> str | None:
    """Run (or resume) one configuration through `launch` (overrides -> exit code, stderr). Returns None, or the
    run's one-line error when it failed (its finished items are kept); a run that was stopped is not a failure: it
    stops the call."""
    print(f"running {run.name} in {run.dir}", flush=True)
    start = time.monotonic()
    code, stderr = launch([*run.overrides, f"logger.group={group}", f"hydra.run.dir={run.dir}"])
    if code == 0:
        print(f"  finished {run.name} in {time.monotonic() - start:.0f} s", flush=True)
        return None
    stopped_by = {exit_code: name for name, exit_code in STOPPED.items()}
    if STOPPING.signal or code in stopped_by:  # stopped from here (whatever it was doing), or by someone else
        STOPPING.signal = STOPPING.signal or stopped_by[code]
        print(f"  stopped {run.name}", flush=True)
        return None
    lines = [line for line in stderr.splitlines() if line.strip()]
    error = (lines or [f"exit code {code}"])[-1].removeprefix("error: ")
    print(f"  failed {run.name}: {error}", flush=True)
    return error


def claim(run_dir: Path):
    """The lock of a run directory (held until closed), or None while another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def run_missing(runs: list, launch: Callable, jobs: int = 1) -> dict[Path, str]:
    """Run or resume each distinct run that has not finished (with its W&B group: `runs` holds (run, group) pairs),
    `jobs` at a time; a run that reads another's directory starts after it; a run another process holds is taken up
    once it lets go, and skipped if finished then. Returns the failures: directory -> one-line error. With one job
    the runs go in this thread (a launcher that runs in-process, the tests', keeps the main thread)."""
    pending = list({run.dir: (run, group) for run, group in runs}.values())
    ours = {run.dir for run, _ in pending}
    done: set[Path] = set()  # finished, failed or skipped here
    failures, running = {}, {}  # future -> (run, lock)
    STOPPING.signal = None
    main = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    handlers = {s: signal.signal(s, STOPPING.handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}

    def end(run, lock, error: str | None) -> None:
        lock.close()
        done.add(run.dir)
        if error:
            failures[run.dir] = error

    try:
        with ThreadPoolExecutor(jobs) if jobs > 1 else nullcontext() as pool:
            while (pending and not STOPPING.signal) or running:
                startable = None
                for item in pending if len(running) < jobs and not STOPPING.signal else []:
                    run = item[0]
                    if all(need in done or need not in ours for need in run.needs):
                        if lock := claim(run.dir):
                            startable = item, lock
                            break
                if startable:
                    (run, group), lock = startable
                    pending.remove((run, group))
                    if finished(run.dir):
                        end(run, lock, None)
                    elif pool is None:
                        end(run, lock, ensure_run(run, group, launch))
                    else:
                        running[pool.submit(ensure_run, run, group, launch)] = run, lock
                elif running:
                    completed, _ = wait(running, timeout=POLL, return_when=FIRST_COMPLETED)
                    for future in completed:
                        end(*running.pop(future), future.result())
                else:  # what is left is held by another process
                    time.sleep(POLL)
    finally:
        for name, handler in handlers.items():
            signal.signal(name, handler)
    if STOPPING.signal:
        raise Interrupted(
            f" during experiments: the runs in progress stopped after their finished items, {len(pending)} did not "
            "start; rerun the same command to resume",
            STOPPING.signal,
        )
    return failures
