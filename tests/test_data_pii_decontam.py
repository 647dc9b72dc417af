"""PII redaction scored on Presidio's labelled synthetic set; decontamination on real eval sets."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from lmforge.data.clean import strip_gutenberg
from lmforge.data.decontam import ContaminationIndex
from lmforge.data.pii import find_pii, iban_valid, luhn_valid, redact

# Presidio entity type → ours (the types this stage targets).
TYPES = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "IP_ADDRESS": "IP_ADDRESS",
    "CREDIT_CARD": "CREDIT_CARD",
    "IBAN_CODE": "IBAN",
}


def test_pii_precision_recall_on_presidio_synthetic(shared):
    records = json.loads((shared / "pii" / "synth_dataset_v2.json").read_text())
    tp, fp, fn = Counter(), Counter(), Counter()
    for rec in records:
        gold = [
            (s["start_position"], s["end_position"], TYPES[s["entity_type"]])
            for s in rec["spans"]
            if s["entity_type"] in TYPES
        ]
        pred = find_pii(rec["full_text"])

        def overlaps(a, b):
            return a[2] == b[2] and a[0] < b[1] and b[0] < a[1]

        for g in gold:
            if any(overlaps(g, p) for p in pred):
                tp[g[2]] += 1
            else:
                fn[g[2]] += 1
        for p in pred:
            if not any(overlaps(p, g) for g in gold):
                fp[p[2]] += 1
    scores = {}
    for kind in TYPES.values():
        scores[kind] = (
            tp[kind] / max(tp[kind] + fp[kind], 1),
            tp[kind] / max(tp[kind] + fn[kind], 1),
        )
    print(
        "\nPII on Presidio synth v2 (precision, recall):",
        {k: (round(p, 3), round(r, 3)) for k, (p, r) in scores.items()},
    )
    for kind in ("EMAIL", "CREDIT_CARD", "IBAN", "IP_ADDRESS"):
        assert scores[kind][0] >= 0.95 and scores[kind][1] >= 0.95, kind
    # Phone formats vary most (a bare "467 3395" is only a phone by context).
    assert scores["PHONE"][0] >= 0.9 and scores["PHONE"][1] >= 0.8


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid(
        "GB82 WEST 1234 5698 7654 33"
    )


def test_redaction_placeholders_counts_and_non_pii():
    text = (
        "Mail jane.doe@example.com or call +1 (415) 555-0132. Card 4111 1111 1111 1111, "
        "IBAN DE89 3704 0044 0532 0130 00, server 93.184.216.34 but not 127.0.0.1.\n"
        'AWS_KEY = "AKIAIOSFODNN7EXAMPLE"\npassword = "hunter2hunter2"\n'
        "Published 2021-05-06, version 3.10.12, ISBN 978-3-16-148410-0 is not a card."
    )
    out, counts = redact(text)
    assert counts == Counter(EMAIL=1, PHONE=1, CREDIT_CARD=1, IBAN=1, SECRET=2, IP_ADDRESS=1)
    for placeholder in ("<EMAIL>", "<PHONE>", "<CREDIT_CARD>", "<IBAN>", "<SECRET>"):
        assert placeholder in out
    assert "127.0.0.1" in out and "2021-05-06" in out and "3.10.12" in out
    assert "jane.doe" not in out and "4111" not in out and "hunter2" not in out


def test_no_pii_found_in_a_novel(shared):
    path = next((shared / "gutenberg").glob("pg1342_*.txt.gz"))
    body = strip_gutenberg(gzip.decompress(path.read_bytes()).decode("utf-8"))[0]
    assert find_pii(body) == []


@pytest.fixture(scope="module")
def index():
    return ContaminationIndex(["hellaswag", "crows_pairs"])


def test_decontamination_finds_planted_benchmark_text(shared, index):
    with gzip.open(shared / "hellaswag" / "hellaswag_val.jsonl.gz", "rt") as fh:
        item = json.loads(fh.readline())
    leaked = (
        "Some forum post. " + item["ctx"] + " " + item["endings"][item["label"]] + " More text."
    )
    assert set(index.matches(leaked)) == {"hellaswag"}
    import csv

    with open(shared / "crows_pairs" / "crows_pairs_anonymized.csv", encoding="utf-8") as fh:
        pair = next(csv.DictReader(fh))
    assert "crows_pairs" in index.matches(f"A quote: {pair['sent_more']} End.")
    assert index.items == {"hellaswag": 10042, "crows_pairs": 3016}


def test_decontamination_leaves_clean_books_alone(shared, index):
    path = next((shared / "gutenberg").glob("pg35_*.txt.gz"))
    assert index.matches(gzip.decompress(path.read_bytes()).decode("utf-8")) == {}


def test_decontamination_of_a_finetuning_test_split(shared, tmp_path):
    split = tmp_path / "test.jsonl"
    lines = (shared / "scitldr" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines[:20]]
    split.write_text(
        "".join(
            json.dumps({"src": " ".join(r["source"]), "tgt": r["target"][0]}) + "\n"
            for r in records
        )
    )
    idx = ContaminationIndex([f"{split}:src+tgt"])
    abstract = " ".join(records[3]["source"])
    assert idx.matches("Intro. " + abstract[: len(abstract) // 2]) != {}
    assert (
        idx.matches("An unrelated text about gardening and roses in the spring time, at length.")
        == {}
    )
