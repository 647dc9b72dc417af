"""lm-evaluation-harness and lmforge: any lm-eval task on an lmforge model, and cross-checks.

`lm_eval_model` makes an lm-eval model (`lm_eval.api.model.LM`) backed by an
lmforge `Transformer`, so `lmforge eval --task lm-eval:NAME` runs any of lm-eval's tasks
(from local task YAML and data files: there is no hub here) with lm-eval's own
prompts, few-shot sampling and metrics. It encodes requests as lm-eval's `hf`
model does (`encode_request`; the same left truncation to the context), so on an
exported model the two agree item by item.

The cross-check helpers, used by the parity tests and `benchmarks/eval_speed.py`:

- `write_gpt2_folder` writes a GPT-2-shaped lmforge model as a transformers
  GPT-2 folder (weights and tokenizer). `lmforge.export.hf` is the product's
  exporter; this small copy keeps the cross-check independent of it, so a bug in
  one cannot hide a bug in the other.
- `write_lm_eval_task` writes items in our generic multiple-choice JSONL plus a
  local lm-eval task YAML over that file (no download);
- `run_lm_eval` runs lm-eval's `hf` model on it and returns the per-item
  log-likelihoods, in item order.

Needs the `hf` extra and `lm-eval[hf]`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.eval.multiple_choice import MCItem, MCResult, write_mc_jsonl
from lmforge.model.transformer import Transformer, derived_d_ff
from lmforge.tokenizer import EOT, PAD, BPETokenizer


def write_gpt2_folder(model: Transformer, tok: BPETokenizer, folder: str | Path) -> Path:
    """A transformers GPT-2 folder holding exactly `model`'s weights.

    The model must be GPT-2-shaped: layernorm with bias, learned positions, GELU
    (tanh, = `gelu_new`), biases on, tied embeddings, multi-head attention.
    GPT-2's `Conv1D` layers store weights as (in, out): ours transposed.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    c = model.cfg
    shaped = (
        c.norm == "layernorm"
        and c.position == "learned"
        and c.mlp == "gelu"
        and c.bias
        and c.tie_embeddings
        and not c.qk_norm
        and (c.n_kv_heads in (0, c.n_heads))
    )
    if not shaped:
        raise ValueError("write_gpt2_folder needs a GPT-2-shaped model (see its docstring)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_cfg = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.context_length,
        n_embd=c.d_model,
        n_layer=c.n_layers,
        n_head=c.n_heads,
        n_inner=derived_d_ff(c),
        activation_function="gelu_new",
        layer_norm_epsilon=c.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eot_id,
        eos_token_id=tok.eot_id,
        pad_token_id=tok.pad_id,
        tie_word_embeddings=True,
    )
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {
        "transformer.wte.weight": ours["tok_emb.weight"],
        "transformer.wpe.weight": ours["pos_emb.weight"],
        "transformer.ln_f.weight": ours["norm.weight"],
        "transformer.ln_f.bias": ours["norm.bias"],
        "lm_head.weight": ours["tok_emb.weight"],
    }
    names = {
        "ln_1": "attn_norm",
        "ln_2": "mlp_norm",
        "attn.c_attn": "attn.qkv",
        "attn.c_proj": "attn.proj",
        "mlp.c_fc": "mlp.up",
        "mlp.c_proj": "mlp.down",
    }
    for i in range(c.n_layers):
        for hf_name, our_name in names.items():
            w = ours[f"blocks.{i}.{our_name}.weight"]
            conv = not hf_name.startswith("ln")
            state[f"transformer.h.{i}.{hf_name}.weight"] = w.t().contiguous() if conv else w
            state[f"transformer.h.{i}.{hf_name}.bias"] = ours[f"blocks.{i}.{our_name}.bias"]
    hf_model = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # GPT-2 keeps a causal-mask buffer in some versions; no weight may be missing.
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 weight mapping: missing {missing}, unexpected {unexpected}")
    hf_model.save_pretrained(folder)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok.hf, eos_token=EOT, bos_token=EOT, unk_token=EOT, pad_token=PAD
    )
    hf_tok.model_max_length = c.context_length
    hf_tok.save_pretrained(folder)
    return folder


def write_lm_eval_task(items: list[MCItem], folder: str | Path, name: str) -> Path:
    """`folder/{name}.jsonl` and `folder/{name}.yaml`: a local zero-shot multiple-choice task."""
    folder = Path(folder)
    data = write_mc_jsonl(items, folder / f"{name}.jsonl")
    # Column names (not Jinja templates) for text, choices and target: lm-eval then
    # takes the fields verbatim, so quotes or braces inside the data cannot break it.
    yaml_text = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {json.dumps(str(data.resolve()))}
validation_split: validation
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
    (folder / f"{name}.yaml").write_text(yaml_text)
    return folder


def run_lm_eval(
    hf_folder: str | Path, task_folder: str | Path, name: str, batch_size: int = 16
) -> tuple[MCResult, dict[str, Any]]:
    """Run lm-eval's `hf` model (CPU, float32) on the local task; per-item log-likelihoods + its metrics."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_folder},dtype=float32",
        tasks=[name],
        task_manager=TaskManager(include_path=str(task_folder)),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        num_fewshot=0,
    )
    assert out is not None
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    result = MCResult(
        loglikelihoods=[[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        labels=[int(s["doc"]["label"]) for s in samples],
        choices=[list(s["doc"]["choices"]) for s in samples],
    )
    return result, out["results"][name]


# ----------------------------------------------------------------------------- lm-eval model


def lm_eval_model(model: Transformer, tok: Any, max_gen_toks: int = 256) -> Any:
    """An lm-eval `LM` backed by `model` and `tok` (greedy generation, fp32 scores)."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from lmforge.eval.multiple_choice import encode_request
    from lmforge.model.generate import generate

    n_ctx = model.cfg.context_length

    class _LmforgeLM(LM):
        def _logprobs(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            whole = (context + continuation)[-(n_ctx + 1) :]
            inp = torch.tensor([whole[:-1]])
            with torch.no_grad():
                logits = model(inp)[0, -len(continuation) :].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(continuation)
            total = float(logp.gather(1, target[:, None]).sum())
            return total, bool((logp.argmax(-1) == target).all())

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list:
            out = []
            for req in requests:
                context, continuation = req.args
                out.append(self._logprobs(*encode_request(tok, context, continuation)))
            return out

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
            out = []
            for req in requests:
                windows = get_rolling_token_windows(
                    token_list=tok.encode(req.args[0]),
                    prefix_token=tok.eot_id,
                    max_seq_len=n_ctx,
                    context_len=1,
                )
                pairs = [make_disjoint_window(w) for w in windows]
                out.append(sum(self._logprobs(list(c), list(t))[0] for c, t in pairs))
            return out

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                context, kwargs = req.args
                until = [u for u in kwargs.get("until", []) if u]
                n_new = int(kwargs.get("max_gen_toks", max_gen_toks))
                ids = tok.encode(context)[-(n_ctx - 1) :]
                new = generate(model, ids, n_new, temperature=0, stop_ids=[tok.eot_id])
                text = tok.decode([i for i in new[0, len(ids) :].tolist() if i != tok.eot_id])
                cut = min([text.index(u) for u in until if u in text], default=len(text))
                out.append(text[:cut])
            return out

    return _LmforgeLM()


def run_lm_eval_tasks(
    model: Transformer,
    tok: Any,
    tasks: list[str],
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on an lmforge model: {"results", "samples", "configs"}."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    out = lm_eval.simple_evaluate(
        model=lm_eval_model(model.eval(), tok),
        tasks=tasks,
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=True,
    )
    assert out is not None
    return out
