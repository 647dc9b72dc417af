"""Pseudo-perplexity of a trained masked LM on its validation split, against the unigram baseline.

    python benchmarks/masked_pppl.py RUN_DIR [--windows 32]

Scores the first `--windows` validation windows of the run's token shards, each
position masked in turn (Salazar et al. 2020), and prints the pseudo-perplexity
next to the perplexity of the validation unigram distribution.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmforge.masked import ordinary_token_ids, pseudo_perplexity, unigram_perplexity
from lmforge.pretrain import load_model
from lmforge.shards import TokenStream


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--windows", type=int, default=32)
    args = ap.parse_args()
    model, tok, cfg = load_model(args.run_dir)
    tokens_dir = Path(cfg.data.tokens_dir) if cfg.data.tokens_dir else Path(args.run_dir) / "tokens"
    stream = TokenStream(tokens_dir, "val")
    T = cfg.model.context_length
    n = min(args.windows, stream.n_tokens // T)
    windows = [torch.from_numpy(stream.read(j * T, T)) for j in range(n)]
    ordinary = ordinary_token_ids(tok)
    result = pseudo_perplexity(model, windows, tok.mask_id, ordinary)
    result["unigram_ppl"] = unigram_perplexity(stream, tok.vocab_size, ordinary)
    result["windows"] = n
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
