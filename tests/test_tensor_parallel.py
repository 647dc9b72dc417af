"""Tensor parallelism (`train.parallel = tp | fsdp+tp`) against one process.

The fast tests check the layout of the fused projections without processes: the
rows that `apply_tp` gives each rank, summed over ranks as the rowwise
all-reduce would, compute what the whole module computes (float64), and the
checkpoint layout round-trips. The slow tests run TP on 2 processes and FSDP+TP
(2 × 2) on 4 under torchrun (gloo) and compare loss curves, resumes across
layouts and the logits of a TP checkpoint loaded in one plain process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dist_worker as worker  # tests/ is on sys.path (pytest rootdir conftest)
import pytest
import torch
from torch import nn

from lmforge.config import ConfigError, load_config
from lmforge.model.transformer import MLP, Attention, Transformer, rope_tables
from lmforge.train.tensor_parallel import (
    ROW_ORDER_ATTR,
    fused_row_order,
    to_standard_layout,
    to_tp_layout,
)

# Float rounding only, as for DDP/FSDP in test_distributed.py: TP computes the same
# sums with the contraction split between ranks and added by an all-reduce, i.e. fp32
# sums in another order (≈ 1e-7 relative per op), which Adam carries over 20 steps to
# ≈ 1e-6 on a loss of ≈ 3; 2e-5 leaves an order of magnitude, and any layout mistake
# (a rank holding the wrong heads) moves the loss by ≥ 1e-2 from the first step.
EXACT = 2e-5

LLAMA = [  # GQA, SwiGLU (fused gate/up), RoPE, RMSNorm, q/k norm, untied head
    "model.n_kv_heads=2",
    "model.mlp=swiglu",
    "model.position=rope",
    "model.norm=rmsnorm",
    "model.qk_norm=true",
    "model.tie_embeddings=false",
]


def model_config(*extra: str):
    shape = ["model.vocab_size=64", "model.context_length=16", "model.d_model=48"]
    return load_config(None, [*shape, "model.n_layers=1", "model.n_heads=4", *extra]).model


# ----------------------------------------------------------------------------- fast


def test_row_order_gives_each_rank_its_heads_of_q_k_and_v():
    H, K, D, tp = 4, 2, 3, 2
    rows = torch.arange((H + 2 * K) * D)  # row i of [q; k; v] holds i
    q, k, v = rows.split([H * D, K * D, K * D])
    chunks = rows[fused_row_order([H * D, K * D, K * D], tp)].chunk(tp)
    for r, chunk in enumerate(chunks):
        want = torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]])
        assert torch.equal(chunk, want)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def rank_attention(whole: Attention, r: int, tp: int) -> Attention:
    """What rank r of `tp` computes with: its colwise qkv rows, its rowwise proj columns."""
    H, K, D = whole.n_heads, whole.n_kv_heads, whole.head_dim
    order = fused_row_order([H * D, K * D, K * D], tp)
    part = copy.deepcopy(whole)
    bias = whole.qkv.bias[order].chunk(tp)[r] if whole.qkv.bias is not None else None
    part.qkv = _linear(whole.qkv.weight[order].chunk(tp)[r], bias)
    part.proj = _linear(whole.proj.weight.chunk(tp, dim=1)[r], None)  # (no bias: cfg.bias off)
    part.n_heads, part.n_kv_heads = H // tp, K // tp
    return part


def rank_mlp(whole: MLP, r: int, tp: int) -> MLP:
    hidden = whole.down.in_features
    order = fused_row_order([hidden, hidden], tp)
    part = copy.deepcopy(whole)
    part.up = _linear(whole.up.weight[order].chunk(tp)[r], None)
    part.down = _linear(whole.down.weight.chunk(tp, dim=1)[r], None)
    return part


@pytest.mark.parametrize("tp", [2, 4])
def test_ranks_in_the_tp_layout_add_up_to_the_whole_attention_and_mlp(tp):
    """Each rank's share of the reordered fused weights, outputs summed as the rowwise
    all-reduce sums them, computes the whole module (float64: rounding ≈ 1e-16)."""
    cfg = model_config(*LLAMA, f"model.n_kv_heads={tp}")
    cfg.qkv_bias = True
    torch.manual_seed(0)
    attn, mlp = Attention(cfg).double(), MLP(cfg).double()
    for p in [*attn.parameters(), *mlp.parameters()]:
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, cfg.d_model, dtype=torch.float64)
    rope = tuple(t.double() for t in rope_tables(cfg, 16))
    with torch.no_grad():
        got = sum(rank_attention(attn, r, tp)(x, rope) for r in range(tp))
        torch.testing.assert_close(got, attn(x, rope), rtol=0, atol=1e-12)
        got = sum(rank_mlp(mlp, r, tp)(x) for r in range(tp))
        torch.testing.assert_close(got, mlp(x), rtol=0, atol=1e-12)
        # A contiguous split of [q; k; v] (no reordering) is wrong: rank 0 holds q rows only.
        assert not torch.allclose(
            sum(_contiguous_rank_attention(attn, r, tp)(x, rope) for r in range(tp)),
            attn(x, rope),
        )


def _contiguous_rank_attention(whole: Attention, r: int, tp: int) -> Attention:
    part = rank_attention(whole, r, tp)
    bias = whole.qkv.bias.chunk(tp)[r] if whole.qkv.bias is not None else None
    part.qkv = _linear(whole.qkv.weight.chunk(tp)[r], bias)
    return part


def test_checkpoint_layout_round_trips_weights_and_optimizer_state():
    model = nn.Module()
    order = fused_row_order([8, 4, 4], 2)
    setattr(model, ROW_ORDER_ATTR, {"blocks.0.attn.qkv.weight": order})
    w = torch.randn(16, 5)
    state = {
        "exp_avg": torch.randn(16, 5),
        "exp_avg_sq": torch.rand(16, 5),
        "step": torch.tensor(3.0),
    }
    weights = {"blocks.0.attn.qkv.weight": w.clone(), "norm.weight": torch.ones(5)}
    tp = to_tp_layout(model, dict(weights))
    assert torch.equal(tp["blocks.0.attn.qkv.weight"], w[order])
    assert torch.equal(to_standard_layout(model, tp)["blocks.0.attn.qkv.weight"], w)
    optim = {"blocks.0.attn.qkv.weight": {k: v.clone() for k, v in state.items()}}
    back = to_standard_layout(model, to_tp_layout(model, optim))["blocks.0.attn.qkv.weight"]
    for key, value in state.items():
        assert torch.equal(back[key], value)
    moved = to_tp_layout(model, {"step": 1, **optim})["blocks.0.attn.qkv.weight"]
    assert torch.equal(moved["exp_avg"], state["exp_avg"][order])
    assert torch.equal(moved["step"], state["step"])  # not a per-row tensor: untouched


def test_ranks_of_a_tp_group_read_the_same_batches():
    from lmforge.train.dist import DistInfo
    from lmforge.train.tensor_parallel import data_rank

    cfg = load_config(None, ["train.parallel=fsdp+tp", "train.tp=2"])
    assert [data_rank(cfg, DistInfo(r, 4)) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    cfg = load_config(None, ["train.parallel=tp"])
    assert [data_rank(cfg, DistInfo(r, 2)) for r in range(2)] == [(0, 1), (0, 1)]
    cfg = load_config(None, ["train.parallel=fsdp"])
    assert [data_rank(cfg, DistInfo(r, 2)) for r in range(2)] == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match=r"train\.tp = 2 does not divide the number of processes"):
        data_rank(load_config(None, ["train.parallel=fsdp+tp", "train.tp=2"]), DistInfo(0, 3))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.parallel=fsdp+tp", "train.tp=3"], "model.n_heads"),
        (["train.parallel=fsdp+tp", "train.tp=4", "model.n_kv_heads=2"], "model.n_kv_heads"),
        (["train.tp=2"], "train.tp"),
        (["train.parallel=tp", "train.optimizer=muon"], "train.optimizer"),
        (["train.parallel=fsdp+tp", "train.tp=2", "train.dtype=bf16-pure"], "train.dtype"),
    ],
)
def test_config_refuses_what_tp_cannot_split(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["model.n_heads=4", *overrides])


# ----------------------------------------------------------------------------- processes


def test_tp_on_one_process_runs_the_trainer_and_matches_plain(tmp_path, shared):
    """The mechanics without torchrun: `train.parallel=tp` on a group of one (DTensor
    parameters beside plain ones, clipping, the optimizer, checkpoint gathering)."""
    text = (Path(shared) / "tinyshakespeare" / "input.txt").read_text()[:20_000]
    tokens = worker.make_tokens(tmp_path / "tokens", text)
    short = ["train.max_steps=4", "train.checkpoint_every=4", *LLAMA]
    jobs = [
        {"run_dir": str(tmp_path / name), "tokens_dir": str(tokens), "overrides": short + extra}
        for name, extra in (("tp", ["train.parallel=tp"]), ("ref", []))
    ]
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs[:1]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, worker.__file__, str(spec)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    worker.run_job(jobs[1])
    torch.testing.assert_close(curve(tmp_path / "tp"), curve(tmp_path / "ref"), rtol=0, atol=EXACT)
    ckpt = "checkpoints/step_00000004/model.safetensors"
    from safetensors.torch import load_file

    got, want = load_file(tmp_path / "tp" / ckpt), load_file(tmp_path / "ref" / ckpt)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def torchrun(nproc: int, jobs: list[dict], tmp: Path, timeout: float = 600):
    spec = tmp / f"jobs-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", str(Path(worker.__file__)), str(spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def curve(run_dir: Path, first: int = 1) -> torch.Tensor:
    losses = worker.losses(run_dir)
    return torch.tensor([losses[s] for s in sorted(losses) if s >= first])


def grad_norms(run_dir: Path) -> torch.Tensor:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["grad_norm"] for r in recs if "grad_norm" in r])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tp")
    text = (Path(shared) / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    tokens = worker.make_tokens(tmp / "tokens", text)

    def job(name: str, *overrides: str, resume: str = "") -> dict:
        return {
            "run_dir": str(tmp / name),
            "tokens_dir": str(tokens),
            "overrides": list(overrides),
            "resume": resume,
            "logits": str(tmp / f"{name}.logits.pt"),
        }

    tp, fsdp_tp = "train.parallel=tp", ["train.parallel=fsdp+tp", "train.tp=2"]
    worker.run_job(job("ref"))
    worker.run_job(job("ref_llama", *LLAMA))
    ref_step10 = str(tmp / "ref_llama" / "checkpoints" / "step_00000010")
    torchrun(
        2,
        [
            job("tp", tp),
            job("tp_llama", tp, *LLAMA),
            job("tp_from_1", tp, *LLAMA, resume=ref_step10),
            job("tp_ac", tp, "train.activation_checkpointing=selective"),
        ],
        tmp,
    )
    torchrun(
        4,
        [
            job("fsdp_tp", *fsdp_tp),
            job("fsdp_tp_llama", *fsdp_tp, *LLAMA),
            job("fsdp_tp_from_1", *fsdp_tp, *LLAMA, resume=ref_step10),
        ],
        tmp,
    )
    # Saved by 2 TP processes, resumed by one plain process.
    tp_step10 = str(tmp / "tp_llama" / "checkpoints" / "step_00000010")
    worker.run_job(job("one_from_tp", *LLAMA, resume=tp_step10))
    return {p.name: p for p in tmp.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "ref"),
    [
        ("tp", "ref"),
        ("tp_llama", "ref_llama"),
        ("tp_ac", "ref"),
        ("fsdp_tp", "ref"),
        ("fsdp_tp_llama", "ref_llama"),
    ],
)
def test_tensor_parallel_follows_the_one_process_curve(runs, name, ref):
    want, got = curve(runs[ref]), curve(runs[name])
    assert len(got) == len(want) == 20
    assert want[-1] < want[0] - 0.3  # it learns, so the comparison means something
    torch.testing.assert_close(got, want, rtol=0, atol=EXACT)
    # The global gradient norm (sharded and whole parameters together) is the one-process
    # norm, and above train.grad_clip = 1 in some steps, so clipping is exercised.
    ref_norms = grad_norms(runs[ref])
    assert ref_norms.max() > 1.0
    torch.testing.assert_close(grad_norms(runs[name]), ref_norms, rtol=2e-3, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp_from_1", "fsdp_tp_from_1", "one_from_tp"])
def test_resume_moves_between_plain_and_tp_layouts(runs, name):
    """Weights and Adam's moments go through the standard layout both ways."""
    torch.testing.assert_close(
        curve(runs[name], first=11), curve(runs["ref_llama"], first=11), rtol=0, atol=EXACT
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp_llama", "fsdp_tp_llama"])
def test_tp_checkpoint_loads_in_one_plain_process_with_equal_logits(runs, name):
    from lmforge.train.checkpoint import load_weights

    job = {"run_dir": str(runs[name]), "tokens_dir": str(runs["tokens"]), "overrides": LLAMA}
    cfg = worker.job_config(job)
    model = Transformer(cfg.model)
    load_weights(model, runs[name] / "checkpoints" / "step_00000020" / "model.safetensors")
    model.eval()
    with torch.no_grad():
        logits = model(worker.fixed_tokens(cfg))
    tp_logits = torch.load(runs[f"{name}.logits.pt"])
    # fp32 logits of size ≈ 3, summed in another order: ≈ 1e-6.
    torch.testing.assert_close(logits, tp_logits, rtol=0, atol=1e-5)


_REFUSE_CACHE = """
import torch, torch.distributed as tdist
from torch.distributed.device_mesh import init_device_mesh
from lmforge.config import load_config
from lmforge.model.generate import generate
from lmforge.model.transformer import Transformer
from lmforge.train.tensor_parallel import apply_tp
tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
cfg = load_config(None, ["model.vocab_size=64", "model.n_layers=1", "model.d_model=32"])
model = apply_tp(Transformer(cfg.model), init_device_mesh("cpu", (1,)))
assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 64)
try:
    generate(model.eval(), [1, 2, 3], 4, temperature=0.0)
except NotImplementedError as exc:
    print(exc)
"""


def test_kv_cache_generation_is_refused_on_a_tp_model():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _REFUSE_CACHE]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not supported on a tensor-parallel model" in result.stdout


