"""Counterfactual data augmentation: grammar, capitalisation, ratio, pipeline step, word lists."""

from __future__ import annotations

import json

import pytest

from lmforge.bias.cda import CounterfactualAugmentStep, Swapper, augment_documents, selected
from lmforge.bias.lexicon import Lexicon, dump_lexicon, load_lexicon
from lmforge.data.document import Document


@pytest.fixture(scope="module")
def swapper() -> Swapper:
    return Swapper(Lexicon())


@pytest.mark.parametrize(
    "text,expected",
    [
        # "her" + noun/adjective is possessive → "his"; otherwise an object → "him".
        ("She read her book.", "He read his book."),
        ("He gave it to her.", "She gave it to him."),
        ("I saw her yesterday.", "I saw him yesterday."),
        ("He told her that she was right.", "She told him that he was right."),
        ("Her lovely face turned to her mother.", "His lovely face turned to his father."),
        ("She looked at her sadly.", "He looked at him sadly."),
        ("with her, and", "with him, and"),
        ("her own", "his own"),
        # "his" before a noun → "her"; standing alone → "hers".
        ("His hat is on his head.", "Her hat is on her head."),
        ("The choice was his.", "The choice was hers."),
        ("a friend of his and mine", "a friend of hers and mine"),
        ("The book is hers, not his.", "The book is his, not hers."),
        ("He saw him.", "She saw her."),
        ("She hurt herself.", "He hurt himself."),
        # Capitalisation is kept: lower, Title, UPPER.
        ("HER FATHER and HIS MOTHER", "HIS MOTHER and HER FATHER"),
        ("The King and the Queen", "The Queen and the King"),
        ("Mr. Darcy met Mrs. Bennet", "Mrs. Darcy met Mr. Bennet"),
        ("men and women", "women and men"),
        ("his step-father", "her step-mother"),
        # Words that merely contain a term are untouched.
        ("the theme of the shell", "the theme of the shell"),
        ("Women's rights", "Men's rights"),
    ],
)
def test_swap_grammar(swapper, text, expected):
    assert swapper.swap(text)[0] == expected


def test_swap_twice_restores_unambiguous_text(swapper):
    text = "The man told his brother that the woman and her sister were kind to him."
    once, counts = swapper.swap(text)
    assert once == "The woman told her sister that the man and his brother were kind to her."
    assert sum(counts.values()) == 7
    assert counts["his→her"] == 1 and counts["her→his"] == 1 and counts["him→her"] == 1
    # "him" → "her" → ("her" before "." is an object) "him": a round trip.
    assert swapper.swap(once)[0] == text


def test_names_only_when_asked_and_capitalised():
    plain = Swapper(Lexicon())
    assert plain.swap("John met Mary.")[0] == "John met Mary."
    named = Swapper(Lexicon(), names=True)
    assert named.swap("John met Mary.")[0] == "Mary met John."
    assert named.swap("john will mark it")[0] == "john will mark it"


def test_unknown_axis_is_an_error():
    with pytest.raises(ValueError, match="CDA axes \\['religion'\\] have no pair list"):
        Swapper(Lexicon(), axes=["religion"])


