"""Files that are replaced whole: a reader, or a second process writing the same file, sees the old version or the
new one, never half of one (tables and figures that two `framework.analysis.experiments` processes may both write)."""

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced(path: Path):
    """A temporary path beside `path` to write (`.<name>.<pid>.tmp`, which a run directory's next start removes if
    this process was killed); it replaces `path` when the block ends without an error, and is removed otherwise
    (Ctrl-C included)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: Path, newline: str | None = None):
    """`open(path, "w")` whose file replaces `path` only once it is complete."""
    with replaced(path) as tmp, open(tmp, "w", newline=newline) as f:
        yield f


def write_text(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)