# ----------------------------------------------------------------------------- lmforge plan


def test_plan_divides_block_matrices_and_per_head_activations_by_tp():
    from lmforge.model.arith import count_params, derived_d_ff
    from lmforge.plan import block_activation_elements, memory_per_device, model_config

    cfg = model_config("llama-8b")
    C, H, K, F, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, derived_d_ff(cfg), 128
    # Written out from the model: norm inputs stay whole; q/k/v, rotated q/k, GQA's repeated
    # k/v, SDPA output + log-sum-exp and proj input are per head; SwiGLU's 4·F per unit.
    attn = 2 * C + ((H + 2 * K) * D + (H + K) * D + 2 * H * D + C + H + C) // 2
    assert block_activation_elements(cfg, tp=2)["total"] == attn + 2 * C + 4 * F // 2
    g = count_params(cfg)
    per_rank = g["total"] - (g["attention"] + g["mlp"]) / 2
    mem = memory_per_device(cfg, 1, 8192, "bf16", shards=4, tp=2)
    assert mem.optimizer == pytest.approx(8 * per_rank / 4)
    assert mem.gradients == pytest.approx(4 * per_rank / 4)


def test_plan_says_when_tp_is_needed_and_prints_the_formula(capsys):
    from lmforge.cli import main
    from lmforge.plan import GiB, memory_per_device, model_config

    args = ["plan", "--preset", "llama-8b", "--gpus", "8xH100", "--seq-len", "8192"]
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not plan["fits"]["plain"]  # FSDP over 8 alone: activations do not fit
    suggestion = plan["tensor_parallel"]
    assert (suggestion["dp"], suggestion["tp"], suggestion["checkpointed"]) == (4, 2, False)
    want = memory_per_device(model_config("llama-8b"), 1, 8192, "bf16", shards=4, tp=2)
    assert (
        want.peak
        <= 0.9 * 80 * GiB
        < memory_per_device(model_config("llama-8b"), 1, 8192, "bf16", 8).peak
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{want.peak / GiB:.2f} GiB with --train.parallel=fsdp+tp --train.tp=2" in out
    assert "mesh dp × tp = 4 × 2" in out
    # Asked for, TP shows in the per-device memory; a size that splits no heads is refused.
    assert main([*args, "--tp", "2"]) == 0
    assert "FSDP over 4, TP over 2" in capsys.readouterr().out
    assert main([*args, "--tp", "3"]) != 0
    assert "--tp 3 must divide" in capsys.readouterr().err
    # A model that fits with FSDP alone gets no TP advice.
    assert main(["plan", "--preset", "llama-8b", "--gpus", "8xH100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensor_parallel"] == {}


def test_sharded_checkpoints_are_refused_with_tensor_parallelism():
    """Sharded (DCP) checkpoints would keep TP's reordered q/k/v rows: refused until they
    restore the standard layout as gathered checkpoints do."""
    from lmforge.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="checkpoint_format"):
        load_config(None, ["train.parallel=tp", "train.checkpoint_format=sharded"])
    load_config(None, ["train.parallel=fsdp", "train.checkpoint_format=sharded"])
