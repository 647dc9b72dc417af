"""`lmforge export` and `lmforge import`: checkpoints to and from the wider ecosystem."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli_args import add_checkpoint_arg, add_command


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    fmt: str = "hf",
    dtype: str = "",
    license: str = "other",
    price_per_hour: float = 0.0,
) -> Path:
    """Export a checkpoint (or run folder) to a transformers folder or a GGUF file, with a card.

    `out` is a folder; GGUF writes ``model-DTYPE.gguf`` inside it. Returns what was written
    (the folder for HF, the file for GGUF).
    """
    from lmforge.export.hf import ExportError, hf_architecture
    from lmforge.export.model_card import model_card
    from lmforge.model_source import load_model, resolve_model

    path = resolve_model(checkpoint).path
    model, tok, cfg = load_model(path)
    arch = hf_architecture(cfg.model)  # refuse before writing anything
    out = Path(out)
    if fmt == "hf":
        from lmforge.export.hf import export_hf

        written = export_hf(model, tok, out, dtype or "f32", chat=cfg.tokenizer)
    elif fmt == "gguf":
        from lmforge.export.gguf import export_gguf

        written = export_gguf(model, tok, out, dtype or "f16", name=cfg.name)
    else:
        raise ExportError(f"--format {fmt!r} is not 'hf' or 'gguf'")
    card = model_card(cfg, arch, path, fmt, license=license, price_per_hour=price_per_hour)
    (out / "README.md").write_text(card, encoding="utf-8")
    return written


def cmd_export(args, overrides) -> int:
    """Export a checkpoint as a transformers folder (--format hf) or a GGUF file for llama.cpp."""
    written = export_checkpoint(
        args.checkpoint, args.out, args.format, args.dtype, args.license, args.price_per_hour
    )
    print(f"wrote {written} (+ README.md model card)")
    return 0


def cmd_import(args, overrides) -> int:
    """Convert a transformers folder (Llama, Mistral, Qwen2, Qwen3, GPT-2) into an lmforge run."""
    from lmforge.export.hf import ExportError, import_hf

    if args.format != "hf":
        raise ExportError(f"--format {args.format!r}: only 'hf' folders can be imported")
    ckpt = import_hf(args.path, args.out, args.tokenizer or None)
    print(f"wrote {ckpt}; try: lmforge generate --checkpoint {args.out} --prompt 'Hello'")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "export", cmd_export)
    add_checkpoint_arg(p)
    p.add_argument("--format", choices=["hf", "gguf"], default="hf")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--dtype",
        default="",
        help="weights: f32|f16|bf16 (hf, default f32) or f32|f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0 (gguf, default f16)",
    )
    p.add_argument("--license", default="other", help="licence id for the model card metadata")
    p.add_argument(
        "--price-per-hour", type=float, default=0.0, help="US$ per training hour, for the card"
    )

    p = add_command(subparsers, "import", cmd_import)
    p.add_argument(
        "path", help="transformers model folder (config.json, safetensors, tokenizer.json)"
    )
    p.add_argument("--format", choices=["hf"], default="hf")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--tokenizer", default="", help="tokenizer.json to use instead of the folder's")
