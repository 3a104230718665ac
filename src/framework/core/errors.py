"""What can go wrong, and the one exit-code policy of `framework.run`, `framework.analysis.report` and
`framework.analysis.experiments`.

    0    everything finished
    2    bad input the user can fix (a config value, a missing weight, a prompt file): nothing ran
    3    some work failed (items with a NaN loss or out of memory, failed runs); what finished is written, a rerun
         retries the rest
    1    internal error (a bug): one line on stderr, the traceback in an error.log it names
    143  stopped by SIGTERM after saving what was finished (the conventional 128 + 15); a rerun resumes
    130  stopped by Ctrl-C (SIGINT, 128 + 2), the same way

Every problem prints exactly one line on stderr, never a traceback wall.
"""

import argparse
import errno
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

OK, INTERNAL_ERROR, BAD_INPUT, FAILED = 0, 1, 2, 3
STOPPED = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number


def first_line(e: BaseException) -> str:
    """An exception's message as one line: its first line, or its type's name when it has no message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def described(e: BaseException) -> str:
    """ "Type: first line of the message" (the type alone when there is no message)."""
    return f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse under this policy: a bad argument is one `error:` line and exit 2 (argparse's own prints its usage
    first, so the error is not the line a log's reader or `grep ^error:` finds)."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(BAD_INPUT)


class FrameworkError(Exception):
    """A problem the user can fix (bad input, missing weights, incompatible options)."""


class Failure(Exception):
    """Work that did not succeed although the input was valid; what finished stays written."""


class NonFiniteLoss(Failure):
    """The loss of one item became NaN/inf; that item is marked failed and the run goes on."""


class ItemError(Failure):
    """An exception raised inside an item's own work by code the framework calls but does not own: a reward (a user's
    callable, a reward model) or a metric. The runner splits the batch until the item that raises it fails alone; the
    others finish. `cause` keeps the original exception (its traceback goes into the item's record)."""

    def __init__(self, where: str, cause: BaseException):
        super().__init__(f"{where} raised {described(cause)}")
        self.cause = cause


@contextmanager
def item_work(where: str):
    """Any exception inside the block becomes an ItemError naming `where` (e.g. "reward hps"), except bad input (a
    FrameworkError, e.g. a prompt the reward cannot read), which stays what it is."""
    try:
        yield
    except (ItemError, FrameworkError):
        raise
    except Exception as e:
        raise ItemError(where, e) from e


class Interrupted(Exception):
    """A stop signal arrived (framework.core.signals): the run stopped cleanly after saving what finished. The message
    starts with the signal's name; `code` is its exit code."""

    def __init__(self, message: str, signal: str | None = None):
        from framework.core.signals import name

        self.signal = signal or name()
        super().__init__(f"{self.signal}{message}")

    @property
    def code(self) -> int:
        return STOPPED[self.signal]


class StorageError(Failure):
    """A result could not be written mid-run (e.g. the disk filled): the run stops, what finished stays written."""


def unwritable(e: OSError, where=None) -> str:
    """The one line for an output location (`where`, else the file the error names) that cannot be created or
    written."""
    where = where or e.filename or "the run directory"
    return (
        f"cannot create or write {where} ({e.strerror or e}): give a writable directory with hydra.run.dir=... "
        "(sweeps: hydra.sweep.dir=...)"
    )


def worst(codes) -> int:
    """The exit code of several jobs: an internal error over bad input over failed work over success."""
    order = (INTERNAL_ERROR, BAD_INPUT, FAILED, *STOPPED.values())
    return min((c for c in codes if c), key=order.index, default=OK)


def process_error_log() -> Path:
    """Where the traceback of an internal error outside any run directory goes."""
    return Path(tempfile.gettempdir()) / f"framework-{os.getpid()}-error.log"


def guarded(work: Callable[[], object], error_log: Path) -> tuple[int, str | None]:
    """Run `work` and map what it raises to (exit code, the one line printed on stderr); the traceback of an
    unexpected exception goes to `error_log`."""
    try:
        work()
        return OK, None
    except (Exception, KeyboardInterrupt) as e:
        code, line = outcome(e, error_log)
    print(line, file=sys.stderr, flush=True)
    return code, line


def outcome(e: BaseException, error_log: Path) -> tuple[int, str]:
    """What exception `e` means under this policy: (exit code, its one line); a bug's traceback goes to `error_log`."""
    if isinstance(e, FrameworkError):
        return BAD_INPUT, f"error: {e}"
    if isinstance(e, Failure):
        return FAILED, f"error: {e}"
    if isinstance(e, Interrupted):
        return e.code, f"stopped: {e}"
    if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C, or one outside the loops: at once, nothing half-written
        return STOPPED["SIGINT"], "stopped: Ctrl-C; finished items are kept, rerun the same command to resume"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk anywhere (a checkpoint, a
        # table): what finished was written atomically, so it stays valid
        return FAILED, f"error: {unwritable(e)}; what finished is kept, a rerun resumes"
    error_log = _write_traceback(Path(error_log), e)  # a bug: keep the traceback, show one line
    return INTERNAL_ERROR, f"internal error: {type(e).__name__}: {first_line(e)}; full traceback in {error_log}"


def _write_traceback(error_log: Path, e: BaseException) -> Path:
    """The traceback of `e` in `error_log`, or in the temporary directory if that cannot be written."""
    for path in (error_log, process_error_log()):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(traceback.format_exception(e)))
            return path
        except OSError:
            continue
    return error_log
