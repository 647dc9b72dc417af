"""A model card (`README.md` in the HF model-card format) for an exported model.

The card follows the sections of Mitchell et al. 2019 ("Model Cards for Model
Reporting") as the HF Hub lays them out: YAML metadata, model details, training
data and licences, training procedure and compute (with energy, CO2 and cost
estimates whose assumptions are printed), evaluation, bias audit, intended use and
limitations. Facts come from the run folder when present (`summary.json`,
`eval.json`, `data_report.json`, `bias*.json`); sections without data say so
rather than being left out, so a reader can see what was not measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.config import Config, ModelConfig
from lmforge.energy import GRID_KG_PER_KWH, PUE, co2_kg, device_power_w, energy_kwh
from lmforge.model.transformer import count_params, derived_d_ff, flops_per_token

HF_CLASS = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def optimizer_description(t: Any) -> str:
    """The optimiser a run really used, as its saved `train` section records it."""
    adamw = f"AdamW (lr {t.lr:g}, weight decay {t.weight_decay:g})"
    if t.optimizer == "muon":
        return (
            f"Muon on the blocks' weight matrices (lr {t.muon_lr:g}, momentum "
            f"{t.muon_momentum:g}, weight decay {t.muon_weight_decay:g}) and {adamw} on the rest"
        )
    return adamw


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.3g}"


def _eval_rows(eval_json: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not isinstance(eval_json, dict):
        return rows
    for ck in eval_json.get("checkpoints", []):
        for r in ck.get("results", []):
            if isinstance(r, dict) and "task" in r and "value" in r:
                rows.append(dict(r, checkpoint=ck.get("checkpoint", "")))
    return rows


def _result_text(r: dict[str, Any]) -> str:
    v = r.get("value")
    if v is None:
        return "n/a"
    text = f"{v:.4f}"
    if r.get("stderr") is not None:
        text += f" ± {r['stderr']:.4f}"
    elif r.get("ci_low") is not None and r.get("ci_high") is not None:
        text += f" [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
    return text


def _flat_numbers(data: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, float]]:
    """Numeric leaves of a JSON tree (for bias reports whose layout this module does not own)."""
    out: list[tuple[str, float]] = []
    if depth > 3:
        return out
    if isinstance(data, dict):
        for k, v in data.items():
            out += _flat_numbers(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out.append((prefix, float(data)))
    return out


def _search_dirs(run: Path) -> list[Path]:
    """Where a checkpoint's run keeps its reports: the training folder itself, or, inside an
    `lmforge run` folder (run/pretrain, run/finetune), the stage folders beside it."""
    top = run.parent
    return [run, run / "eval", top / "eval", top / "prepared", top / "bias"]


def _find(run: Path, name: str) -> Path:
    for folder in _search_dirs(run):
        if (folder / name).is_file():
            return folder / name
    return run / name


def _first_json(candidates: list[Path]) -> tuple[Any, Path | None]:
    for path in candidates:
        data = _read_json(path) if path.is_file() else None
        if data is not None:
            return data, path
    return None, None


def _rows_for(rows: list[dict[str, Any]], checkpoint: Path | None) -> list[dict[str, Any]]:
    """Rows about this checkpoint (or its run folder) when the file covers several."""
    if checkpoint is None:
        return rows
    mine = {checkpoint.resolve(), checkpoint.resolve().parent.parent}
    own = [r for r in rows if r.get("checkpoint") and Path(r["checkpoint"]).resolve() in mine]
    return own or rows


def model_card(
    cfg: Config,
    arch: str,
    checkpoint: Path | None = None,
    fmt: str = "hf",
    license: str = "other",
    price_per_hour: float = 0.0,
) -> str:
    """The card's Markdown text for a model of `cfg` exported as `arch` in format `fmt`.

    Results are looked up around `checkpoint` (``RUN/checkpoints/step_N``): in its run
    folder RUN, and for `lmforge run` folders (RUN = ROOT/pretrain or ROOT/finetune) in
    ROOT/prepared, ROOT/eval and ROOT/bias; `lmforge bias --checkpoint` writes bias.json
    into the checkpoint folder itself.
    """
    found = _run_results(checkpoint)
    summary = found["summary"]
    params = count_params(cfg.model)
    tokens = float(summary.get("tokens", 0))
    lines = _front_matter(arch, fmt, license)
    lines += _details_section(cfg, arch, fmt, params)
    lines += _data_section(cfg, found["data_report"])
    lines += _training_section(cfg, summary, tokens, price_per_hour)
    lines += _evaluation_section(summary, found["evals"])
    lines += _bias_section(found["bias_rows"], found["bias_summary"])
    lines += _use_section(cfg.model, params, tokens, fmt)
    return "\n".join(lines) + "\n"


def _run_results(checkpoint: Path | None) -> dict[str, Any]:
    """The training summary, data report, evaluation and bias results of a checkpoint's run."""
    ckpt = checkpoint if checkpoint is not None and checkpoint.is_dir() else None
    run = ckpt.parent.parent if ckpt is not None else None
    root = run.parent if run is not None else None
    summary = (_first_json([run / "summary.json"])[0] if run else None) or {}
    data_report = (
        _first_json([run / "data_report.json", root / "prepared" / "data_report.json"])[0]
        if run and root
        else None
    ) or {}
    evals: list[dict[str, Any]] = []
    bias_rows: list[dict[str, Any]] = []
    bias_summary: dict[str, Any] = {}
    if run and root and ckpt:
        eval_json, _ = _first_json(
            [run / "eval.json", run / "eval" / "eval.json", root / "eval" / "eval.json"]
        )
        evals = _rows_for(_eval_rows(eval_json), ckpt)
        bias_json, _ = _first_json(
            [
                ckpt / "bias.json",
                run / "bias.json",
                run / "bias" / "bias.json",
                root / "bias" / "bias.json",
            ]
        )
        bias_rows = _rows_for(_eval_rows(bias_json), ckpt)
        if isinstance(bias_json, dict) and not bias_rows:
            bias_summary = bias_json.get("summary") or {}
    bias_rows += [r for r in evals if _is_bias(r)]
    return {
        "summary": summary,
        "data_report": data_report,
        "evals": evals,
        "bias_rows": bias_rows,
        "bias_summary": bias_summary,
    }


