"""What users pass: every `--checkpoint` form on every command that loads a model, every
text format on every command that reads text, and one named line for bad input."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import random
import sys
from pathlib import Path

import pytest
import zstandard
from helpers import shakespeare_snippet, tiny_overrides, tiny_run_overrides

from lmforge.cli import main
from lmforge.run import run_recipe
from lmforge.train.checkpoint import list_checkpoints

TEXT = "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs?\n"
PAIRS = [
    {"more": "He is a doctor.", "less": "She is a doctor.", "category": "gender"},
    {"more": "The poor man stole.", "less": "The rich man stole.", "category": "class"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """One tiny `lmforge run` (pretrain + finetune), one `lmforge pretrain` folder, and a
    transformers folder exported from the run: every form `--checkpoint` takes."""
    tmp = tmp_path_factory.mktemp("models")
    corpus = shakespeare_snippet(tmp, 60_000)
    ft = tmp / "ft.jsonl"
    ft.write_text("".join(json.dumps({"text": f"ROMEO:\nline {i}.\n"}) + "\n" for i in range(8)))
    run = tmp / "run"
    run_recipe(
        "quickstart",
        tiny_run_overrides(
            tmp,
            corpus,
            run,
            "run.stages=[tokenizer,tokenize,pretrain,finetune]",
            "finetune.task=text",
            f"finetune.train_files=[{ft}]",
            f"finetune.val_files=[{ft}]",
            "finetune.max_steps=2",
        ),
    )
    flat = tmp / "pretrain-run"
    overrides = [*tiny_overrides(tmp, corpus)[:-1], f"output.dir={flat}", "train.max_steps=4"]
    assert main(["pretrain", *(f"--{o}" for o in overrides)]) == 0
    hf = tmp / "hf"
    step = list_checkpoints(run / "pretrain")[-1]
    assert main(["export", "--checkpoint", str(step), "--format", "hf", "--out", str(hf)]) == 0
    return {
        "checkpoint": step,
        "checkpoints": run / "pretrain" / "checkpoints",
        "stage": run / "pretrain",
        "run": run,
        "pretrain-run": flat,
        "transformers": hf,
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("files")
    text = tmp / "notes.txt"
    text.write_text(TEXT)
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    ft = tmp / "ft.jsonl"
    ft.write_text(
        "".join(json.dumps({"text": f"First Citizen:\nword {w}\n"}) + "\n" for w in "abcd")
    )
    return {"text": text, "pairs": pairs, "ft": ft, "tmp": tmp}


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _command(cmd: str, model: Path, files: dict[str, Path], out: Path) -> list:
    ppl = ["--task", "ppl", "--data", files["text"], "--out", out / "eval.json"]
    pairs = ["--pairs", f"mine={files['pairs']}", "--no-probes", "--out", out / "bias.json"]
    tune = ["--task", "text", "--train", files["ft"], "--out", out / "ft"]
    tune += ["--finetune.max_steps=1", "--train.micro_batch_size=2", "--train.dtype=fp32"]
    return {
        "eval": ["eval", "--checkpoint", model, *ppl],
        "bias": ["bias", "--checkpoint", model, *pairs],
        "generate": ["generate", "--checkpoint", model, "--max-tokens", "3", "--seed", "0"],
        "export": ["export", "--checkpoint", model, "--format", "hf", "--out", out / "hf"],
        "chat": ["chat", "--checkpoint", model, "--max-tokens", "3"],
        "finetune": ["finetune", "--checkpoint", model, *tune, "--train.tokens_per_step=512"],
    }[cmd]


COMMANDS = ["eval", "bias", "generate", "export", "chat", "finetune"]
FORMS = ["checkpoint", "checkpoints", "stage", "run", "pretrain-run", "transformers"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_checkpoint_form_on_every_command(
    cmd, form, models, files, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/exit\n"))
    rc, _out, err = _cli(_command(cmd, models[form], files, tmp_path), capsys)
    assert rc == 0, err
    assert "Traceback" not in err
    if form == "run":  # the choice is printed, one line: the fine-tuned model, the newest step
        chosen = [line for line in err.splitlines() if line.startswith("lmforge: using")]
        newest = list_checkpoints(models["run"] / "finetune")[-1]
        assert chosen == [f"lmforge: using {newest} (newest good checkpoint of finetune)"]


def test_run_folder_loads_the_finetuned_model(models, files, tmp_path, capsys):
    """The run folder evaluates exactly as its newest fine-tuned checkpoint, not as pre-training."""

    def bpb(model: Path, name: str) -> float:
        out = tmp_path / name
        out.mkdir()
        assert _cli(_command("eval", model, files, out), capsys)[0] == 0
        results = json.loads((out / "eval.json").read_text())["checkpoints"][0]["results"]
        return next(r["value"] for r in results if r["metric"] == "bits_per_byte")

    finetuned = list_checkpoints(models["run"] / "finetune")[-1]
    assert bpb(models["run"], "run") == bpb(finetuned, "ft")
    assert bpb(models["run"], "run2") != bpb(models["stage"], "pre")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_a_folder_that_is_no_model_is_named_with_what_would_work(cmd, files, tmp_path, capsys):
    junk = tmp_path / "not-a-model"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    (junk / "logs").mkdir()
    rc, _out, err = _cli(_command(cmd, junk, files, tmp_path), capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert str(junk) in lines[0] and "holds logs/, notes.txt" in lines[0]
    assert "run folder" in lines[0] and "transformers folder" in lines[0]


def test_resolver_skips_a_corrupt_newest_checkpoint(models, tmp_path):
    import shutil

    from lmforge.model_source import resolve_model

    stage = tmp_path / "stage"
    shutil.copytree(models["stage"] / "checkpoints", stage / "checkpoints")
    steps = list_checkpoints(stage)
    with (steps[-1] / "model.safetensors").open("r+b") as fh:
        fh.write(b"\0\0\0\0")
    assert resolve_model(stage).path == steps[-2]


# ----------------------------------------------------------------------------- text formats


def write_as(fmt: str, text: str, folder: Path, stem: str = "data") -> str:
    """`text` in one format; returns the spec to pass (PATH or PATH:FIELD)."""
    if fmt == "txt":
        (folder / f"{stem}.txt").write_text(text)
        return str(folder / f"{stem}.txt")
    if fmt == "txt.gz":
        (folder / f"{stem}.txt.gz").write_bytes(gzip.compress(text.encode()))
        return str(folder / f"{stem}.txt.gz")
    if fmt == "txt.zst":
        (folder / f"{stem}.txt.zst").write_bytes(zstandard.compress(text.encode()))
        return str(folder / f"{stem}.txt.zst")
    if fmt == "txt.bz2":
        (folder / f"{stem}.txt.bz2").write_bytes(bz2.compress(text.encode()))
        return str(folder / f"{stem}.txt.bz2")
    if fmt == "jsonl:body":
        rec = json.dumps({"id": 1, "body": text, "text": "not this"}) + "\n"
        (folder / f"{stem}.jsonl").write_text(rec)
        return f"{folder / stem}.jsonl:body"
    if fmt == "jsonl.zst":
        rec = json.dumps({"text": text}) + "\n"
        (folder / f"{stem}.jsonl.zst").write_bytes(zstandard.compress(rec.encode()))
        return str(folder / f"{stem}.jsonl.zst")
    raise ValueError(fmt)


TEXT_FORMATS = ["txt", "txt.gz", "txt.zst", "txt.bz2", "jsonl:body", "jsonl.zst"]


def _ppl(model: Path, spec: str, out: Path, capsys) -> float:
    rc, _o, err = _cli(
        ["eval", "--checkpoint", model, "--task", "ppl", "--data", spec, "--out", out], capsys
    )
    assert rc == 0, err
    results = json.loads(out.read_text())["checkpoints"][0]["results"]
    return next(r["value"] for r in results if r["metric"] == "bits_per_byte")


@pytest.mark.parametrize("fmt", TEXT_FORMATS)
def test_eval_data_reads_every_format_as_the_same_text(fmt, models, tmp_path, capsys):
    model = models["checkpoint"]
    plain = _ppl(model, write_as("txt", TEXT, tmp_path, "plain"), tmp_path / "a.json", capsys)
    assert _ppl(model, write_as(fmt, TEXT, tmp_path), tmp_path / "b.json", capsys) == plain


@pytest.mark.parametrize("fmt", TEXT_FORMATS)
def test_bias_data_reads_every_format_as_the_same_text(fmt, tmp_path, capsys):
    text = "He said she was a nurse. His brother is a doctor and her sister is an engineer.\n"

    def stats(spec: str, name: str) -> dict:
        out = tmp_path / name
        rc, _o, err = _cli(["bias", "--data", spec, "--out", out], capsys)
        assert rc == 0, err
        return json.loads(out.read_text())["data"]["statistics"]["all"]  # "sources" names files

    plain = stats(write_as("txt", text, tmp_path, "plain"), "a.json")
    assert stats(write_as(fmt, text, tmp_path), "b.json") == plain


@pytest.mark.parametrize("fmt", TEXT_FORMATS)
def test_tokenizer_and_tokenize_read_every_format(fmt, tmp_path, capsys):
    spec = write_as(fmt, TEXT * 40, tmp_path)
    argv = ["tokenize", f"--data.sources=[{spec}]", "--tokenizer.kind=char"]
    argv += ["--data.split=tail", f"--output.dir={tmp_path / 'out'}"]
    rc, _o, err = _cli(argv, capsys)
    assert rc == 0, err
    chars = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["chars"]
    # The same characters whatever the format; from JSONL only the chosen field's.
    assert set(chars) >= set(TEXT)
    assert not set(chars) & (set("not this") - set(TEXT))


def _write_pairs(fmt: str, folder: Path) -> Path:
    if fmt.startswith("csv"):
        buf = io.StringIO()
        w = csv.DictWriter(buf, ["more", "less", "category"])
        w.writeheader()
        w.writerows(PAIRS)
        data = buf.getvalue().encode()
    else:
        data = "".join(json.dumps(p) + "\n" for p in PAIRS).encode()
    path = folder / f"pairs.{fmt}"
    if fmt.endswith(".gz"):
        data = gzip.compress(data)
    elif fmt.endswith(".zst"):
        data = zstandard.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "csv", "csv.gz", "csv.zst"])
def test_bias_pairs_read_every_format(fmt, models, tmp_path, capsys):
    def summary(path: Path, name: str) -> dict:
        out = tmp_path / name
        argv = ["bias", "--checkpoint", models["checkpoint"], "--pairs", f"mine={path}"]
        rc, _o, err = _cli([*argv, "--no-probes", "--out", out], capsys)
        assert rc == 0, err
        return json.loads(out.read_text())["checkpoints"][0]["benchmarks"]["mine"]["overall"]

    plain = summary(_write_pairs("jsonl", tmp_path), "a.json")
    sub = tmp_path / "sub"
    sub.mkdir()
    assert summary(_write_pairs(fmt, sub), "b.json") == plain


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "csv.bz2"])
def test_finetune_train_files_read_compressed(fmt, models, files, tmp_path, capsys):
    rows = [{"text": f"First Citizen:\nword {w}\n"} for w in "abcd"]
    if fmt.startswith("csv"):
        buf = io.StringIO()
        w = csv.DictWriter(buf, ["text"])
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue().encode()
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    comp = {"gz": gzip.compress, "zst": zstandard.compress, "bz2": bz2.compress}
    path = tmp_path / f"train.{fmt}"
    path.write_bytes(comp[fmt.rsplit(".", 1)[1]](data))
    argv = _command("finetune", models["checkpoint"], {**files, "ft": path}, tmp_path)
    rc, out, err = _cli(argv, capsys)
    assert rc == 0, err
    assert "4 train" in out


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_eval_mc_and_translation_data_read_compressed(fmt, models, tmp_path, capsys):
    comp = gzip.compress if fmt.endswith("gz") else zstandard.compress
    mc = [{"context": "First Citizen:\nSpeak,", "choices": ["speak.", "zzzz."], "label": 0}]
    tr = [{"source": "A man.", "target": "Ein Mann."}]
    (tmp_path / f"mc.{fmt}").write_bytes(comp("".join(json.dumps(r) + "\n" for r in mc).encode()))
    (tmp_path / f"tr.{fmt}").write_bytes(comp("".join(json.dumps(r) + "\n" for r in tr).encode()))
    argv = ["eval", "--checkpoint", models["checkpoint"], "--task", "mc", "--task", "translation"]
    argv += [
        "--data",
        f"mc={tmp_path / f'mc.{fmt}'}",
        "--data",
        f"translation={tmp_path / f'tr.{fmt}'}",
    ]
    rc, _o, err = _cli([*argv, "--max-new-tokens", "2", "--out", tmp_path / "e.json"], capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "e.json").read_text())["checkpoints"][0]["results"]
    assert {r["task"] for r in results} == {"mc", "translation"}
    assert all(r["n"] == 1 for r in results)


# ----------------------------------------------------------------------------- bad input


def _one_error(rc: int, err: str) -> str:
    assert rc == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lmforge: error:")]
    assert len(errors) == 1, err
    return errors[0]


def _tokenize(tmp_path: Path, capsys, *sources: str, split: str = "tail") -> tuple[int, str]:
    argv = ["tokenize", f"--data.sources=[{', '.join(sources)}]", "--tokenizer.kind=char"]
    argv += [f"--data.split={split}", f"--output.dir={tmp_path / 'out'}"]
    rc, _o, err = _cli(argv, capsys)
    return rc, err


def _random_bytes(path: Path, nul: bool) -> Path:
    rng = random.Random(0)
    lo = 0 if nul else 0x80  # without NUL: bytes ≥ 0x80 only, mostly invalid UTF-8
    path.write_bytes(bytes(rng.randrange(lo, 256) for _ in range(20_000)))
    return path


@pytest.mark.parametrize("nul", [True, False], ids=["with-nul", "invalid-utf8"])
def test_random_bytes_in_a_txt_source_are_refused_naming_the_file(nul, tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text(TEXT * 20)
    bad = _random_bytes(tmp_path / "random.txt", nul)
    line = _one_error(*_tokenize(tmp_path, capsys, str(good), str(bad)))
    assert str(bad) in line and "not" in line and "text" in line
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # no 2,730-"character" vocabulary


@pytest.mark.parametrize("cmd", ["eval", "bias"])
def test_random_bytes_as_eval_or_bias_data_are_refused(cmd, models, tmp_path, capsys):
    bad = _random_bytes(tmp_path / "random.txt", nul=True)
    argv = ["eval", "--checkpoint", models["checkpoint"], "--task", "ppl", "--data", bad]
    if cmd == "bias":
        argv = ["bias", "--data", bad]
    line = _one_error(*_cli([*argv, "--out", tmp_path / "o.json"], capsys)[::2])
    assert str(bad) in line and "not text" in line


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("notes.docx", "unsupported file type '.docx'"),
        ("notes.jsnol", "did you mean '.jsonl'"),
        ("book.txt.gzip", "did you mean '.gz'"),
        ("notes.pdf", "supported: .csv"),
    ],
)
def test_an_unsupported_suffix_names_the_file_and_what_works(name, expect, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(TEXT * 20)
    line = _one_error(*_tokenize(tmp_path, capsys, str(path)))
    assert str(path) in line and expect in line and ".jsonl" in line and ".zst" in line


def test_eval_data_with_an_unsupported_suffix_is_named(models, tmp_path, capsys):
    path = tmp_path / "notes.jsnol"
    path.write_text(json.dumps({"text": TEXT}) + "\n")
    argv = ["eval", "--checkpoint", models["checkpoint"], "--task", "ppl", "--data", path]
    line = _one_error(*_cli(argv, capsys)[::2])
    assert str(path) in line and "did you mean '.jsonl'" in line


def test_unsupported_files_in_a_folder_are_named_in_a_warning(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT * 40)
    (corpus / "scan.pdf").write_bytes(b"%PDF-1.4\n")
    rc, err = _tokenize(tmp_path, capsys, str(corpus))
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "scan.pdf" in warnings[0] and "supported:" in warnings[0]


def test_an_empty_file_is_named_and_an_all_empty_corpus_is_an_error(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT * 40)
    (corpus / "empty.txt").write_text("")
    rc, err = _tokenize(tmp_path, capsys, str(corpus))
    assert rc == 0, err
    assert f"warning: {corpus / 'empty.txt'}: no text (empty file)" in err
    (corpus / "a.txt").write_text("\n\n")
    line = _one_error(*_tokenize(tmp_path, capsys, str(corpus)))
    assert "no text in the data sources" in line
    assert str(corpus / "a.txt") in line and str(corpus / "empty.txt") in line


def test_records_without_text_name_the_source(tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(3)))
    line = _one_error(*_tokenize(tmp_path, capsys, str(path)))
    assert "no text in the data sources" in line and str(path) in line


def test_one_document_with_the_document_split_says_to_use_tail(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 200)
    line = _one_error(*_tokenize(tmp_path, capsys, str(book), split="document"))
    assert "split has 0 tokens" in line and str(book) in line and "data.split=tail" in line
    assert _tokenize(tmp_path, capsys, str(book), split="tail")[0] == 0


def test_bias_pairs_with_an_unknown_format_are_named(models, tmp_path, capsys):
    path = tmp_path / "pairs.xlsx"
    path.write_bytes(b"PK\x03\x04")
    argv = ["bias", "--checkpoint", models["checkpoint"], "--pairs", f"mine={path}", "--no-probes"]
    line = _one_error(*_cli([*argv, "--out", tmp_path / "b.json"], capsys)[::2])
    assert str(path) in line and ".jsonl" in line


def test_field_suffix_leaves_shared_names_and_real_paths_alone(tmp_path):
    from lmforge.data.sources import split_field

    shared = "shared:tinyshakespeare/input.txt"
    assert split_field(shared) == (shared, "text")
    odd = tmp_path / "a:b.txt"  # a colon that is part of the file name
    odd.write_text(TEXT)
    assert split_field(str(odd)) == (str(odd), "text")
    rec = tmp_path / "r.jsonl"
    rec.write_text(json.dumps({"body": TEXT}) + "\n")
    assert split_field(f"{rec}:body") == (str(rec), "body")


def test_an_upper_case_compression_suffix_is_decompressed(tmp_path, capsys):
    path = tmp_path / "BOOK.TXT.GZ"
    path.write_bytes(gzip.compress((TEXT * 40).encode()))
    rc, err = _tokenize(tmp_path, capsys, str(path))
    assert rc == 0, err
    chars = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["chars"]
    assert set(chars) >= set(TEXT) and len(set(chars) - set(TEXT)) <= 8


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("train.jsnol", '{"text": "a"}\n', "did you mean '.jsonl'"),
        ("train.txt", "First Citizen:\n", "unsupported file type '.txt'"),
        ("train.jsonl", "", "no records (empty file)"),
    ],
)
def test_finetune_data_that_cannot_be_read_is_named(
    name, content, expect, models, files, tmp_path, capsys
):
    path = tmp_path / name
    path.write_text(content)
    argv = _command("finetune", models["checkpoint"], {**files, "ft": path}, tmp_path)
    line = _one_error(*_cli(argv, capsys)[::2])
    assert str(path) in line and expect in line


def test_a_lora_stage_folder_loads_its_merged_model(models, files, tmp_path, capsys):
    argv = _command("finetune", models["checkpoint"], files, tmp_path)
    assert _cli([*argv, "--method", "lora"], capsys)[0] == 0
    stage = tmp_path / "ft"
    assert (stage / "merged" / "checkpoints").is_dir()

    def bpb(model: Path, name: str) -> float:
        out = tmp_path / name
        out.mkdir()
        assert _cli(_command("eval", model, files, out), capsys)[0] == 0
        results = json.loads((out / "eval.json").read_text())["checkpoints"][0]["results"]
        return next(r["value"] for r in results if r["metric"] == "bits_per_byte")

    assert bpb(stage, "stage") == bpb(list_checkpoints(stage / "merged")[-1], "merged")
