"""lmforge → GGUF → a real llama.cpp: same tokens, same greedy text, logits within precision.

Trains two tiny models (GPT-2-style and Llama-style with GQA; tinyshakespeare from
the shared data, byte-level BPE) unless checkpoints are given, exports each to
GGUF in every type lmforge writes (f32, f16, bf16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0),
loads the files with `llama-cpp-python` (which compiles llama.cpp from source) and
compares, for every prompt:

- token ids: llama.cpp's tokenizer (from the GGUF) against ours;
- logits, teacher-forced over a held-out passage, against (a) our fp32 model and
  (b) our model run on the *stored* weights (read back and dequantised from the
  same GGUF) — (b) isolates arithmetic differences from storage rounding;
- greedy continuations (temperature 0) of 32 tokens: llama.cpp against our
  `generate` on the stored weights and on the fp32 weights;
- the file's size and the perplexity cost of its type: llama.cpp's perplexity on
  held-out text (the last 20,000 characters of tinyshakespeare, in windows of the
  model's context) against our fp32 model's on the same windows.

    pip install -c constraints.txt -e ".[interop]"   # ~13 min: builds llama.cpp
    python benchmarks/gguf_llamacpp.py [--checkpoint RUN ...] [--out /tmp/lmforge-gguf]

Prints a Markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import load_config
from lmforge.export.gguf import GGUF_DTYPES, export_gguf, open_llama_cpp, state_from_gguf
from lmforge.model.generate import generate
from lmforge.model.transformer import Transformer
from lmforge.paths import shared_data
from lmforge.pretrain import load_model, pretrain
from lmforge.tokenizer import Tokenizer

PROMPTS = [
    "First Citizen:\nBefore we proceed",
    "ROMEO:\nBut, soft! what light",
    "The king is",
    "KING HENRY VI:\nO God! methinks it were a happy life,",
]
FAMILIES = {
    "gpt2-style": ["model.norm=layernorm", "model.position=learned", "model.mlp=gelu"],
    "llama-style": [
        "model.norm=rmsnorm",
        "model.position=rope",
        "model.mlp=swiglu",
        "model.n_kv_heads=2",
        "model.tie_embeddings=false",
    ],
}


def train_tiny(out: Path, family: str, steps: int) -> Path:
    """A small model trained for a few hundred steps, so its logits are peaked, not noise."""
    text = shared_data() / "tinyshakespeare" / "input.txt"
    cfg = load_config(
        None,
        [
            f"data.sources=[{text}]",
            "data.val_fraction=0.05",
            "data.split=tail",  # one file: hold out its last 5%
            "tokenizer.vocab_size=1024",
            "model.context_length=128",
            "model.n_layers=2",
            "model.d_model=96",
            "model.n_heads=4",
            f"train.max_steps={steps}",
            "train.tokens_per_step=2048",
            "train.micro_batch_size=8",
            "train.warmup_steps=20",
            "train.lr=3e-3",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            "train.eval_tokens=8192",
            "train.log_every=50",
            "train.peak_flops=1e11",
            f"output.dir={out / family}",
            *FAMILIES[family],
        ],
    )
    if not list((out / family / "checkpoints").glob("step_*")):
        pretrain(cfg, resume="auto")
    return out / family


def llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def held_out_windows(tok: Tokenizer, context: int, chars: int = 20_000) -> list[list[int]]:
    text = (shared_data() / "tinyshakespeare" / "input.txt").read_text()[-chars:]
    ids = tok.encode(text)
    return [ids[i : i + context] for i in range(0, len(ids) - context + 1, context)]


def perplexity(logits_of, windows: list[list[int]]) -> float:
    """exp of the mean next-token loss over every position of every window."""
    nll, n = 0.0, 0
    for ids in windows:
        logits = torch.as_tensor(logits_of(ids), dtype=torch.float64)[:-1]
        target = torch.tensor(ids[1:])
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        n += len(ids) - 1
    return float(np.exp(nll / n))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(
    name: str, model: Transformer, tok: Tokenizer, dtype: str, out: Path, n_new: int
) -> dict[str, Any]:
    path = export_gguf(model, tok, out / f"{name}-{dtype}.gguf", dtype)
    stored = Transformer(model.cfg).eval()
    stored.load_state_dict(state_from_gguf(path, model), strict=False)
    llm = open_llama_cpp(path, model.cfg.context_length, n_threads=2)
    text = (shared_data() / "tinyshakespeare" / "input.txt").read_text()[-4000:]
    held_out = tok.encode(text)[: model.cfg.context_length]
    ids = torch.tensor([held_out])
    with torch.no_grad():
        ours_fp32 = model(ids)[0].numpy()
        ours_stored = stored(ids)[0].numpy()
    theirs = llama_logits(llm, held_out)
    row: dict[str, Any] = {
        "model": name,
        "dtype": dtype,
        "file_kib": path.stat().st_size / 1024,
        "logit_range": float(ours_fp32.max() - ours_fp32.min()),
        "max_diff_vs_stored": float(np.abs(theirs - ours_stored).max()),
        "max_diff_vs_fp32": float(np.abs(theirs - ours_fp32).max()),
        "argmax_agree_vs_fp32": float((theirs.argmax(-1) == ours_fp32.argmax(-1)).mean()),
        **perplexities(model, llm, tok),
        "tokens_equal": True,
        "greedy_equal_stored": 0,
        "greedy_equal_fp32": 0,
        "greedy_total": 0,
    }
    for prompt in PROMPTS:
        ours_ids = tok.encode(prompt)
        their_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        row["tokens_equal"] &= list(their_ids) == ours_ids
        got = llama_greedy(llm, ours_ids, n_new)
        for key, m in (("greedy_equal_stored", stored), ("greedy_equal_fp32", model)):
            ref = generate(m, ours_ids, n_new, temperature=0)[0, len(ours_ids) :].tolist()
            row[key] += common_prefix(got, ref)
        row["greedy_total"] += n_new
    llm.close()
    return row


def perplexities(model: Transformer, llm: Any, tok: Tokenizer) -> dict[str, float]:
    windows = held_out_windows(tok, model.cfg.context_length)

    def ours(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids]))[0].numpy()

    fp32, theirs = perplexity(ours, windows), perplexity(lambda i: llama_logits(llm, i), windows)
    return {"ppl_fp32": fp32, "ppl_llama_cpp": theirs, "ppl_cost_pct": 100 * (theirs / fp32 - 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", default=[], help="run or checkpoint")
    parser.add_argument("--out", default="/tmp/lmforge-gguf")
    parser.add_argument("--steps", type=int, default=150, help="training steps per tiny model")
    parser.add_argument("--dtypes", default=",".join(GGUF_DTYPES))
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install -c constraints.txt llama-cpp-python")
        return 1
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(c) for c in args.checkpoint] or [train_tiny(out, f, args.steps) for f in FAMILIES]
    rows = []
    for run in runs:
        model, tok, _cfg = load_model(run)
        for dtype in args.dtypes.split(","):
            rows.append(compare(run.name, model, tok, dtype, out, args.new_tokens))
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(
        json.dumps({"llama_cpp_python": llama_cpp.__version__, "rows": rows}, indent=1)
    )
    print(
        f"\nllama-cpp-python {llama_cpp.__version__}; {len(PROMPTS)} prompts × {args.new_tokens} greedy tokens\n"
    )
    print(
        "| model | GGUF | KiB | perplexity (llama.cpp) | vs fp32 | tokens equal | "
        "max |Δlogit| vs stored weights | max |Δlogit| vs fp32 | logit range | "
        "greedy = ours (stored) | greedy = ours (fp32) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['dtype']} | {r['file_kib']:.0f} | {r['ppl_llama_cpp']:.3f} | "
            f"{r['ppl_cost_pct']:+.2f}% | {r['tokens_equal']} | "
            f"{r['max_diff_vs_stored']:.2e} | {r['max_diff_vs_fp32']:.2e} | {r['logit_range']:.1f} | "
            f"{r['greedy_equal_stored']}/{r['greedy_total']} | {r['greedy_equal_fp32']}/{r['greedy_total']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
