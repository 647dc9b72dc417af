"""Throughput of `lmforge serve`'s OpenAI-compatible API with 1 and with N concurrent clients.

A random GPT-2-shaped checkpoint (the size of `benchmarks/generate_speed.py`: 6 layers,
width 384, byte-level BPE of 8,192 trained on tinyshakespeare) is served by uvicorn on
127.0.0.1; each client (a thread with the real `openai` client) sends
`/v1/completions` requests back to back: a prompt of 32 tokens, 64 new tokens, greedy.
The prompts have the same length in tokens, so concurrent requests can share a batch.
Reported: completion tokens per second over the whole run, requests per second, and the
median latency, for 1 client and for N; the ratio N/1 is what batching buys.

    python benchmarks/openai_load.py --clients 8 --requests 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import LiveServer

from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.paths import shared_data
from lmforge.serve import create_app
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import save_checkpoint

TOKEN = "benchmark-organiser-token"


def make_checkpoint(runs: Path) -> tuple[str, list[str]]:
    text = (shared_data() / "tinyshakespeare" / "input.txt").read_text()
    tok = train_bpe([text[i : i + 2000] for i in range(0, 400_000, 2000)], 8192)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, context_length=512, n_layers=6, d_model=384, n_heads=6
    )
    model = Transformer(cfg).eval()
    from lmforge.config import Config, to_dict

    save_checkpoint(
        runs / "bench",
        0,
        model,
        None,
        {"config": to_dict(Config(model=cfg))},
        extra_files={"tokenizer.json": tok.to_json().encode()},
    )
    prompts, pos = [], 0
    while len(prompts) < 64:  # distinct prompts of exactly 32 tokens
        ids = tok.encode(text[pos : pos + 400])[:32]
        pos += 401
        if len(tok.encode(tok.decode(ids))) == 32:
            prompts.append(tok.decode(ids))
    return "bench/checkpoints/step_00000000", prompts


def run(url: str, model: str, prompts: list[str], clients: int, requests: int) -> dict:
    import openai

    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        api = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0, timeout=600)
        barrier.wait()
        for r in range(requests):
            t0 = time.perf_counter()
            out = api.completions.create(
                model=model, prompt=prompts[(c * requests + r) % len(prompts)],
                max_tokens=64, temperature=0,
            )  # fmt: skip
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += out.usage.completion_tokens

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": clients * requests,
        "tokens_per_s": tokens[0] / wall,
        "requests_per_s": clients * requests / wall,
        "median_latency_s": statistics.median(latencies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="per client")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        model, prompts = make_checkpoint(runs)
        app = create_app(runs, organiser_token=TOKEN, resume_generation=False)
        with LiveServer(app) as live:
            run(live.url, model, prompts, 1, 1)  # warm-up: load the model, first decode
            rows = [
                run(live.url, model, prompts, 1, args.requests * 2),
                run(live.url, model, prompts, args.clients, args.requests),
            ]
            batches = app.state.openai_batcher.batches
    print("| clients | requests | completion tokens/s | requests/s | median latency |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.0f} | "
            f"{r['requests_per_s']:.2f} | {r['median_latency_s']:.2f} s |"
        )
    print(
        f"\n{args.clients} clients / 1 client: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}× tokens/s"
    )
    print(f"batch sizes decoded: max {max(batches)}, mean {statistics.mean(batches):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
