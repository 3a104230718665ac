"""The repository stands alone: shipped files hold no path of a machine, and the docs point nowhere outside it."""

import re
import subprocess

from conftest import REPO

MACHINE_PATH = re.compile(r"(?:^|[^\w.~])/(?:work|home|root|Users|mnt|opt|tmp)/")


def shipped_text_files():
    listed = subprocess.run(["git", "ls-files", "src", "conf", "experiments", "docs", "README.md", "pyproject.toml",
                             "Makefile"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        path = REPO / name
        if path.is_file() and path.suffix not in (".safetensors", ".png"):
            yield path, path.read_text(encoding="utf-8")


def test_no_machine_paths_and_no_references_outside_the_repository():
    files = dict(shipped_text_files())
    assert len(files) > 50 and any(p.name == "training_report.json" for p in files)
    for path, text in files.items():
        assert str(REPO) not in text and not MACHINE_PATH.search(text), path
        assert "../shared" not in text, path
