"""Fine-tuning experiments behind BENCHMARKS.md "Fine-tuning".

    python benchmarks/finetune_experiments.py translation   --out /tmp/finetune/mt30
    python benchmarks/finetune_experiments.py summarization --out /tmp/finetune/scitldr
    python benchmarks/finetune_experiments.py instruction   --out /tmp/finetune/instr
    python benchmarks/finetune_experiments.py lora-vs-full  --base /tmp/finetune/mt30 --out /tmp/finetune/lvf

Each runs the built-in recipe (finetune-multi30k, finetune-scitldr,
finetune-self-instruct) unless its run folder already holds a summary, then
prints the figures. `lora-vs-full` continues the translation model's training
for the same steps with full fine-tuning and with LoRA, each in its own process,
and reports trainable parameters, peak resident memory (ru_maxrss) and BLEU/chrF
on the first `--test-n` test sentences. Wall times are on whatever machine runs
this; on a shared machine they are only indicative.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_recipe(recipe: str, out: Path, extra: list[str]) -> dict:
    if not (out / "summary.json").exists():
        cmd = [
            sys.executable,
            "-m",
            "lmforge",
            "finetune",
            recipe,
            "--out",
            str(out),
            "--resume",
            "auto",
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd + extra, check=True)
        print(
            f"{recipe}: {time.perf_counter() - t0:.0f}s wall (training, evaluation and test decoding)"
        )
    return json.loads((out / "summary.json").read_text())


def show(summary: dict, keys: list[str]) -> None:
    print(json.dumps({k: summary.get(k) for k in keys}, indent=1, default=str))


def lead_baseline() -> dict[str, float]:
    """ROUGE of the first abstract sentence against the author TLDR, on SciTLDR test."""
    from lmforge.finetune.finetune import score
    from lmforge.finetune.tasks import get_task, read_records
    from lmforge.paths import shared_data

    task = get_task("summarization")
    recs = list(read_records(str(shared_data() / "scitldr" / "test.jsonl")))
    hyps = [r.data["source"][0].strip() for r in recs]
    refs = [task.reference(r) for r in recs if task.reference is not None]
    return score("rouge", hyps, refs)


def sample_answers(run: Path, n: int) -> None:
    """Greedy answers of the instruction-tuned model to held-out user-oriented instructions."""
    from lmforge.config import load_config
    from lmforge.finetune.finetune import finetuned_checkpoint, generate_answers, resolve_spec
    from lmforge.finetune.tasks import get_task, load_examples
    from lmforge.pretrain import load_model

    cfg = load_config("finetune-self-instruct")
    model, tok, _ = load_model(finetuned_checkpoint(run))
    specs = [resolve_spec(s) for s in cfg.finetune.val_files]
    examples = load_examples(get_task("instruction"), tok, specs, limit=n)
    for ex, answer in zip(examples, generate_answers(model, tok, examples, 60), strict=True):
        print("PROMPT:", tok.decode(ex.ids[: ex.prompt_len])[:300].replace("\n", " "))
        print("REFERENCE:", ex.reference[:200].replace("\n", " "))
        print("MODEL:", answer[:300].replace("\n", " "))
        print("-" * 60)


def one_method(method: str, base: Path, out: Path, steps: int, test_n: int) -> None:
    """Child process: fine-tune `base` with `method`, then print a JSON line of figures."""
    from lmforge.config import load_config
    from lmforge.finetune.finetune import finetune

    cfg = load_config(
        "finetune-multi30k",
        [
            f"finetune.init={base}",
            f"finetune.method={method}",
            "finetune.lora_rank=16",
            "finetune.lora_alpha=32",
            "finetune.lora_targets=[attn.qkv, attn.proj, mlp.up, mlp.down]",
            f"finetune.max_steps={steps}",
            f"finetune.max_examples={test_n}",  # caps val/test decoding; training data below
            "finetune.eval_examples=0",
            "train.eval_every=100000",
            "train.warmup_steps=5",
            "train.max_time_s=0",
            "train.lr=1e-3" if method == "full" else "train.lr=3e-3",
        ],
    )
    # Train on all of Multi30k, but decode only `test_n` test sentences.
    t0 = time.perf_counter()
    import lmforge.finetune.finetune as ft

    real_load = ft.load_examples

    def load(task, tok, specs, *lang, limit=0):
        train = any(s.endswith("/train") for s in specs)
        return real_load(task, tok, specs, *lang, limit=0 if train else limit)

    ft.load_examples = load  # type: ignore[assignment]
    summary = finetune(cfg, out)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT "
        + json.dumps(
            {
                "method": method,
                "trainable_params": summary["trainable_params"],
                "total_params": summary["total_params"],
                "peak_rss_mib": round(peak_mib, 1),
                "train_loss": summary.get("loss"),
                "val_loss": summary.get("val_loss"),
                "test": summary.get("test"),
                "tokens_per_s": summary.get("tokens_per_s"),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "experiment",
        choices=["translation", "summarization", "instruction", "lora-vs-full", "_one"],
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", type=Path, help="lora-vs-full: the checkpoint to start from")
    ap.add_argument("--method", default="full")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--test-n", type=int, default=200)
    ap.add_argument("extra", nargs="*", help="recipe overrides, e.g. train.max_steps=100")
    args = ap.parse_args()
    if args.experiment == "translation":
        show(
            run_recipe("finetune-multi30k", args.out, args.extra),
            [
                "step",
                "elapsed_s",
                "loss",
                "val_loss",
                "val_bleu",
                "val_chrf",
                "test",
                "epochs",
                "total_params",
            ],
        )
    elif args.experiment == "summarization":
        s = run_recipe("finetune-scitldr", args.out, args.extra)
        show(s, ["step", "elapsed_s", "loss", "val_loss", "test", "epochs", "total_params"])
        print("lead-sentence baseline:", json.dumps(lead_baseline()))
    elif args.experiment == "instruction":
        s = run_recipe("finetune-self-instruct", args.out, args.extra)
        show(
            s,
            ["step", "elapsed_s", "loss", "val_loss", "val_ppl", "train_examples", "total_params"],
        )
        sample_answers(args.out, 5)
    elif args.experiment == "lora-vs-full":
        for method in ("full", "lora"):
            cmd = [
                sys.executable,
                __file__,
                "_one",
                "--out",
                str(args.out / method),
                "--base",
                str(args.base),
                "--method",
                method,
                "--steps",
                str(args.steps),
                "--test-n",
                str(args.test_n),
            ]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            print([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    else:
        one_method(args.method, args.base, args.out, args.steps, args.test_n)


if __name__ == "__main__":
    main()
