"""Data-side bias statistics: hand-counted text, real Gutenberg books, the prepare report."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from lmforge.bias.lexicon import Lexicon
from lmforge.bias.stats import bias_statistics, render_markdown
from lmforge.data.clean import strip_gutenberg
from lmforge.data.document import Document


def test_hand_counted_cooccurrence():
    text = (
        "She is a nurse and a kind person. He is a doctor. "
        "The doctor said he was cruel! My sister, the nurse, was happy.\n\n"
        "Nothing here."
    )
    stats = bias_statistics([Document("a", text, "s1")])
    s = stats["sources"]["s1"]
    assert s["sentences"] == 5
    g = s["groups"]["gender"]
    assert g["female"]["mentions"] == 2  # she, sister
    assert g["male"]["mentions"] == 2  # he, he
    assert g["female"]["units"] == 2 and g["male"]["units"] == 2
    assert g["female"]["positive_cooc"] == 2  # "kind", "happy"
    assert g["male"]["negative_cooc"] == 1  # "cruel"
    assert g["female"]["net_sentiment_rate"] == pytest.approx(1.0)
    assert g["male"]["net_sentiment_rate"] == pytest.approx(-0.5)
    assert g["female"]["top_occupations"] == {"nurse": 2}
    assert g["male"]["top_occupations"] == {"doctor": 2}
    assert s["occupation_gender"]["nurse"] == {"male": 0, "female": 2, "male_share": 0.0}
    # Within 2 words: "he was cruel", "sister, the nurse", "doctor said he" count;
    # "she is a nurse", "he is a doctor" (3 apart) and "sister ... happy" (4) do not.
    w = bias_statistics([Document("a", text, "s1")], window=2)["all"]["groups"]["gender"]
    assert w["female"]["top_occupations"] == {"nurse": 1}
    assert w["male"]["top_occupations"] == {"doctor": 1}
    assert w["male"]["negative_cooc"] == 1 and w["female"]["positive_cooc"] == 0


def test_two_word_terms_and_sources():
    docs = [
        Document("1", "The Black man and the white woman talked.", "news"),
        Document("2", "A Muslim farmer prayed at the mosque.", "books"),
    ]
    stats = bias_statistics(docs)
    assert stats["sources"]["news"]["groups"]["race"]["black"]["mentions"] == 1
    assert stats["sources"]["news"]["groups"]["race"]["white"]["mentions"] == 1
    assert stats["sources"]["books"]["groups"]["religion"]["muslim"]["mentions"] == 2
    assert stats["sources"]["books"]["groups"]["religion"]["muslim"]["top_occupations"] == {
        "farmer": 1
    }
    assert stats["all"]["documents"] == 2
    assert "news" not in json.dumps(stats["sources"]["books"])


def _book(shared, name: str) -> str:
    with gzip.open(shared / "gutenberg" / f"{name}.txt.gz", "rt", encoding="utf-8") as fh:
        raw = fh.read()
    return strip_gutenberg(raw.lstrip("\ufeff"))[0]


def _regex_count(text: str, terms: list[str]) -> int:
    alt = "|".join(sorted(map(re.escape, terms), key=len, reverse=True))
    return len(re.findall(rf"(?<![a-z])(?:{alt})(?![a-z])", text.lower()))


def test_mentions_on_real_books_match_an_independent_count(shared):
    lex = Lexicon()
    books = {
        "pride": _book(shared, "pg1342_pride_and_prejudice"),
        "moby": _book(shared, "pg2701_moby_dick"),
    }
    docs = [Document(k, v, k) for k, v in books.items()]
    stats = bias_statistics(docs, lex)
    for src, text in books.items():
        n_words = len(re.findall(r"[a-z]+", text.lower()))
        s = stats["sources"][src]
        assert s["words"] == n_words
        for group in ("male", "female"):
            expected = _regex_count(text, lex.groups["gender"][group])
            assert s["groups"]["gender"][group]["mentions"] == expected, (src, group)
    # What the books are known for: Pride and Prejudice is about women, Moby Dick about men.
    pride = stats["sources"]["pride"]["groups"]["gender"]
    moby = stats["sources"]["moby"]["groups"]["gender"]
    assert pride["female"]["share_of_axis"] > 0.5 > moby["female"]["share_of_axis"]
    assert moby["male"]["share_of_axis"] > 0.85
    all_male = stats["all"]["groups"]["gender"]["male"]["mentions"]
    assert all_male == pride["male"]["mentions"] + moby["male"]["mentions"]
    md = render_markdown(stats)
    assert md.startswith("## Bias statistics") and "| gender | male |" in md


def test_balancing_weights_closed_form():
    from lmforge.bias.stats import balancing_weights

    docs = [
        Document("1", "He ran. He sat. He spoke. She laughed.", "a"),  # male 3, female 1
        Document("2", "She ran. She sat. He spoke.", "b"),  # male 1, female 2
        Document("3", "The river was wide.", "c"),  # no mentions
    ]
    out = balancing_weights(bias_statistics(docs))
    assert out["group"] == "female" and out["share_before"] == pytest.approx(3 / 7)
    # Source b (female share 2/3) gets k with (1 + 2k) / (4 + 3k) = 1/2 → k = 2.
    assert out["weights"] == {"a": 1.0, "b": pytest.approx(2.0), "c": 1.0}
    assert out["share_after"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="every source leans the same way"):
        balancing_weights(bias_statistics(docs[:1]))
