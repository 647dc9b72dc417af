"""Cross-check against the real clients: transformers GPT-2 and lm-evaluation-harness."""

import pytest
import torch
from helpers import require_interop

from lmforge.config import ModelConfig
from lmforge.eval.multiple_choice import load_hellaswag, score_items
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tok(shared):
    items = load_hellaswag(shared / "hellaswag", limit=2000)
    return train_bpe([f"{it.context} {' '.join(it.choices)}" for it in items], 1024)


def gpt2_like(tok, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, context_length=256, n_layers=2, d_model=64, n_heads=4, bias=True
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up in the mapping shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_gpt2_folder_has_our_logits_and_tokens(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.eval.lm_eval_bridge import write_gpt2_folder

    model = gpt2_like(tok)
    write_gpt2_folder(model, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Roof shingle removal: A man is sitting on a roof. he starts pulling up roofing."
    ids = tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)


def test_hellaswag_accuracy_equals_lm_eval_per_item(tok, shared, tmp_path):
    """300 HellaSwag items: lm-eval's `hf` model on a local task vs our scorer, item by item.

    Needs the `interop` extra (lm-eval); mandatory under `.ci/run`."""
    require_interop("lm_eval", "lm-eval")
    from lmforge.eval.lm_eval_bridge import run_lm_eval, write_gpt2_folder, write_lm_eval_task

    items = load_hellaswag(shared / "hellaswag", limit=300)
    model = gpt2_like(tok)
    write_gpt2_folder(model, tok, tmp_path / "hf")
    write_lm_eval_task(items, tmp_path / "task", "lmforge_hellaswag_parity")
    theirs, metrics = run_lm_eval(tmp_path / "hf", tmp_path / "task", "lmforge_hellaswag_parity")
    ours = score_items(model, tok, items)
    assert theirs.n == ours.n == 300
    for a, b in zip(ours.loglikelihoods, theirs.loglikelihoods, strict=True):
        assert a == pytest.approx(b, abs=1e-3)
    diff = max(
        abs(x - y)
        for a, b in zip(ours.loglikelihoods, theirs.loglikelihoods, strict=True)
        for x, y in zip(a, b, strict=True)
    )
    assert ours.correct("none") == theirs.correct("none")
    assert ours.correct("chars") == theirs.correct("chars")
    assert ours.accuracy("none") == pytest.approx(metrics["acc,none"])
    assert ours.accuracy("chars") == pytest.approx(metrics["acc_norm,none"])
    print(
        f"HellaSwag 300 items: acc ours {ours.accuracy():.4f} lm-eval {metrics['acc,none']:.4f}; "
        f"acc_norm ours {ours.accuracy('chars'):.4f} lm-eval {metrics['acc_norm,none']:.4f}; "
        f"max |Δ log-likelihood| {diff:.1e}"
    )


def write_tasks(items, folder):
    """Three local lm-eval tasks over the same items: 2-shot multiple choice, rolling
    log-likelihood (perplexity) and greedy generation until a newline."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    with data.open("w") as f:
        for it in items:
            row = {"context": it.context, "choices": it.choices, "label": it.label}
            f.write(json.dumps(row | {"text": it.context + " " + it.choices[it.label]}) + "\n")
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    validation: {json.dumps(str(data))}
validation_split: validation
fewshot_split: validation
"""
    (folder / "mc.yaml").write_text(
        "task: lmf_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: context\n"
        "doc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "rolling.yaml").write_text(
        "task: lmf_rolling\n" + common + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n"
    )
    (folder / "gen.yaml").write_text(
        "task: lmf_gen\n" + common + "output_type: generate_until\ndoc_to_text: context\n"
        "doc_to_target: text\ngeneration_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 12\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    return folder


def test_any_lm_eval_task_runs_on_an_lmforge_model_as_on_its_export(tok, shared, tmp_path):
    """The lm-eval adapter against lm-eval's own `hf` model on the exported folder, item by
    item, for the three request kinds; multiple choice with 2 few-shot examples. Sums of
    fp32 log-probabilities over ≤ 256 tokens: 1e-3 absolute (≈ 256 × a few ulp of ~10)."""
    require_interop("lm_eval", "lm-eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmforge.eval.lm_eval_bridge import run_lm_eval_tasks, write_gpt2_folder

    items = load_hellaswag(shared / "hellaswag", limit=12)
    model = gpt2_like(tok)
    write_gpt2_folder(model, tok, tmp_path / "hf")
    folder = write_tasks(items, tmp_path / "tasks")
    names = ["lmf_mc", "lmf_rolling", "lmf_gen"]
    ours = run_lm_eval_tasks(model, tok, names, folder, num_fewshot=None)["samples"]
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
        tasks=names,
        task_manager=TaskManager(include_path=str(folder)),
        device="cpu",
        log_samples=True,
    )["samples"]
    mc_ours = run_lm_eval_tasks(model, tok, ["lmf_mc"], folder, num_fewshot=2)["samples"]
    mc_theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
        tasks=["lmf_mc"],
        task_manager=TaskManager(include_path=str(folder)),
        device="cpu",
        num_fewshot=2,
        log_samples=True,
    )["samples"]
    ours["lmf_mc_2shot"], theirs["lmf_mc_2shot"] = mc_ours["lmf_mc"], mc_theirs["lmf_mc"]
    for name in ["lmf_mc", "lmf_rolling", "lmf_gen", "lmf_mc_2shot"]:
        a = sorted(ours[name], key=lambda s: s["doc_id"])
        b = sorted(theirs[name], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == len(items), name
        for x, y in zip(a, b, strict=True):
            assert x["arguments"] == y["arguments"], name  # same prompts, few-shot included
            if name == "lmf_gen":
                assert x["filtered_resps"] == y["filtered_resps"], name
                continue
            got = [float(r[0] if isinstance(r, list | tuple) else r) for r in x["filtered_resps"]]
            want = [float(r[0] if isinstance(r, list | tuple) else r) for r in y["filtered_resps"]]
            assert got == pytest.approx(want, abs=1e-3), name
