"""DPO on a preference set built from the shared Self-Instruct data: held-out reward accuracy
before and after, and the tokens/s of a DPO step against a plain (SFT) step of the same model.

The preference set: every instance of Self-Instruct's seed and user-oriented tasks
(``$LMFORGE_SHARED_DATA/self_instruct``) gives one pair: prompt = the instruction (and its
input), chosen = the real output, rejected = the same output with its words shuffled
(seeded). 20% of the pairs (every fifth) are held out. Answers longer than 60 words
are dropped so that a pair fits the 256-token context.

The starting model is a fresh small Llama-shaped model (2 layers, d_model 128, BPE 1000
trained on the pair texts), first fine-tuned with SFT on the training pairs' chosen
answers for `--sft-steps` steps (so that the reference already reads the answers a little);
DPO then runs for `--steps` steps from that checkpoint.

Reward accuracy = the share of held-out pairs whose implicit reward β(log π − log π_ref)
is higher for the chosen answer; a tie counts one half. At the start the policy is the
reference, every reward is 0, and the accuracy is exactly 50%.

    python benchmarks/dpo_shared.py                  # ≈ 3 minutes on 2 cores
    python benchmarks/dpo_shared.py --steps 300 --out /tmp/dpo_bench
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch

from lmforge.config import load_config
from lmforge.finetune.finetune import finetune
from lmforge.finetune.preference import REF_CACHE, PairSource, load_pairs, sequence_logps
from lmforge.paths import shared_data
from lmforge.pretrain import load_model


def build_pairs(out: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """train.jsonl / val.jsonl preference files and sft.jsonl (instruction → chosen)."""
    rng = random.Random(seed)
    rows = []
    for name in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl"):
        for line in (shared_data() / "self_instruct" / name).read_text().splitlines():
            rec = json.loads(line)
            for inst in rec["instances"]:
                answer = inst["output"].strip()
                words = answer.split()
                if not 4 <= len(words) <= 60:
                    continue
                shuffled = words[:]
                while shuffled == words:
                    rng.shuffle(shuffled)
                prompt = rec["instruction"] + (f"\n\n{inst['input']}" if inst["input"] else "")
                rows.append({"prompt": prompt, "chosen": answer, "rejected": " ".join(shuffled)})
    out.mkdir(parents=True, exist_ok=True)
    files = out / "train.jsonl", out / "val.jsonl", out / "sft.jsonl"
    train = [r for i, r in enumerate(rows) if i % 5]
    val = [r for i, r in enumerate(rows) if not i % 5]
    sft = [{"instruction": r["prompt"], "output": r["chosen"]} for r in train]
    for path, recs in zip(files, (train, val, sft), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return files


def common(out: Path, steps: int) -> list[str]:
    return [
        f"output.dir={out}",
        "train.micro_batch_size=8",
        "train.tokens_per_step=2048",
        f"train.max_steps={steps}",
        "train.warmup_steps=10",
        "train.log_every=10",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.dtype=fp32",
        "train.threads=2",
    ]


def held_out_accuracy(run_or_ckpt: Path, val: Path, ref: torch.Tensor, beta: float) -> float:
    model, tok, _ = load_model(run_or_ckpt)
    model.eval()
    source = PairSource(load_pairs(tok, [str(val)]), model.cfg.context_length, tok.pad_id)
    wins = 0.0
    with torch.no_grad():
        for i, (x, y) in enumerate(source.sequential(16)):
            logps, _ = sequence_logps(model(x), y[:, :-1])
            chosen, rejected = logps.double().chunk(2)
            r = ref[i * 16 : i * 16 + len(chosen)]
            rc, rr = beta * (chosen - r[:, 0]), beta * (rejected - r[:, 1])
            wins += float((rc > rr).sum()) + 0.5 * float((rc == rr).sum())
    return wins / source.n_pairs


def median_tok_s(run: Path) -> float:
    recs = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in recs if "tokens_per_s" in r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="dpo_bench_"))
    train, val, sft = build_pairs(out / "data")
    model_keys = [
        "model.context_length=256",
        "model.n_layers=2",
        "model.d_model=128",
        "model.n_heads=4",
        "model.norm=rmsnorm",
        "model.position=rope",
        "model.mlp=swiglu",
        "tokenizer.kind=bpe",
        "tokenizer.vocab_size=1000",
    ]
    sft_cfg = load_config(
        None,
        [
            *model_keys,
            *common(out / "sft", args.sft_steps),
            "train.lr=3e-3",
            "finetune.task=instruction",
            f"finetune.train_files=[{sft}]",
            "finetune.eval_examples=0",
        ],
    )
    if not (out / "sft" / "summary.json").exists():  # a rerun with the same --out reuses it
        finetune(sft_cfg)
    dpo_cfg = load_config(
        None,
        [
            *common(out / "dpo", args.steps),
            "train.lr=1e-3",
            f"finetune.init={out / 'sft'}",
            "finetune.objective=dpo",
            f"finetune.dpo_beta={args.beta}",
            f"finetune.train_files=[{train}]",
            f"finetune.val_files=[{val}]",
        ],
    )
    summary = finetune(dpo_cfg)
    from safetensors.torch import load_file

    ref = load_file(str(out / "dpo" / REF_CACHE))["val"]
    before = held_out_accuracy(out / "sft", val, ref, args.beta)
    after = held_out_accuracy(out / "dpo", val, ref, args.beta)
    # A plain step of the same model, batch and tokens per step: SFT on the same pairs'
    # chosen answers, from the same start.
    plain_cfg = load_config(
        None,
        [
            *common(out / "plain", min(args.steps, 30)),
            f"finetune.init={out / 'sft'}",
            "finetune.task=instruction",
            f"finetune.train_files=[{sft}]",
            "finetune.eval_examples=0",
        ],
    )
    finetune(plain_cfg)
    dpo_tok_s, plain_tok_s = median_tok_s(out / "dpo"), median_tok_s(out / "plain")
    print(
        json.dumps(
            {
                "train_pairs": summary["train_pairs"],
                "val_pairs": sum(1 for _ in val.open()),
                "dpo_steps": args.steps,
                "held_out_reward_acc_before": before,
                "held_out_reward_acc_after": after,
                "val_reward_acc_logged": summary.get("val_reward_acc"),
                "val_reward_margin": summary.get("val_reward_margin"),
                "dpo_tokens_per_s": dpo_tok_s,
                "plain_tokens_per_s": plain_tok_s,
                "plain_over_dpo": plain_tok_s / dpo_tok_s,
                "out": str(out),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
