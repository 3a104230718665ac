"""The repository stands alone: shipped files hold no path of a machine, and the docs point nowhere outside it."""

import re
import subprocess

from conftest import REPO

MACHINE_PATH = re.compile(r"(?:^|[^\w.~])/(?:work|home|root|Users|mnt|opt|tmp)/")


def shipped_text_files():
    listed = subprocess.run(
        ["git", "ls-files", "src", "conf", "experiments", "docs", "README.md", "pyproject.toml", "Makefile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
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


def test_a_wheel_runs_from_an_empty_directory_with_a_user_config_directory(tmp_path):
    """Built from a copy of the working tree, installed outside it (configs and experiment specs are package data),
    run from an empty directory; the user's own config directory joins through Hydra's search path."""
    import os
    import shutil
    import sys

    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "outputs", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache"
        ),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
        check=True,
        capture_output=True,
    )
    [wheel] = (tmp_path / "dist").glob("framework-*.whl")
    import zipfile

    shipped = set(zipfile.ZipFile(wheel).namelist())
    for config in (
        "models/architectures/sdxl/text_encoder_2/config.json",
        "models/architectures/sd35/transformer/config.json",
        "rewards/architectures/clip-vit-huge-patch14.json",
    ):
        assert f"framework/{config}" in shipped  # the full-size architectures build from package data
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True, capture_output=True
    )
    user_conf = tmp_path / "my conf"
    (user_conf / "prompts").mkdir(parents=True)
    (user_conf / "prompts" / "mine.yaml").write_text("name: inline\nprompts: [a blue square]\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "framework.run",
            "method=base",
            "prompts=mine",
            "prompts.limit=1",
            "logger=none",
            f"hydra.searchpath=[file://{user_conf}]",
        ],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "1/1 items ok" in result.stdout and f"images:  {empty}/outputs/runs/" in result.stdout
    assert "a blue square" in result.stdout and str(REPO) not in result.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import framework; print(framework.__file__)"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(tmp_path / "site"))
    report = subprocess.run(
        [str(tmp_path / "site" / "bin" / "framework-report"), str(empty)], env=env, capture_output=True, text=True
    )
    assert report.returncode == 2 and "has no finished item" in report.stderr


# The house, lowest layer first: a module imports only from its own package or from a lower layer, and packages of
# one layer (models and rewards; analysis and tools) never import each other. `framework.run` and `framework.serve`,
# the package's top-level modules, are its applications, and `framework.api` their Python face; the package's root,
# above them all, is the API's front door (it imports framework.config on every import, framework.api on first use).
LAYERS = (
    ("framework.core", "framework.conf"),  # conf: the YAML configs' package, which imports nothing
    ("framework.testbed",),  # the testbed's world: scenes and their renderer, the judge, gold
    ("framework.config",),  # schemas: the run, model families, rewards, methods; prompts
    ("framework.models", "framework.rewards"),
    ("framework.metrics",),
    ("framework.methods",),
    ("framework.runner",),
    ("framework.analysis", "framework.tools"),
    ("framework.run", "framework.serve"),
    ("framework.api",),  # runs what framework.run runs, in the caller's process
)


def package_of(module: str) -> tuple[int, str]:
    """(layer, package) of a framework module: the longest entry of LAYERS it lies in."""
    if module == "framework":
        return len(LAYERS), "framework"
    found = [(len(p), i, p) for i, layer in enumerate(LAYERS) for p in layer if f"{module}.".startswith(f"{p}.")]
    assert found, f"{module} lies in no layer of LAYERS: place it"
    _, layer, package = max(found)
    return layer, package


def framework_imports() -> dict[str, set[str]]:
    """module -> the framework modules importing it runs, anywhere in its body (imports inside functions count), the
    package `__init__` modules Python runs on the way included (`import a.b.c` runs a, a.b and a.b.c)."""
    import ast

    root = REPO / "src"
    modules = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (root / "framework").rglob("*.py")
        if "testbed/model" not in str(p)
    }

    def with_packages(name: str) -> set[str]:
        while name and name not in modules:  # `from a.b import name`: name may be an attribute, not a module
            name = name.rpartition(".")[0]
        parts = name.split(".")
        return {".".join(parts[: i + 1]) for i in range(len(parts))} if name else set()

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        imported = set().union(*(with_packages(t) for t in targets if t.startswith("framework")))
        graph[name] = imported - {name} - with_packages(name)  # a module's own packages run before it
    return graph


def test_imports_point_down_the_layers_without_cycles():
    graph = framework_imports()
    assert len(graph) > 60 and "framework.core.errors" in graph["framework.run"]
    assert "framework.methods" in graph["framework.runner.alignment"]  # a parent package counts as imported
    wrong = []
    for module, targets in sorted(graph.items()):
        layer, package = package_of(module)
        for target in sorted(targets):
            their_layer, their_package = package_of(target)
            if their_layer > layer or (their_layer == layer and their_package != package):
                wrong.append(f"{module} -> {target}")
    assert wrong == [], "imports against the layers: " + "; ".join(wrong)
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:  # depth-first search; a grey module reached again is a cycle
        state[module] = "grey"
        for target in sorted(graph[module]):
            assert state.get(target) != "grey", "import cycle: " + " -> ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = "black"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_lower_layers_load_no_diffusion_model_and_nothing_above_them():
    """An independent count, by Python itself: importing every module of the layers up to the rewards loads neither
    diffusers nor any module of a higher layer (so a reward, e.g. framework.rewards.clip, or a config check is
    cheap)."""
    import sys

    code = (
        "import importlib, pathlib, sys\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "names = sorted('.'.join(p.relative_to(root).with_suffix('').parts).removesuffix('.__init__')\n"
        "    for p in (root / 'framework').rglob('*.py') if 'testbed/model' not in str(p))\n"
        "low = ('core', 'testbed', 'config', 'rewards')\n"
        "for name in names:\n"
        "    if name.count('.') and name.split('.')[1] in low:\n"
        "        importlib.import_module(name)\n"
        "above = sorted(m for m in sys.modules if m.startswith('framework.') and m.split('.')[1] not in low)\n"
        "print('diffusers' in sys.modules, above)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "src")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False []"


def test_every_module_reads_in_one_sitting():
    """No module of the package above 350 lines: each does one job (the shipped testbed model's files excepted)."""
    modules = [p for p in (REPO / "src" / "framework").rglob("*.py") if "testbed/model" not in str(p)]
    long = {str(p.relative_to(REPO)): n for p in modules if (n := len(p.read_text().splitlines())) > 350}
    assert len(modules) > 40 and long == {}
