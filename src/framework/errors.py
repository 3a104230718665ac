"""What can go wrong, and the one exit-code policy of `framework.run`, `framework.report` and `framework.experiments`.

    0    everything finished
    2    bad input the user can fix (a config value, a missing weight, a prompt file): nothing ran
    3    some work failed (items with a NaN loss or out of memory, failed runs); what finished is written, a rerun
         retries the rest
    1    internal error (a bug): one line on stderr, the traceback in an error.log it names
    143  stopped by SIGTERM after saving what was finished (the conventional 128 + 15); a rerun resumes

Every problem prints exactly one line on stderr, never a traceback wall.
"""

import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

OK, INTERNAL_ERROR, BAD_INPUT, FAILED, INTERRUPTED = 0, 1, 2, 3, 143


class FrameworkError(Exception):
    """A problem the user can fix (bad input, missing weights, incompatible options)."""


class Failure(Exception):
    """Work that did not succeed although the input was valid; what finished stays written."""


class NonFiniteLoss(Failure):
    """The loss of one item became NaN/inf; that item is marked failed and the run goes on."""


class Interrupted(Exception):
    """SIGTERM arrived (e.g. SLURM's notice before preemption): the run stopped cleanly after saving."""


def worst(codes) -> int:
    """The exit code of several jobs: an internal error over bad input over failed work over success."""
    return min((c for c in codes if c), key=(INTERNAL_ERROR, BAD_INPUT, FAILED, INTERRUPTED).index, default=OK)


def process_error_log() -> Path:
    """Where the traceback of an internal error outside any run directory goes."""
    return Path(tempfile.gettempdir()) / f"framework-{os.getpid()}-error.log"


def guarded(work: Callable[[], object], error_log: Path) -> tuple[int, str | None]:
    """Run `work` and map what it raises to (exit code, the one line printed on stderr); the traceback of an
    unexpected exception goes to `error_log`."""
    try:
        work()
        return OK, None
    except FrameworkError as e:
        code, line = BAD_INPUT, f"error: {e}"
    except Failure as e:
        code, line = FAILED, f"error: {e}"
    except Interrupted as e:
        code, line = INTERRUPTED, f"stopped: {e}"
    except Exception as e:  # a bug: keep the traceback, show one line
        error_log = Path(error_log)
        error_log.parent.mkdir(parents=True, exist_ok=True)
        error_log.write_text(traceback.format_exc())
        message = (str(e).strip().splitlines() or [""])[0]
        code, line = INTERNAL_ERROR, f"internal error: {type(e).__name__}: {message}; full traceback in {error_log}"
    print(line, file=sys.stderr, flush=True)
    return code, line
