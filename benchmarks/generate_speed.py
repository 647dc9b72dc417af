"""Greedy decoding speed: lmforge's KV-cache `generate` against HF `generate`, same model.

A random GPT-2-shaped lmforge model (14M parameters: 6 layers, width 384, 6
heads, vocabulary 8192, context 512; seeded) is exported with lmforge's own HF
exporter (`lmforge.export.hf.export_hf`) to a temporary folder and loaded back
with `transformers.AutoModelForCausalLM` (fp32, eval). Then, for each batch
size, the same prompt tokens are continued greedily by 128 new tokens by

- `hf`: `model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`
  (the minimum keeps it from stopping at the end-of-text id);
- `ours`: `lmforge.model.generate.generate(model, prompt, N, temperature=0)`,

interleaved A/B over several repeats so machine noise hits both alike, both
under `torch.inference_mode`. Reported: the median new tokens/s of each (batch
× new tokens / wall time of the whole call, prompt processing included), the
ratio ours/hf, and how many generated token ids agree (greedy on a random model
has near-ties, so a rounding difference may flip a late token; the count says
how often).

    nice -n 10 python benchmarks/generate_speed.py --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from lmforge.config import ModelConfig
from lmforge.export.hf import export_hf
from lmforge.model.generate import generate
from lmforge.model.transformer import Transformer, count_params
from lmforge.tokenizer import train_char

SHAPE = dict(
    vocab_size=8192,
    context_length=512,
    n_layers=6,
    d_model=384,
    n_heads=6,
    norm="layernorm",
    position="learned",
    mlp="gelu",
    bias=True,
    tie_embeddings=True,
)


def build_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**SHAPE)).eval()
    with torch.no_grad():  # zero biases and unit norms would make some layers trivial
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--malloc",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned: glibc settings the `lmforge` command applies (lmforge.malloc), "
        "for both sides, since they share this process",
    )
    args = ap.parse_args()
    if args.malloc == "tuned":
        from lmforge.malloc import tune_malloc

        tune_malloc()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    ours_model = build_model(args.seed)
    n_params = count_params(ours_model.cfg)["total"]
    tok = train_char(["abcdefghijklmnopqrstuvwxyz ,.\n"])  # any tokenizer ≤ the model vocabulary
    N = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours_model, tok, tmp)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    hf_model.eval()
    print(
        f"model: {n_params / 1e6:.1f}M parameters ({type(hf_model).__name__} in transformers "
        f"{transformers.__version__}), torch {torch.__version__}, {args.threads} threads, "
        f"prompt {args.prompt_len} tokens, {N} new tokens, greedy, {args.repeats} repeats"
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for B in args.batches:
        # Avoid the special ids (0..N_special) so no prompt token is an end of text.
        prompt = torch.randint(64, SHAPE["vocab_size"], (B, args.prompt_len), generator=gen)
        mask = torch.ones_like(prompt)

        def run_hf(prompt=prompt, mask=mask) -> torch.Tensor:
            return hf_model.generate(
                prompt,
                attention_mask=mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=N,
                min_new_tokens=N,
                pad_token_id=tok.pad_id,
                eos_token_id=tok.eot_id,
            )

        def run_ours(prompt=prompt) -> torch.Tensor:
            return generate(ours_model, prompt, N, temperature=0)

        run_hf(), run_ours()  # warm-up: allocator, oneDNN kernels, first-call setup
        times: dict[str, list[float]] = {"hf": [], "ours": []}
        outs: dict[str, torch.Tensor] = {}
        for r in range(args.repeats):
            order = [("hf", run_hf), ("ours", run_ours)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                dt, outs[name] = timed(fn)
                times[name].append(dt)
        hf_out, ours_out = outs["hf"], outs["ours"]
        assert hf_out.shape == ours_out.shape == (B, args.prompt_len + N), (
            hf_out.shape,
            ours_out.shape,
        )
        new_hf, new_ours = hf_out[:, args.prompt_len :], ours_out[:, args.prompt_len :]
        same = int((new_hf == new_ours).sum())
        rows_same = int((new_hf == new_ours).all(dim=1).sum())
        tps = {k: B * N / statistics.median(v) for k, v in times.items()}
        spread = {k: (B * N / max(v), B * N / min(v)) for k, v in times.items()}
        ratio = tps["ours"] / tps["hf"]
        per_rep = [h / o for h, o in zip(times["hf"], times["ours"], strict=True)]
        rows.append((B, tps, ratio, same, rows_same, new_hf.numel()))
        print(
            f"batch {B}: hf {tps['hf']:.0f} tok/s [{spread['hf'][0]:.0f}–{spread['hf'][1]:.0f}], "
            f"ours {tps['ours']:.0f} tok/s [{spread['ours'][0]:.0f}–{spread['ours'][1]:.0f}], "
            f"ratio of medians {ratio:.2f}× (per-repeat ratios "
            f"{min(per_rep):.2f}–{max(per_rep):.2f}, median {statistics.median(per_rep):.2f}); "
            f"token ids agree {same}/{new_hf.numel()}, rows identical {rows_same}/{B}",
            flush=True,
        )
    print("\n| batch | HF generate tok/s | lmforge tok/s | ratio | ids agree |")
    print("|---|---|---|---|---|")
    for B, tps, ratio, same, rows_same, n in rows:
        print(
            f"| {B} | {tps['hf']:.0f} | {tps['ours']:.0f} | {ratio:.2f}× | "
            f"{same}/{n} ({rows_same}/{B} rows) |"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
