"""`lmforge run RECIPE`: every stage of a recipe, in order, into one run folder.

Each stage's output is keyed by a hash of the config sections it reads and of
the keys of the stages it depends on. `stages.json` records, per stage, the key
it was started with and whether it finished:

- finished with the same key → skipped (a rerun with nothing changed takes seconds);
- started with the same key but not finished (killed) → rerun; training stages
  resume from their last checkpoint, the others are idempotent;
- a different key → its folder is removed and the stage runs from scratch, and
  so does every stage downstream (their keys include this one's).

Run folder::

    stages.json          stage keys, completion, timing, summaries
    config.yaml          the resolved config of the last run
    prepared/            prepare: document shards + data_report.json
    tokenizer/           tokenizer.json
    tokens/              train/val token shards
    pretrain/            checkpoints/, metrics.jsonl, summary.json
    finetune/            the same for fine-tuning, plus test outputs
    eval/                eval.json, samples.json
    bias/                bias.json
    export/hf, export/gguf
    report.html, report.md, report/*.png
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.config import RUN_STAGES, Config, dump_yaml, load_config, to_dict
from lmforge.fileio import write_json_atomic
from lmforge.train.dist import print0

# Bump when a stage's outputs change meaning, so old run folders are recomputed.
STAGE_FORMAT = 1


@dataclass
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections (or "section.key") that decide the output
    deps: tuple[str, ...]  # upstream stages whose outputs this one reads
    fn: Callable[[Config, Path], dict[str, Any]]
    folder: str  # sub-folder of the run holding the stage's output ("" = none)


class RunError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- helpers


def _pick(cfg: Config, section: str) -> Any:
    node: Any = to_dict(cfg)
    for part in section.split("."):
        node = node[part]
    return node


def stage_config(cfg: Config, run_dir: Path) -> Config:
    """The config as the stages see it: every path points inside the run folder."""
    data = replace(cfg.data, tokens_dir=str(run_dir / "tokens"))
    if "prepare" in cfg.run.stages and cfg.prepare.sources:
        data = replace(data, sources=[str(run_dir / "prepared" / "shards")])
    tokenizer = cfg.tokenizer
    if not tokenizer.path:
        tokenizer = replace(tokenizer, path=str(run_dir / "tokenizer" / "tokenizer.json"))
    return replace(
        cfg,
        data=data,
        tokenizer=tokenizer,
        output=replace(cfg.output, dir=str(run_dir / "pretrain")),
    )


def final_checkpoint(run_dir: Path, cfg: Config) -> Path:
    """The run's final model: the fine-tuned one if the recipe fine-tunes, else the pre-trained one."""
    if "finetune" in cfg.run.stages:
        from lmforge.finetune.finetune import finetuned_checkpoint

        return finetuned_checkpoint(run_dir / "finetune")
    from lmforge.train.checkpoint import resolve_checkpoint

    return resolve_checkpoint(run_dir / "pretrain")


def model_checkpoints(run_dir: Path, cfg: Config) -> dict[str, Path]:
    """Label → checkpoint of every model the run produced, in training order."""
    from lmforge.train.checkpoint import resolve_checkpoint

    out = {}
    if "pretrain" in cfg.run.stages:
        out["pretrained"] = resolve_checkpoint(run_dir / "pretrain")
    if "finetune" in cfg.run.stages:
        out["finetuned"] = final_checkpoint(run_dir, cfg)
    return out


def validation_texts(cfg: Config, limit: int, max_bytes: int = 2_000_000) -> list[str]:
    """The held-out documents of the run's corpus (the same split `tokenize` made)."""
    from lmforge.data.sources import iter_documents
    from lmforge.shards import is_validation

    texts: list[str] = []
    seen = 0
    for doc in iter_documents(cfg.data.sources):
        if cfg.data.split == "tail":
            text = doc.text[int(len(doc.text) * (1 - cfg.data.val_fraction)) :]
        elif is_validation(doc.id, cfg.data.val_fraction):
            text = doc.text
        else:
            continue
        if text:
            texts.append(text)
            seen += len(text.encode("utf-8", errors="replace"))
        if (limit and len(texts) >= limit) or seen >= max_bytes:
            break
    return texts


# ----------------------------------------------------------------------------- stages