def test_custom_axis_from_a_lexicon_file(tmp_path):
    path = tmp_path / "lex.yaml"
    path.write_text("pairs:\n  colour: [[red, blue], [Light Green, dark green]]\n")
    lex = load_lexicon(path)
    assert lex.pairs == {"colour": [["red", "blue"], ["light green", "dark green"]]}
    sw = Swapper(lex, axes=["colour"])
    assert sw.swap("A Red car, a light  green door; he stays.")[0] == (
        "A Blue car, a dark green door; he stays."
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pairs": {"gender": [["he", "she", "it"]]}}))
    with pytest.raises(ValueError, match=r"bad.json: pairs.gender\[0\] .* is not a pair"):
        load_lexicon(bad)
    bad.write_text(json.dumps({"colours": []}))
    with pytest.raises(ValueError, match="unknown key"):
        load_lexicon(bad)
    # The defaults round-trip through a dumped file.
    dumped = tmp_path / "defaults.json"
    dump_lexicon(Lexicon(), dumped)
    assert load_lexicon(dumped).to_dict() == Lexicon().to_dict()


def _docs(n: int) -> list[Document]:
    return [Document(f"d{i}", f"He met her sister, number {i}.", "src") for i in range(n)]


def test_step_ratio_add_and_replace():
    docs = _docs(400)
    step = CounterfactualAugmentStep(Lexicon(), ratio=0.25, mode="add", seed=3)
    out = list(step(docs))
    chosen = [d.id for d in docs if selected(f"{d.id}#0", 0.25, 3)]
    assert 60 < len(chosen) < 140  # about a quarter, deterministically
    assert len(out) == 400 + len(chosen)
    copies = [d for d in out if d.meta.get("cda") == "add"]
    assert [d.id for d in copies] == chosen  # the copy keeps the id (same train/val split)
    assert copies[0].text.startswith("She met his brother")
    assert step.stats.docs_in == 400 and step.stats.docs_out == len(out)
    assert step.stats.counters["documents_added"] == len(chosen)
    # Same seed → same choice; replace mode keeps the count.
    rep = list(augment_documents(_docs(400), ratio=0.25, mode="replace", seed=3))
    assert len(rep) == 400
    assert [d.id for d in rep if d.meta.get("cda") == "replace"] == chosen
    assert all(d.text.startswith("He met") for d in rep if "cda" not in d.meta)


def test_documents_without_terms_pass_unchanged():
    doc = Document("x", "The weather was fine and the river was wide.", "s")
    step = CounterfactualAugmentStep(Lexicon(), ratio=1.0, mode="add")
    assert [d.text for d in step([doc])] == [doc.text]
    assert step.stats.counters["documents_without_terms"] == 1


def test_bad_step_settings():
    with pytest.raises(ValueError, match="ratio"):
        CounterfactualAugmentStep(Lexicon(), ratio=1.5)
    with pytest.raises(ValueError, match="mode"):
        CounterfactualAugmentStep(Lexicon(), mode="swap")


def test_prepare_pipeline_augments_after_dedup_and_reports_bias(tmp_path, shared):
    """`lmforge prepare` with CDA: swapped copies survive dedup; the report has a bias section."""
    import gzip
    import io

    import zstandard

    from lmforge.config import PrepareConfig, PrepareSource
    from lmforge.data.pipeline import prepare

    with gzip.open(shared / "gutenberg" / "pg1342_pride_and_prejudice.txt.gz", "rt") as fh:
        raw = fh.read()
    paras = [p for p in raw.split("\n\n") if len(p) > 400][40:70]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, p in enumerate(paras):
        (folder / f"p{i:02d}.txt").write_text(p)
    cfg = PrepareConfig(
        sources=[PrepareSource(path=str(folder), name="pp", license="public-domain")],
        workers=1,
        cda_ratio=0.5,
        cda_mode="add",
        seed=1,
    )
    report = prepare(cfg, tmp_path / "out", log=lambda s: None)
    names = [s["name"] for s in report["steps"]]
    assert names[-4:] == ["mix", "cda", "bias_statistics", "output"]
    steps = {s["name"]: s for s in report["steps"]}
    added = steps["cda"]["counters"]["documents_added"]
    assert added > 0
    assert steps["cda"]["docs_out"] == steps["cda"]["docs_in"] + added
    assert report["totals"]["docs_out"] == steps["mix"]["docs_out"] + added
    assert steps["bias_statistics"]["counters"] == {}  # moved into the bias section
    bias = report["bias"]
    assert bias["cda"]["documents_added"] == added and bias["cda"]["top_swaps"]
    gender = bias["statistics"]["sources"]["pp"]["groups"]["gender"]
    assert gender["male"]["mentions"] > 0 and gender["female"]["mentions"] > 0
    (shard,) = (tmp_path / "out" / "shards").glob("*.jsonl.zst")
    with shard.open("rb") as fh:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
        records = [json.loads(line) for line in text]
    copies = [r for r in records if r["meta"].get("cda") == "add"]
    assert len(copies) == added
    originals = {r["id"]: r["text"] for r in records if "cda" not in r["meta"]}
    sw = Swapper(Lexicon())
    for c in copies:
        assert c["text"] == sw.swap(originals[c["id"]])[0]
    md = (tmp_path / "out" / "data_report.md").read_text()
    assert "## Bias statistics" in md
