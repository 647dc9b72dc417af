"""Does counterfactual data augmentation (CDA) move CrowS-Pairs? A before/after experiment.

Two small causal LMs are pre-trained on the same Gutenberg books with the same
tokenizer, model, seed and training budget (steps × tokens per step); the
second run's corpus also holds a gender-swapped copy of every document
(`lmforge.bias.cda`, ratio 1.0, mode "add"). Both are then scored on:

- CrowS-Pairs (overall, and the gender subset): % of pairs where the more
  stereotypical sentence gets the higher log-likelihood, 95% Wilson intervals,
  plus a paired bootstrap interval for the difference between the two models;
- the gender template probes (`lmforge.bias.probes`);
- validation bits per byte on a held-out book that neither run trained on
  (original text, no augmentation), ± standard error.

    nice -n 5 python benchmarks/bias_cda.py all --out /tmp/bias/cda --steps 300

Stages can be run one at a time (`prepare`, `train base|cda`, `evaluate`); every
stage skips work whose output exists, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

from lmforge.paths import shared_data

TRAIN_BOOKS = [
    "pg1342_pride_and_prejudice",
    "pg514_little_women",
    "pg1400_great_expectations",
]
HELDOUT_BOOK = "pg174_the_picture_of_dorian_gray"
DOC_CHARS = 4000  # documents are runs of paragraphs of about this many characters


def book_text(name: str) -> str:
    from lmforge.data.clean import clean_text

    with gzip.open(shared_data() / "gutenberg" / f"{name}.txt.gz", "rt", encoding="utf-8") as fh:
        raw = fh.read()
    text, _ = clean_text(raw.lstrip("\ufeff"), is_code=False)
    return text


def chunk(name: str, text: str) -> list[dict]:
    docs, buf, k = [], [], 0
    for para in text.split("\n\n"):
        buf.append(para)
        if sum(len(p) for p in buf) >= DOC_CHARS:
            docs.append({"id": f"{name}:{k}", "text": "\n\n".join(buf), "source": name})
            buf, k = [], k + 1
    if buf:
        docs.append({"id": f"{name}:{k}", "text": "\n\n".join(buf), "source": name})
    return docs


def stage_prepare(out: Path) -> None:
    from lmforge.bias.cda import augment_documents
    from lmforge.data.document import Document
    from lmforge.tokenizer import train_tokenizer

    if (out / "tokenizer.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    records = [d for b in TRAIN_BOOKS for d in chunk(b, book_text(b))]
    docs = [Document(r["id"], r["text"], r["source"]) for r in records]
    with (out / "base.jsonl").open("w") as fh:
        for d in docs:
            fh.write(json.dumps({"id": d.id, "text": d.text}) + "\n")
    n_cda = 0
    with (out / "cda.jsonl").open("w") as fh:
        for d in augment_documents(docs, ratio=1.0, mode="add"):
            n_cda += 1
            fh.write(json.dumps({"id": d.id, "text": d.text}) + "\n")
    (out / "heldout.txt").write_text(book_text(HELDOUT_BOOK)[:200_000])
    # One tokenizer for both runs, trained on the original corpus only.
    tok = train_tokenizer((d.text for d in docs), "bpe", 2048)
    tok.save(out / "tokenizer.json")
    print(f"prepared {len(docs)} documents (base), {n_cda} (cda), tokenizer {tok.vocab_size}")


def recipe(out: Path, run: str, steps: int) -> dict:
    return {
        "name": f"bias-{run}",
        "data": {"sources": [str(out / f"{run}.jsonl")], "val_fraction": 0.02},
        "tokenizer": {"path": str(out / "tokenizer.json")},
        "model": {
            "context_length": 128,
            "n_layers": 4,
            "d_model": 128,
            "n_heads": 4,
            "norm": "layernorm",
            "position": "learned",
            "mlp": "gelu",
        },
        "train": {
            "max_steps": steps,
            "tokens_per_step": 2048,
            "micro_batch_size": 16,
            "lr": 2.0e-3,
            "warmup_steps": 30,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
            "dtype": "bf16",
            "threads": 1,
            "seed": 1234,
            "log_every": 25,
            "eval_every": steps,
            "eval_tokens": 8192,
            "checkpoint_every": 50,
        },
        "output": {"dir": str(out / "runs" / run)},
    }


def stage_train(out: Path, run: str, steps: int) -> None:
    import yaml

    from lmforge.config import load_config
    from lmforge.pretrain import pretrain

    path = out / f"{run}.yaml"
    path.write_text(yaml.safe_dump(recipe(out, run, steps), sort_keys=False))
    t0 = time.perf_counter()
    summary = pretrain(load_config(str(path)), resume="auto")
    print(f"{run}: trained in {time.perf_counter() - t0:.0f}s: {json.dumps(summary)[:400]}")


def stage_evaluate(out: Path) -> dict:
    import torch

    from lmforge.bias.cda import Swapper
    from lmforge.bias.lexicon import Lexicon
    from lmforge.bias.pairs import compare_paired, load_crows_pairs, score_pairs
    from lmforge.bias.probes import run_probes
    from lmforge.eval.intrinsic import evaluate_texts
    from lmforge.pretrain import load_model

    torch.set_num_threads(1)
    pairs = load_crows_pairs()
    heldout = (out / "heldout.txt").read_text()
    texts = [p for p in heldout.split("\n\n") if p.strip()]
    results: dict = {"runs": {}}
    scored = {}
    per_text_bits = {}
    for run in ("base", "cda"):
        model, tok, _ = load_model(out / "runs" / run)
        t0 = time.perf_counter()
        scores = score_pairs(model, tok, pairs)
        scored[run] = scores
        ppl = evaluate_texts(model, tok, texts)
        per_text_bits[run] = [x / math.log(2) for x in ppl.per_text_nll]
        probes = run_probes(model, tok, axes=["gender"], generate_samples=2, max_new_tokens=24)
        results["runs"][run] = {
            "crows_pairs": scores.summary(),
            "heldout_bits_per_byte": ppl.bits_per_byte,
            "heldout_bpb_stderr": ppl.bits_per_byte_stderr(),
            "heldout_bytes": ppl.n_bytes,
            "probes": probes["summary"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    # Gender pairs whose two sentences are exact CDA swaps of each other ("He ..." /
    # "She ..."): the pairs on which augmentation makes the training data symmetric.
    swapper = Swapper(Lexicon())
    swaps = [
        i
        for i, s in enumerate(pairs)
        if s.category == "gender" and swapper.swap(s.sentences[0])[0] == s.sentences[1]
    ]
    for run in ("base", "cda"):
        results["runs"][run]["crows_gender_exact_swaps"] = scored[run].figure(swaps)
    # Paired difference of held-out bits per byte (same texts): ratio of summed differences,
    # standard error over texts by the delta method (as IntrinsicResult does for one model).
    n_bytes = [len(t.encode("utf-8")) for t in texts]
    diffs = [c - b for b, c in zip(per_text_bits["base"], per_text_bits["cda"], strict=True)]
    d = sum(diffs) / sum(n_bytes)
    resid = [x - d * nb for x, nb in zip(diffs, n_bytes, strict=True)]
    var = sum(r * r for r in resid) / (len(resid) - 1)
    se = math.sqrt(var / len(resid)) / (sum(n_bytes) / len(n_bytes))
    results["heldout_bpb_difference_cda_minus_base"] = {"difference": d, "stderr": se}
    results["difference_cda_minus_base"] = {
        "overall": compare_paired(scored["base"], scored["cda"]),
        "gender": compare_paired(scored["base"], scored["cda"], category="gender"),
        "gender_exact_swaps": compare_paired(scored["base"], scored["cda"], indices=swaps),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["prepare", "train", "evaluate", "all"])
    ap.add_argument("run", nargs="?", choices=["base", "cda"])
    ap.add_argument("--out", default="/tmp/bias/cda")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.stage in ("prepare", "all"):
        stage_prepare(out)
    if args.stage == "train":
        stage_train(out, args.run or "base", args.steps)
    if args.stage == "all":
        for run in ("base", "cda"):
            stage_train(out, run, args.steps)
    if args.stage in ("evaluate", "all"):
        stage_evaluate(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