def stage_prepare(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from lmforge.data.pipeline import prepare

    report = prepare(cfg.prepare, run_dir / "prepared", log=print0)
    return {"totals": report.get("totals", {}), "timing": report.get("timing", {})}


def stage_tokenizer(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from lmforge.pretrain import tokenizer_stage

    folder = run_dir / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_stage(
        replace(cfg, tokenizer=replace(cfg.tokenizer, path="")), folder, force=True
    )
    return {"kind": tok.kind, "vocab_size": tok.vocab_size, "hash": tok.hash}


def stage_tokenize(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from lmforge.pretrain import tokenize_stage
    from lmforge.shards import split_info
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer.path)
    out = tokenize_stage(cfg, tok, run_dir, force=True)
    summary = {}
    for split in ("train", "val"):
        info = split_info(out, split)
        summary[split] = {
            "tokens": info.n_tokens,
            "documents": info.n_documents,
            "bytes": info.n_bytes,
        }
    return summary


def stage_pretrain(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from lmforge.pretrain import pretrain

    summary = pretrain(cfg, resume="auto")
    if summary.get("interrupted"):
        raise RunError("pre-training was interrupted; run the same command again to resume")
    return summary


def stage_finetune(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Fine-tune the run's pre-trained model, or (without a pretrain stage) `finetune.init`:
    an lmforge checkpoint, a HF folder, or "" for a new model trained on the task alone."""
    from lmforge.finetune.finetune import finetune, finetune_stage
    from lmforge.train.checkpoint import resolve_checkpoint

    ft_cfg = replace(cfg, output=replace(cfg.output, dir=str(run_dir / "finetune")))
    if "pretrain" in cfg.run.stages:
        summary = finetune_stage(
            ft_cfg, resolve_checkpoint(run_dir / "pretrain"), run_dir / "finetune"
        )
    else:
        tokenizer = (
            replace(cfg.tokenizer, path="")
            if not Path(cfg.tokenizer.path).exists()
            else cfg.tokenizer
        )
        summary = finetune(
            replace(ft_cfg, tokenizer=tokenizer), run_dir / "finetune", resume="auto"
        )
    if summary.get("interrupted"):
        raise RunError("fine-tuning was interrupted; run the same command again to resume")
    return summary


def stage_eval(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from lmforge.eval.intrinsic import evaluate_texts
    from lmforge.eval.results import CheckpointResults, Result, format_table, write_eval_json
    from lmforge.eval.tasks import TaskOptions, run_task
    from lmforge.finetune.chat import is_chat_checkpoint, sample_texts
    from lmforge.model.sampling import SamplingParams
    from lmforge.pretrain import load_model

    folder = run_dir / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    texts = validation_texts(cfg, cfg.eval.limit) if "ppl" in cfg.eval.tasks else []
    runs, samples = [], {}
    for label, ckpt in model_checkpoints(run_dir, cfg).items():
        model, tok, _ = load_model(ckpt)
        results: list[Result] = []
        for task in cfg.eval.tasks:
            if task == "ppl":
                res = evaluate_texts(model, tok, texts)
                n = len(texts)
                results += [
                    Result(
                        "ppl", "bits_per_byte", res.bits_per_byte, n, res.bits_per_byte_stderr()
                    ),
                    Result("ppl", "loss", res.loss, n, res.loss_stderr()),
                    Result("ppl", "perplexity", res.perplexity, n, res.perplexity_stderr()),
                ]
            elif task == "creative":
                from lmforge.eval.creative import run_options

                results += run_task(model, tok, task, run_options(cfg, run_dir))
            else:
                results += run_task(model, tok, task, TaskOptions(limit=cfg.eval.limit))
        runs.append(CheckpointResults(f"{label}: {ckpt}", results))
        prompts = cfg.eval.prompts or [""]
        # A fine-tuned model is asked through its chat template and stops at the end of its turn.
        chat = is_chat_checkpoint(ckpt) or (label == "finetuned" and cfg.finetune.task != "text")
        params = SamplingParams(
            max_new_tokens=cfg.eval.sample_tokens,
            temperature=cfg.eval.temperature,
            top_k=cfg.eval.top_k,
            seed=0,
        )
        asked = [prompts[i % len(prompts)] for i in range(cfg.eval.samples)]
        samples[label] = sample_texts(model, tok, asked, params, chat)
    write_eval_json(folder / "eval.json", runs, {"tasks": cfg.eval.tasks, "limit": cfg.eval.limit})
    write_json_atomic(folder / "samples.json", samples)
    print0(format_table(runs))
    return {
        "results": {
            r.checkpoint.split(":")[0]: {f"{x.task}/{x.metric}": x.value for x in r.results}
            for r in runs
        }
    }


def stage_bias(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from lmforge.bias.run import bias_stage  # type: ignore[import-not-found]

    return bias_stage(cfg, model_checkpoints(run_dir, cfg), run_dir / "bias")


def stage_export(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from lmforge.export.cli import export_checkpoint

    ckpt = final_checkpoint(run_dir, cfg)
    written = {}
    for fmt in cfg.run.export_formats:
        written[fmt] = str(export_checkpoint(ckpt, run_dir / "export" / fmt, fmt))
    return {"checkpoint": str(ckpt), "written": written}


def stage_report(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from lmforge.report import write_report

    paths = write_report(run_dir)
    return {k: str(v) for k, v in paths.items()}


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("prepare", ("prepare",), (), stage_prepare, "prepared"),
        Stage(
            "tokenizer",
            ("tokenizer", "data.sources", "data.max_bytes"),
            ("prepare",),
            stage_tokenizer,
            "tokenizer",
        ),
        Stage("tokenize", ("data",), ("tokenizer",), stage_tokenize, "tokens"),
        Stage("pretrain", ("model", "train"), ("tokenize",), stage_pretrain, "pretrain"),
        Stage("finetune", ("finetune", "train"), ("pretrain",), stage_finetune, "finetune"),
        Stage("eval", ("eval",), ("pretrain", "finetune"), stage_eval, "eval"),
        Stage("bias", ("bias",), ("pretrain", "finetune"), stage_bias, "bias"),
        Stage("export", ("run.export_formats",), ("pretrain", "finetune"), stage_export, "export"),
        Stage("report", (), (), stage_report, ""),
    ]
}
assert tuple(STAGES) == RUN_STAGES


def stage_keys(cfg: Config) -> dict[str, str]:
    """Content key of every stage the recipe runs (report has none: it always reruns)."""
    keys: dict[str, str] = {}
    if "prepare" in cfg.run.stages and cfg.prepare.sources:
        # data.sources is then the run's own prepared shards, a path under output.dir; the
        # prepare key stands for their content, so a moved run keeps its keys.
        cfg = replace(cfg, data=replace(cfg.data, sources=["<prepared shards>"]))
    for name in cfg.run.stages:
        stage = STAGES[name]
        settings = {}
        for section in stage.sections:
            try:
                settings[section] = _pick(cfg, section)
            except KeyError:
                settings[section] = None  # a section this version does not have
        payload = {
            "stage": name,
            "format": STAGE_FORMAT,
            "settings": settings,
            "deps": {d: keys[d] for d in stage.deps if d in keys},
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        keys[name] = hashlib.sha256(blob).hexdigest()[:16]
    return keys


def run_recipe(
    recipe: str | None,
    overrides: list[str] | None = None,
    only: str = "",
    start_from: str = "",
    cfg: Config | None = None,
) -> dict[str, Any]:
    """Run (or resume) a recipe; returns the stage records."""
    cfg = cfg or load_config(recipe, overrides)
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = [s for s in RUN_STAGES if s in cfg.run.stages]
    if "prepare" in stages and not cfg.prepare.sources:
        stages.remove("prepare")
    for flag, name in (("--only", only), ("--from", start_from)):
        if name and name not in stages:
            raise RunError(
                f"{flag} {name}: not a stage of this recipe (stages: {', '.join(stages)})"
            )
    keys = stage_keys(replace(cfg, run=replace(cfg.run, stages=stages)))
    state_path = run_dir / "stages.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    scfg = stage_config(cfg, run_dir)
    forced = set(stages[stages.index(start_from) :]) if start_from else set()
    t_run = time.perf_counter()
    print0(f"lmforge run {cfg.name} → {run_dir}/  (stages: {', '.join(stages)})")
    for name in stages:
        stage = STAGES[name]
        if only and name != only:
            if (
                name in keys
                and state.get(name, {}).get("key") != keys[name]
                and stages.index(name) < stages.index(only)
            ):
                raise RunError(
                    f"--only {only}: stage '{name}' is not up to date; run without --only first"
                )
            continue
        record = state.get(name, {})
        key = keys.get(name, "")
        if (
            name != "report"
            and record.get("done")
            and record.get("key") == key
            and name not in forced
        ):
            print0(f"[{name}] up to date (key {key}), skipped")
            continue
        folder = run_dir / stage.folder if stage.folder else None
        fresh = record.get("key") != key or name in forced or name == "report"
        if folder is not None and fresh and folder.exists():
            shutil.rmtree(folder)  # outputs of another configuration: start over
        print0(f"[{name}] {'running' if fresh else 'resuming'} (key {key})")
        state[name] = {"key": key, "done": False, "started": time.time()}
        write_json_atomic(state_path, state)
        t0 = time.perf_counter()
        summary = stage.fn(scfg, run_dir)
        state[name] = {
            "key": key,
            "done": True,
            "seconds": round(time.perf_counter() - t0, 2),
            "summary": summary,
            "lmforge_version": __version__,
        }
        write_json_atomic(state_path, state)
        print0(f"[{name}] done in {state[name]['seconds']:.1f}s")
    print0(f"run finished in {time.perf_counter() - t_run:.1f}s")
    return state
