"""`lmforge export` / `lmforge import` end to end on a checkpoint, with the model card."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.cli import main  # noqa: E402
from lmforge.config import load_config, to_dict  # noqa: E402
from lmforge.model import Transformer  # noqa: E402
from lmforge.pretrain import load_model  # noqa: E402
from lmforge.tokenizer import train_bpe  # noqa: E402
from lmforge.train.checkpoint import save_checkpoint  # noqa: E402


@pytest.fixture()
def run(tmp_path):
    """A run folder with one checkpoint, a summary and evaluation/bias results."""
    tok = train_bpe(["def add(a, b):\n    return a + b\n", "Hello there, world."] * 20, 300)
    cfg = load_config(
        None,
        [
            "model.n_layers=2",
            "model.d_model=32",
            "model.n_heads=4",
            "model.context_length=32",
            "model.norm=rmsnorm",
            "model.position=rope",
            "model.mlp=swiglu",
            f"model.vocab_size={tok.vocab_size}",
            "train.tokens_per_step=256",
            "train.micro_batch_size=8",
        ],
    )
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    run = tmp_path / "run"
    save_checkpoint(
        run,
        10,
        model,
        None,
        {"config": to_dict(cfg)},
        extra_files={"tokenizer.json": tok.to_json().encode()},
    )
    (run / "summary.json").write_text(
        json.dumps(
            {
                "step": 10,
                "tokens": 2560,
                "elapsed_s": 36.0,
                "val_loss": 5.1234,
                "val_bpb": 2.5,
                "unigram_bpb": 3.0,
            }
        )
    )
    results = [
        {"task": "hellaswag", "metric": "acc_norm", "value": 0.26, "stderr": 0.01, "n": 100},
        {
            "task": "crows_pairs",
            "metric": "pct_stereotype",
            "value": 0.55,
            "stderr": 0.02,
            "n": 1508,
        },
    ]
    (run / "eval.json").write_text(
        json.dumps(
            {"lmforge_eval": 1, "checkpoints": [{"checkpoint": str(run), "results": results}]}
        )
    )
    return run, model, tok


def test_cli_export_hf_import_roundtrip_and_card(run, tmp_path, capsys):
    run_dir, model, tok = run
    out = tmp_path / "hf"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(run_dir),
                "--format",
                "hf",
                "--out",
                str(out),
                "--license",
                "mit",
                "--price-per-hour",
                "2",
            ]
        )
        == 0
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode("def add(a, b):")])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\n")
    assert "LlamaForCausalLM" in card and f"{model.num_params():,}" in card
    assert "5.1234" in card and "hellaswag" in card and "0.2600 ± 0.0100" in card
    bias_section = card.split("## Bias audit")[1].split("##")[0]
    assert "crows_pairs" in bias_section and "hellaswag" not in bias_section
    assert "$0.02 at $2 per hour" in card  # 36 s at $2/h

    assert main(["import", str(out), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    back, back_tok, _ = load_model(tmp_path / "back")
    for key, w in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], w), key
    assert back_tok.encode("Hello there") == tok.encode("Hello there")


def test_cli_export_gguf_and_refusal(run, tmp_path, capsys):
    run_dir, _, _ = run
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(run_dir),
                "--format",
                "gguf",
                "--out",
                str(tmp_path / "g"),
                "--dtype",
                "q8_0",
            ]
        )
        == 0
    )
    assert (tmp_path / "g" / "model-q8_0.gguf").stat().st_size > 0
    assert "library_name: gguf" in (tmp_path / "g" / "README.md").read_text()
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(run_dir),
                "--format",
                "hf",
                "--out",
                str(tmp_path / "x"),
                "--dtype",
                "int3",
            ]
        )
        == 1
    )
    assert "int3" in capsys.readouterr().err


def test_model_card_finds_results_of_an_lmforge_run_folder(run, tmp_path):
    """`lmforge run` layout: ROOT/pretrain/checkpoints, ROOT/eval, ROOT/bias, ROOT/prepared."""
    from lmforge.export.model_card import model_card
    from lmforge.pretrain import load_model
    from lmforge.train.checkpoint import resolve_checkpoint

    run_dir, _, _ = run
    root = tmp_path / "root"
    root.mkdir()
    pretrain_dir = run_dir.rename(root / "pretrain")
    (pretrain_dir / "eval.json").unlink()
    ckpt = resolve_checkpoint(pretrain_dir)
    other = {
        "checkpoint": str(root / "finetune"),
        "results": [{"task": "scitldr", "metric": "rougeL", "value": 0.31, "n": 10}],
    }
    mine = {
        "checkpoint": str(pretrain_dir),
        "results": [{"task": "hellaswag", "metric": "acc", "value": 0.25, "stderr": 0.01, "n": 50}],
    }
    (root / "eval").mkdir()
    (root / "eval" / "eval.json").write_text(json.dumps({"checkpoints": [mine, other]}))
    (root / "bias").mkdir()
    (root / "bias" / "bias.json").write_text(
        json.dumps(
            {
                "lmforge_bias": 1,
                "checkpoints": [
                    {
                        "checkpoint": str(ckpt),
                        "results": [
                            {
                                "task": "crows_pairs",
                                "metric": "pct_stereotype",
                                "value": 57.5,
                                "ci_low": 55.0,
                                "ci_high": 60.0,
                                "n": 1508,
                            }
                        ],
                    }
                ],
            }
        )
    )
    (root / "prepared").mkdir()
    (root / "prepared" / "data_report.json").write_text(
        json.dumps(
            {
                "sources": [
                    {
                        "name": "gutenberg",
                        "license": "public-domain",
                        "docs_out": 15,
                        "bytes_out": 12_400_000,
                    }
                ],
                "unknown_license_sources": ["web"],
            }
        )
    )
    _, _, cfg = load_model(ckpt)
    card = model_card(cfg, "llama", ckpt)
    evaluation = card.split("## Evaluation")[1].split("## Bias audit")[0]
    assert "hellaswag" in evaluation and "scitldr" not in evaluation  # another model's result
    assert "| crows_pairs | pct_stereotype | 57.5000 [55.0000, 60.0000] | 1508 |" in card
    assert "| gutenberg | public-domain | 15 | 12.4 |" in card and "unknown licence: web" in card


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_model_card_names_the_optimizer_the_run_used(run, tmp_path, optimizer):
    """The card reads the optimiser from the checkpoint's saved config, Muon runs included."""
    from lmforge.export.model_card import model_card
    from lmforge.train.checkpoint import resolve_checkpoint

    run_dir, model, _ = run
    cfg = load_config(None, [f"train.optimizer={optimizer}", "train.muon_lr=0.03"])
    ckpt = tmp_path / optimizer
    save_checkpoint(ckpt, 10, model, None, {"config": to_dict(cfg)})
    (ckpt / "summary.json").write_text((run_dir / "summary.json").read_text())
    card = model_card(cfg, "llama", resolve_checkpoint(ckpt))
    row = next(line for line in card.splitlines() if line.startswith("| optimiser |"))
    if optimizer == "muon":
        assert "Muon" in row and "lr 0.03" in row and "AdamW" in row  # AdamW on the rest
    else:
        assert "Muon" not in row and "AdamW" in row
