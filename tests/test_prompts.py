import pytest

from framework.config import PromptsConfig
from framework.config.prompts import load_prompts
from framework.core.errors import FrameworkError


def test_builtin_sets():
    pairs = load_prompts(PromptsConfig(name="animal_animal"))
    assert len(pairs) == 66 == len(set(pairs))
    assert pairs[0] == "a cat and a dog" and pairs[-1] == "a rabbit and a mouse"
    animals = load_prompts(PromptsConfig(name="simple_animals"))
    assert len(animals) == 45 == len(set(animals)) and animals[:2] == ["cat", "dog"]
    assert load_prompts(PromptsConfig(name="animal_animal", limit=3)) == pairs[:3]


def test_text_and_json_files(tmp_path):
    (tmp_path / "p.txt").write_text("# HPDv2 anime\na cat\n\n  a dog  \n")
    assert load_prompts(PromptsConfig(name="file", path=str(tmp_path / "p.txt"))) == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text('["a cat", "a dog"]')
    assert load_prompts(PromptsConfig(name="file", path=str(tmp_path / "p.json"))) == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", "\n# only a comment\n", "holds no prompts"),
        ("bad.json", '["a cat", ', "is not valid JSON"),
        ("dict.json", '{"prompt": "a cat"}', "JSON list of non-empty strings"),
        ("binary.txt", "a cat\x00\x01", "NUL bytes"),
    ],
)
def test_malformed_files_give_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(FrameworkError, match=message):
        load_prompts(PromptsConfig(name="file", path=str(tmp_path / name)))


def test_missing_file_and_missing_path():
    with pytest.raises(FrameworkError, match="not found"):
        load_prompts(PromptsConfig(name="file", path="/nonexistent/prompts.txt"))
    with pytest.raises(FrameworkError, match="prompts.path is not set"):
        load_prompts(PromptsConfig(name="file"))
    with pytest.raises(FrameworkError, match="non-empty list"):
        load_prompts(PromptsConfig(name="inline", prompts=[]))
