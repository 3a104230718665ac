"""Finding weights offline: local files and directories, or hub ids already in the Hugging Face cache.

Every loader goes through here so that a missing weight always produces the same kind of one-line error: what was
missing, under which config key, and how to provide it.
"""

from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from framework.core.errors import FrameworkError, first_line

_HOW_TO_PROVIDE = (
    "download it on a machine with network access (e.g. `hf download {ref}`) and copy the Hugging Face cache "
    "(HF_HOME) here, or set {key} to a local path"
)


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).expanduser().exists()


def resolve_file(spec: str, *, key: str) -> Path:
    """A weight file from a local path or `owner/repo/path/in/repo` (looked up in the HF cache, never downloaded
    while HF_HUB_OFFLINE=1)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = spec.split("/")
    if _looks_local(spec) or len(parts) < 3:
        raise FrameworkError(f"{key}: weight file '{spec}' not found; put the file there or set {key}=/path/to/file")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo_id, filename))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        how = _HOW_TO_PROVIDE.format(ref=f"{repo_id} {filename}", key=key)
        raise FrameworkError(f"{key}: weight file '{filename}' of '{repo_id}' is not available offline; {how}") from e


def load_pretrained(loader, source: str, *, key: str, **kwargs):
    """`loader.from_pretrained(source)` with errors turned into one actionable line."""
    path = Path(source).expanduser()
    if _looks_local(source) and not path.is_dir():
        raise FrameworkError(
            f"{key}: directory '{source}' not found; set {key} to a directory saved with save_pretrained or to a hub id"
        )
    try:
        return loader.from_pretrained(str(path) if path.is_dir() else source, **kwargs)
    except (OSError, ValueError, HfHubHTTPError) as e:
        if path.is_dir():
            raise FrameworkError(f"{key}: cannot load '{source}': {first_line(e)}") from e
        how = _HOW_TO_PROVIDE.format(ref=source, key=key)
        raise FrameworkError(f"{key}: weights for '{source}' are not in the local Hugging Face cache; {how}") from e


def unavailable(kind: str, spec: str, revision: str | None = None) -> str | None:
    """Why a weight ("file", or "pretrained": a save_pretrained directory or hub id) is not on this machine, or None
    if it is; never downloads (experiments check every run's weights this way before running any)."""
    path = Path(spec).expanduser()
    if _looks_local(spec) or (kind == "file" and len(spec.split("/")) < 3):
        return None if (path.is_file() if kind == "file" else path.is_dir()) else "not found"
    try:
        if kind == "file":
            parts = spec.split("/")
            hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), local_files_only=True)
        else:
            snapshot_download(spec, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return "not in the Hugging Face cache"
    return None
