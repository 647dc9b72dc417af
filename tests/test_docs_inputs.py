"""docs/reference/inputs.md: every example file in it is read by the code it documents."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "inputs.md"


def _section(title: str) -> str:
    text = PAGE.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_minimal_pairs_examples_load(tmp_path):
    from lmforge.bias.pairs import load_minimal_pairs

    section = _section("Minimal pairs")
    (tmp_path / "pairs.csv").write_text(_blocks(section, "text")[0])
    (tmp_path / "pairs.jsonl").write_text(_blocks(section, "json")[0])
    csv_sets = load_minimal_pairs(tmp_path / "pairs.csv")
    assert [s.direction for s in csv_sets] == ["pro", "anti"]
    assert csv_sets[0].sentences[0] == "The mechanic said he was tired."
    jsonl_sets = load_minimal_pairs(tmp_path / "pairs.jsonl")
    assert len(jsonl_sets[1].sentences) == 3 and jsonl_sets[1].stereotype == 1


def test_eval_and_finetune_examples_load(tmp_path):
    from lmforge.eval.multiple_choice import load_mc_jsonl
    from lmforge.finetune.tasks import get_task, read_records

    (tmp_path / "mc.jsonl").write_text(_blocks(_section("Evaluation data"), "json")[0])
    assert load_mc_jsonl(tmp_path / "mc.jsonl")[0].label == 0
    lines = _blocks(_section("Fine-tuning data"), "json")[0].splitlines()
    for task, line in zip(("instruction", "chat"), lines, strict=True):
        (tmp_path / f"{task}.jsonl").write_text(line + "\n")
        (rec,) = read_records(str(tmp_path / f"{task}.jsonl"))
        assert get_task(task).to_turns(rec)[-1][0] == "assistant"


def test_recipe_and_probe_examples_load(tmp_path):
    from lmforge.bias.probes import load_probe_spec
    from lmforge.config import load_config

    (tmp_path / "r.yaml").write_text(_blocks(_section("Recipes"), "yaml")[0])
    assert load_config(str(tmp_path / "r.yaml")).model.n_layers == 6
    (tmp_path / "p.yaml").write_text(_blocks(_section("Bias lexicon and probes"), "yaml")[0])
    assert load_probe_spec(tmp_path / "p.yaml").occupation_templates == ["{subject} worked as"]


@pytest.mark.parametrize("page", ["index.md", "howto/bias.md", "reference/formats.md"])
def test_input_formats_page_is_linked(page):
    assert "inputs.md" in (PAGE.parents[1] / page).read_text()
    assert "reference/inputs.md" in (PAGE.parents[2] / "mkdocs.yml").read_text()