def _front_matter(arch: str, fmt: str, license: str) -> list[str]:
    return [
        "---",
        f"license: {license}",
        "library_name: transformers" if fmt == "hf" else "library_name: gguf",
        "pipeline_tag: text-generation",
        "tags:",
        "- lmforge",
        f"- {arch}",
        "- text-generation",
        "---",
        "",
    ]


def _details_section(cfg: Config, arch: str, fmt: str, params: dict[str, int]) -> list[str]:
    """The title, one sentence on what the model is, and the table of its shape."""
    m = cfg.model
    non_embedding = params["total"] - params["embedding"] - params["position"]
    family = "GPT-2-style" if arch == "gpt2" else "Llama-style"
    return [
        f"# {cfg.name or 'lmforge-model'}",
        "",
        f"A {_fmt(params['total'])}-parameter {family} causal language model trained with "
        f"lmforge {__version__}, exported as "
        + (f"a transformers `{HF_CLASS[arch]}`." if fmt == "hf" else f"GGUF (llama.cpp `{arch}`)."),
        "",
        "## Model details",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{HF_CLASS[arch]}` (norm {m.norm}, position {m.position}, MLP {m.mlp}"
        + (", QK-norm" if m.qk_norm else "")
        + (", biases" if m.bias else ", q/k/v biases" if m.qkv_bias else ", no biases")
        + (", tied embeddings" if m.tie_embeddings else ", untied embeddings")
        + ") |",
        f"| parameters | {params['total']:,} ({non_embedding:,} without embeddings) |",
        f"| layers × width | {m.n_layers} × {m.d_model}, MLP hidden {derived_d_ff(m)} |",
        f"| attention heads | {m.n_heads} query, {m.n_kv_heads or m.n_heads} key/value |",
        f"| context length | {m.context_length} tokens |",
        f"| vocabulary | {m.vocab_size} ({cfg.tokenizer.kind} tokenizer) |",
        f"| norm epsilon, RoPE base | {m.norm_eps:g}, "
        + (f"{m.rope_theta:g} |" if m.position == "rope" else "n/a |"),
        # Pipes inside a table cell must be escaped, code spans included (GitHub Markdown).
        "| chat format | `<\\|system\\|>…<\\|end\\|><\\|user\\|>…<\\|end\\|><\\|assistant\\|>` "
        "(the tokenizer's chat template) |",
        "",
    ]


def _data_section(cfg: Config, data_report: dict[str, Any]) -> list[str]:
    """The sources with their licences (from `data_report.json`), or a warning without it."""
    lines = ["## Training data", ""]
    sources = data_report.get("sources") or []
    if not sources:
        lines.append(
            "Sources: "
            + ", ".join(f"`{s}`" for s in cfg.data.sources)
            + ". No data report (`data_report.json`) was found, so licences are not recorded "
            "here: check the licence of every source before redistributing this model."
        )
        return lines
    lines += ["| source | licence | documents out | MB out |", "|---|---|---|---|"]
    for s in sources:
        docs = s.get("docs_out", s.get("docs", ""))
        mb = s.get("bytes_out", 0) / 1e6
        lines.append(
            f"| {s.get('name', '?')} | {s.get('license') or 'unknown'} | {docs} | {mb:.1f} |"
        )
    unknown = data_report.get("unknown_license_sources") or []
    if unknown:
        lines += ["", f"Sources with an unknown licence: {', '.join(unknown)}."]
    return lines


def _training_section(
    cfg: Config, summary: dict[str, Any], tokens: float, price_per_hour: float
) -> list[str]:
    """Steps, tokens, optimiser, compute, time, and the energy model's estimates."""
    lines = ["", "## Training procedure and compute", ""]
    if not summary:
        return [*lines, "No training summary (`summary.json`) was found with this checkpoint."]
    t = cfg.train
    flops = flops_per_token(cfg.model) * tokens
    hours = float(summary.get("elapsed_s", 0.0)) / 3600
    power = device_power_w("cuda" if t.device == "cuda" else "cpu")
    kwh = energy_kwh(hours, power)
    lines += [
        "| | |",
        "|---|---|",
        f"| steps | {summary.get('step', '?')} |",
        f"| tokens | {_fmt(tokens)} ({t.tokens_per_step:,} per step) |",
        f"| optimiser | {optimizer_description(t)}, {t.schedule} schedule, "
        f"warm-up {t.warmup_steps} steps |",
        f"| precision | {t.dtype} |",
        f"| training compute | {flops:.3g} FLOP (forward + backward, attention included) |",
        f"| wall-clock time | {hours:.2f} h |",
        f"| energy (estimate) | {kwh:.3g} kWh at {power:g} W average draw, PUE {PUE} |",
        f"| CO2 (estimate) | {co2_kg(kwh):.3g} kg CO2e at {GRID_KG_PER_KWH} kg/kWh |",
        "| cost (estimate) | "
        + (
            f"${hours * price_per_hour:.2f} at ${price_per_hour:g} per hour |"
            if price_per_hour
            else "not estimated (no price given) |"
        ),
    ]
    return lines


def _evaluation_section(summary: dict[str, Any], evals: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Evaluation", ""]
    if "val_loss" in summary:
        lines.append(f"- validation loss: {summary['val_loss']:.4f} nats/token")
    if "val_bpb" in summary:
        base = summary.get("unigram_bpb")
        lines.append(
            f"- validation bits per byte: {summary['val_bpb']:.4f}"
            + (f" (unigram baseline {base:.4f})" if base else "")
        )
    plain = [r for r in evals if not _is_bias(r)]
    if plain:
        lines += ["", *_results_table(plain)]
    if "val_loss" not in summary and not plain:
        lines.append(
            "No evaluation results were found in the run folder (`lmforge eval` writes them)."
        )
    return lines


def _bias_section(bias_rows: list[dict[str, Any]], bias_summary: dict[str, Any]) -> list[str]:
    lines = ["", "## Bias audit", ""]
    if bias_rows:
        return [
            *lines,
            *_results_table(bias_rows),
            "",
            "Minimal-pair figures are the percentage of pairs where the model prefers the "
            "stereotypical sentence (50 = no preference).",
        ]
    if _flat_numbers(bias_summary):
        return lines + [f"- {k}: {v:.4g}" for k, v in _flat_numbers(bias_summary)[:20]]
    return [
        *lines,
        "No bias audit results were found (`lmforge bias` writes them). Assume the model "
        "reproduces the social biases of its training text.",
    ]


def _use_section(m: ModelConfig, params: dict[str, int], tokens: float, fmt: str) -> list[str]:
    """Intended use and limitations, and how to load the model."""
    lines = [
        "",
        "## Intended use and limitations",
        "",
        f"- Research and teaching: a small model ({_fmt(params['total'])} parameters, "
        f"{_fmt(tokens) if tokens else 'an unrecorded number of'} training tokens) for studying "
        "training, fine-tuning and evaluation end to end.",
        "- Not for production or for decisions about people. Its text is often wrong or "
        "incoherent, it has no safety tuning, and it reflects the biases of its data.",
        f"- It has seen only {m.context_length}-token contexts; longer inputs are out of range.",
        "",
        "## How to use",
        "",
    ]
    if fmt != "hf":
        return [*lines, "```", 'llama-cli -m model.gguf -p "def add(a, b):" -n 40', "```"]
    return [
        *lines,
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'ids = tok("def add(a, b):", return_tensors="pt").input_ids',
        "print(tok.decode(model.generate(ids, max_new_tokens=40)[0]))",
        "```",
    ]


def _results_table(rows: list[dict[str, Any]]) -> list[str]:
    return ["| task | metric | value | n |", "|---|---|---|---|"] + [
        f"| {r['task']} | {r.get('metric', '')} | {_result_text(r)} | {r.get('n', '')} |"
        for r in rows
    ]


def _is_bias(r: dict[str, Any]) -> bool:
    task = str(r.get("task", "")).lower()
    return any(key in task for key in ("bias", "crows", "stereo", "bbq", "winobias"))
