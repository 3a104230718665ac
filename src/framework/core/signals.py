"""Stopping a run cleanly: SIGTERM (a scheduler's notice, e.g. SLURM's before preemption) and Ctrl-C (SIGINT, which a
terminal sends to its whole foreground process group, DDP workers included) stop it the same way. The loops stop at
their next check (between batches, optimisation steps or training steps), the current batch is discarded, every
finished item stays written, a fine-tuning run saves a resumable checkpoint, and the process exits 128 + the signal's
number (143 or 130). A second Ctrl-C interrupts at once (still nothing half-written: items are written atomically).
"""

import os
import signal
import threading
from contextlib import contextmanager

received: str | None = None  # the name of the stop signal that arrived during `stop_gracefully`, if any


def name() -> str:
    """The stop signal being handled: SIGINT if Ctrl-C was pressed, else SIGTERM."""
    return received or "SIGTERM"


@contextmanager
def stop_gracefully():
    """During the block, Ctrl-C is turned into SIGTERM to this process, whose handler (Lightning's, while a trainer
    fits or predicts) notes it for the loops to stop at their next check. Without such a handler, or at a second
    Ctrl-C, it interrupts at once (KeyboardInterrupt)."""
    global received
    received = None
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def on_sigint(signum, frame):
        global received
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):  # no trainer listens
            raise KeyboardInterrupt
        received = "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
