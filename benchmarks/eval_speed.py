"""HellaSwag scoring speed: lmforge's scorer against lm-evaluation-harness, same model and items.

One GPT-2-shaped model (random weights; speed does not depend on them) is
written as a transformers GPT-2 folder; then, interleaved in rounds so machine
noise hits all alike, the same HellaSwag items are scored by

- `ours`: `lmforge.eval.multiple_choice.score_items` (shared context computed
  once per item via the KV cache, items of equal context length batched);
- `ours-naive`: one forward pass per (item, choice), no cache, no batching;
- `lm-eval`: lm-evaluation-harness's `HFLM.loglikelihood` on the transformers
  model with the same requests (its own tokenisation, length-sorted batching
  and continuation extraction; start-up and task loading not timed).

All three must pick the same endings (checked); the script prints items/s
(median over rounds) and the ratios, as a Markdown row.

    nice -n 10 python benchmarks/eval_speed.py --items 400 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import ModelConfig
from lmforge.eval.lm_eval_bridge import write_gpt2_folder
from lmforge.eval.multiple_choice import (
    MCItem,
    MCResult,
    load_hellaswag,
    score_items,
    score_items_reference,
)
from lmforge.model.transformer import Transformer, count_params
from lmforge.paths import shared_data
from lmforge.tokenizer import train_bpe


def lm_eval_scorer(hf_folder: Path, batch_size: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(hf_folder), batch_size=batch_size, device="cpu", dtype="float32")

    def score(items: list[MCItem]) -> MCResult:
        reqs = [
            Instance("loglikelihood", doc={}, arguments=(it.context, " " + c), idx=j)
            for it in items
            for j, c in enumerate(it.choices)
        ]
        out = lm.loglikelihood(reqs, disable_tqdm=True)
        lls, k = [], 0
        for it in items:
            lls.append([float(out[k + j][0]) for j in range(len(it.choices))])
            k += len(it.choices)
        return MCResult(lls, [it.label for it in items], [list(it.choices) for it in items])

    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32, help="lm-eval requests per batch")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="our tokens per batch")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = shared_data() / "hellaswag"
    items = load_hellaswag(data, limit=args.items)
    tok = train_bpe(
        (f"{it.context} {' '.join(it.choices)}" for it in load_hellaswag(data, limit=5000)),
        args.vocab,
    )
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        context_length=512,
        n_layers=args.layers,
        d_model=args.width,
        n_heads=max(1, args.width // 64),
        bias=True,
    )
    model = Transformer(cfg).eval()
    tmp = Path(tempfile.mkdtemp(prefix="eval_speed_"))
    write_gpt2_folder(model, tok, tmp / "hf")
    theirs = lm_eval_scorer(tmp / "hf", args.batch_size)

    scorers = {
        "ours": lambda: score_items(model, tok, items, max_batch_tokens=args.batch_tokens),
        "lm-eval": lambda: theirs(items),
    }
    if not args.skip_naive:
        scorers["ours-naive"] = lambda: score_items_reference(model, tok, items)
    times: dict[str, list[float]] = {k: [] for k in scorers}
    results: dict[str, MCResult] = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in scorers.items():
                t0 = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t0)

    ref = results["lm-eval"]
    for name, res in results.items():
        same = res.correct() == ref.correct() and res.correct("chars") == ref.correct("chars")
        diff = max(
            abs(a - b)
            for x, y in zip(res.loglikelihoods, ref.loglikelihoods, strict=True)
            for a, b in zip(x, y, strict=True)
        )
        print(f"{name}: acc {res.accuracy():.4f} acc_norm {res.accuracy('chars'):.4f} "
              f"same predictions as lm-eval: {same}; max |Δ loglik| {diff:.2e}")  # fmt: skip
    rate = {k: len(items) / statistics.median(v) for k, v in times.items()}
    params = count_params(cfg)["total"]
    print(
        f"model {params / 1e6:.1f}M params ({args.layers} layers, width {args.width}, vocab "
        f"{tok.vocab_size}), {len(items)} items, {args.threads} threads, {args.rounds} rounds"
    )
    for k, v in times.items():
        print(f"{k}: {rate[k]:.1f} items/s (median of {', '.join(f'{t:.2f}' for t in v)} s)")
    print("| items | ours items/s | lm-eval items/s | ratio ours/lm-eval | naive items/s |")
    naive = f"{rate['ours-naive']:.1f}" if "ours-naive" in rate else "-"
    print(
        f"| {len(items)} | {rate['ours']:.1f} | {rate['lm-eval']:.1f} | "
        f"{rate['ours'] / rate['lm-eval']:.2f}x | {naive} |"
    )


if __name__ == "__main__":
    main()
