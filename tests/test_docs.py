"""The docs are true: every relative link resolves (file and heading), README's first offline command runs, every
recipe of docs/extending.md runs as written (its files written out, its commands run; only paths differ), and every
number README gives about over-optimisation and the monitor is one of the tables in docs."""

import json
import re
import runpy
import shlex

import pytest
from conftest import REPO, call_main, run_cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_every_relative_link_in_readme_and_docs_resolves():
    checked = 0
    for doc in DOCS:
        for target in LINK.findall(FENCE.sub("", doc.read_text())):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check offline
                continue
            file, _, fragment = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            assert path.exists(), f"{doc.name}: {target}"
            assert path.is_relative_to(REPO), f"{doc.name}: {target} points outside the repository"
            if fragment:
                assert fragment in anchors(path), f"{doc.name}: {target}: no such heading"
            checked += 1
    assert checked >= 30


def fenced(path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def test_every_over_optimisation_and_monitor_number_in_readme_is_in_a_table_of_the_docs():
    """README's results on the learned proxy, the ensembles and the monitor restate docs/experiments.md (and the
    testbed's report in docs/testbed.md, GRPO's testbed budget in docs/methods.md), which restate the tables `make
    reproduce-tables` writes: a number that appears in README only has no table behind it."""
    readme = (REPO / "README.md").read_text()
    claims = readme[readme.index("On a **learned proxy**") : readme.index("## Documentation")]
    tables = "".join((REPO / "docs" / name).read_text() for name in ("experiments.md", "testbed.md", "methods.md"))
    numbers = set(re.findall(r"(?<![\w.])\d+\.\d+", claims))
    assert len(numbers) > 30 and not sorted(n for n in numbers if n not in tables)


def test_readmes_first_offline_command_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    block = fenced_after(text, "## First commands")
    command = shlex.split(block)
    assert command[:3] == [".venv/bin/python", "-m", "framework.run"]
    result = run_cli(*command[3:], run_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_ok"] == 2 and summary["final_reward_mean"] > 2 * summary["base_reward_mean"]  # as it says
    assert summary["final_adherence_mean"] < summary["base_adherence_mean"] == 1


def fenced_after(text: str, heading: str) -> str:
    lang, body = FENCE.search(text, text.index(heading)).groups()
    return body.strip()


@pytest.fixture
def registries():
    """The reward, method and model-family tables as they were: recipes add to them."""
    from framework.config.families import FAMILIES
    from framework.config.methods import METHODS
    from framework.config.rewards import REWARDS

    saved = dict(REWARDS), dict(METHODS), dict(FAMILIES)
    yield
    for registry, before in zip((REWARDS, METHODS, FAMILIES), saved):
        registry.clear()
        registry.update(before)


def test_the_extending_recipes_run_as_written(tmp_path, registries, tiny_sd):
    doc = REPO / "docs" / "extending.md"
    finetune = tmp_path / "my-sd15-finetune"
    tiny_sd.pipe.save_pretrained(finetune, safe_serialization=True)
    for body in fenced(doc, "python") + fenced(doc, "yaml"):  # each file's first line names it
        name = body.splitlines()[0].removeprefix("# ").split(" ")[0]
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body.replace("/data/my-sd15-finetune", str(finetune)))
    commands = [body.strip().replace("\\\n", " ") for body in fenced(doc, "bash")]
    assert len(commands) == 4
    for i, command in enumerate(commands):
        args = shlex.split(command.replace("$PWD", str(tmp_path)))
        run_dir = tmp_path / "runs" / str(i)
        if "model=my_sd15" in command:  # a tiny stand-in for the fine-tune, at 64 px; no CLIP here to measure with
            args += ["model.resolution=64", "eval.features=none"]
        args += ["logger=none", f"hydra.run.dir={run_dir}"]
        if args[:2] == ["python", "my_run.py"]:
            main = lambda: runpy.run_path(str(tmp_path / "my_run.py"), run_name="__main__")  # noqa: E731
            result = call_main(main, *args[2:], pythonpath=tmp_path)
        else:
            assert args[:3] == ["python", "-m", "framework.run"]
            result = run_cli(*args[3:], pythonpath=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["num_ok"] == 2, command
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/items/*/record.json")]
    assert {r["info"].get("scale") for r in records} >= {0.7}  # the cold method ran with its option
    refused = call_main(
        lambda: runpy.run_path(str(tmp_path / "my_run.py"), run_name="__main__"),
        "method=cold",
        "method.scale=2",
        f"hydra.searchpath=[file://{tmp_path}/my_conf]",
        pythonpath=tmp_path,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: method.scale=2.0 is not valid; it must be in (0, 1]"


def test_the_docs_list_every_model_family_of_the_table():
    from framework.config.families import FAMILIES

    text = (REPO / "docs" / "configuration.md").read_text()
    listed = re.search(r"Model keys: `kind` \(([^:]*):", text).group(1)
    assert re.findall(r"`(\w+)`", listed) == list(FAMILIES)
