"""User-facing errors: `python -m framework.run` prints these as one line and exits non-zero, without a traceback."""


class FrameworkError(Exception):
    """A problem the user can fix (bad input, missing weights, incompatible options)."""


class NonFiniteLoss(FrameworkError):
    """The loss of one item became NaN/inf; that item is marked failed and the run goes on."""
