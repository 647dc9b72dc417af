"""Beyond one node, on one machine: two torchrun agents as two "nodes", restarts after a
killed worker, a hung rank named within the timeout, and sharded checkpoints.

Two agents started with ``--nnodes=2 --nproc-per-node=1`` meet through a c10d
rendezvous on 127.0.0.1, exactly as two machines would meet at the first one's
address; each starts one worker, and the workers form one gloo process group.
The global batch does not depend on the world size, so the two-node run must
follow the one-process loss curve (`EXACT`, as for DDP on one node), and
lmforge's bit-exact resume makes a restarted job end where an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dist_worker as worker  # tests/ is on sys.path (pytest rootdir conftest)
import pytest
import torch
from test_distributed import EXACT, curve, torchrun

HOST = "127.0.0.1"  # both "nodes" live on this machine; nothing listens beyond loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def two_nodes(
    jobs: list[dict], tmp: Path, max_restarts: int = 0, timeout: float = 300
) -> list[subprocess.CompletedProcess]:
    """Run `jobs` on two torchrun agents ("nodes") of one process each; both agents' results."""
    spec = tmp / f"jobs-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: each round of workers gets a fresh store hosted by
    # its rank 0. Sharing the agent's store across restarts, the restarted workers can read
    # the previous round's gloo addresses (connection refused to a dead worker's port).
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    agents = []
    for is_host in (1, 0):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={HOST}:{port}",
            f"--rdzv-id={run_id}",
            # Which agent serves the rendezvous store; ranks are still assigned by arrival.
            f"--rdzv-conf=is_host={is_host}",
            f"--local-addr={HOST}",
            f"--max-restarts={max_restarts}",
            "--monitor-interval=0.5",
            str(Path(worker.__file__)),
            str(spec),
        ]
        agents.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    deadline = time.monotonic() + timeout
    for agent in agents:
        try:
            out, err = agent.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for a in agents:
                a.kill()
            raise
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, out, err))
    return results


def output(results: list[subprocess.CompletedProcess]) -> str:
    return "\n".join(r.stdout[-3000:] + r.stderr[-3000:] for r in results)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, shared) -> Path:
    text = (Path(shared) / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    return worker.make_tokens(tmp_path_factory.mktemp("multinode") / "tokens", text)


def job(tmp: Path, tokens: Path, name: str, *overrides: str, **extra) -> dict:
    return {
        "run_dir": str(tmp / name),
        "tokens_dir": str(tokens),
        "overrides": list(overrides),
        **extra,
    }


SHORT = ("train.max_steps=6", "train.checkpoint_every=3")


def test_two_nodes_follow_the_one_process_curve(tokens, tmp_path):
    """Default-suite smoke test: 6 steps on two "nodes" against one process."""
    worker.run_job(job(tmp_path, tokens, "ref", *SHORT))
    results = two_nodes([job(tmp_path, tokens, "nodes", *SHORT)], tmp_path, timeout=240)
    assert all(r.returncode == 0 for r in results), output(results)
    ref, got = curve(tmp_path / "ref"), curve(tmp_path / "nodes")
    assert len(got) == len(ref) == 6
    torch.testing.assert_close(got, ref, rtol=0, atol=EXACT)


@pytest.mark.slow
def test_killed_node_restarts_both_and_ends_like_an_uninterrupted_run(tokens, tmp_path):
    """--max-restarts=1: node B's worker is killed at step 13; both agents restart their
    workers, which resume from step 10 and end with the uninterrupted curve."""
    worker.run_job(job(tmp_path, tokens, "ref"))
    killed = job(
        tmp_path, tokens, "killed", kill={"rank": 1, "step": 13, "once": True}, resume="auto"
    )
    results = two_nodes([killed], tmp_path, max_restarts=1, timeout=400)
    assert all(r.returncode == 0 for r in results), output(results)
    assert "resumed from" in output(results) and "step_00000010" in output(results)
    ref, got = curve(tmp_path / "ref"), curve(tmp_path / "killed")
    assert len(got) == 20
    torch.testing.assert_close(got, ref, rtol=0, atol=EXACT)


@pytest.mark.slow
def test_hung_rank_is_named_within_the_timeout(tokens, tmp_path):
    """Rank 1 stops taking part at step 3; rank 0's collective times out after
    train.dist_timeout_s = 10 and the job ends with a message naming rank 1."""
    hung = job(tmp_path, tokens, "hung", "train.dist_timeout_s=10", hang={"rank": 1, "step": 3})
    started = time.monotonic()
    # The timeout is the bound: a silent hang would raise TimeoutExpired and fail the test.
    result = torchrun([hung], tmp_path, timeout=150)
    print(f"hung job ended after {time.monotonic() - started:.1f}s")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 0 of 2: a collective operation failed" in out, out[-3000:]
    assert "Rank(s) 1 did not report the failure" in out, out[-3000:]


# ----------------------------------------------------------------------------- sharded checkpoints


def test_sharded_checkpoint_resumes_and_consolidates_in_one_process(tokens, tmp_path):
    """Default suite: one process writes the sharded format; resuming from it and its
    consolidation give exactly the gathered format's run and files."""
    from safetensors.torch import load_file

    from lmforge.train.checkpoint import read_optimizer_state
    from lmforge.train.sharded import consolidate, is_sharded_checkpoint

    worker.run_job(job(tmp_path, tokens, "ref", *SHORT))
    worker.run_job(job(tmp_path, tokens, "sharded", *SHORT, "train.checkpoint_format=sharded"))
    step3 = tmp_path / "sharded" / "checkpoints" / "step_00000003"
    assert is_sharded_checkpoint(step3) and not (step3 / "model.safetensors").exists()
    worker.run_job(job(tmp_path, tokens, "resumed", *SHORT, resume=str(step3)))
    ref = curve(tmp_path / "ref")
    assert torch.equal(curve(tmp_path / "sharded"), ref)
    assert torch.equal(curve(tmp_path / "resumed"), ref[3:])  # one process: bit-exact

    out = consolidate(step3, tmp_path / "consolidated")
    gathered = tmp_path / "ref" / "checkpoints" / "step_00000003"
    a, b = load_file(str(gathered / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = read_optimizer_state(gathered), read_optimizer_state(out)
    assert oa["param_groups"] == ob["param_groups"]
    for i, entry in oa["state"].items():
        assert all(torch.equal(entry[k], ob["state"][i][k]) for k in entry)
    # Every stage loads the sharded folder too (gathered on demand), with the same weights.
    from lmforge.model.transformer import Transformer
    from lmforge.train.checkpoint import load_weights

    model = Transformer(worker.job_config(job(tmp_path, tokens, "x")).model)
    load_weights(model, step3 / "model.safetensors")
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items() if k in a)
    # The consolidated folder is an ordinary checkpoint: a run resumes from it.
    worker.run_job(job(tmp_path, tokens, "from_consolidated", *SHORT, resume=str(out)))
    assert torch.equal(curve(tmp_path / "from_consolidated"), ref[3:])


@pytest.mark.slow
def test_sharded_fsdp_checkpoint_moves_between_world_sizes(tokens, tmp_path):
    """2 FSDP ranks write shards in parallel; 2 ranks and 1 process resume from them
    (DCP reshards); `lmforge checkpoint consolidate` gives the gathered weights."""
    from safetensors.torch import load_file

    fsdp = ("train.parallel=fsdp", "train.checkpoint_format=sharded")
    worker.run_job(job(tmp_path, tokens, "ref"))
    step10 = tmp_path / "sharded" / "checkpoints" / "step_00000010"
    result = torchrun(
        [
            job(tmp_path, tokens, "sharded", *fsdp),
            job(tmp_path, tokens, "two_from_sharded", *fsdp, resume=str(step10)),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in step10.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    worker.run_job(job(tmp_path, tokens, "one_from_sharded", resume=str(step10)))
    ref = curve(tmp_path / "ref")
    torch.testing.assert_close(curve(tmp_path / "sharded"), ref, rtol=0, atol=EXACT)
    for name in ("two_from_sharded", "one_from_sharded"):
        torch.testing.assert_close(curve(tmp_path / name), ref[10:], rtol=0, atol=EXACT)

    out = tmp_path / "consolidated"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "checkpoint",
            "consolidate",
            str(step10),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    from lmforge.model.transformer import Transformer
    from lmforge.train.checkpoint import load_weights

    cfg = worker.job_config(job(tmp_path, tokens, "ref"))
    model = Transformer(cfg.model)
    load_weights(model, out / "model.safetensors")
    gathered = load_file(
        str(tmp_path / "ref" / "checkpoints" / "step_00000010" / "model.safetensors")
    )
    for name, tensor in model.state_dict().items():
        if name in gathered:  # float rounding of 2 ranks' reductions against one process's
            torch.testing.assert_close(tensor, gathered[name], rtol=0, atol=1e-5)


def test_sharded_checkpoint_refuses_tampered_files_and_foreign_code(tmp_path):
    """A changed shard fails its checksum; an index that would run code is refused even
    when its checksum is made to match (a checkpoint received from someone else)."""
    import hashlib
    import pickle

    from lmforge.config import load_config
    from lmforge.model.transformer import Transformer
    from lmforge.train.checkpoint import CheckpointError, load_checkpoint
    from lmforge.train.sharded import INDEX, read_index, save_sharded

    shape = ["model.vocab_size=64", "model.n_layers=1", "model.d_model=32", "model.n_heads=4"]
    model = Transformer(load_config(None, shape).model)
    optimizer = torch.optim.AdamW(model.parameters())
    step = save_sharded(tmp_path, 1, model, optimizer, {"step": 1})
    assert step is not None and read_index(step).state_dict_metadata

    shard = step / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: checksum mismatch"):
        load_checkpoint(step, model, optimizer)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (step / INDEX).write_bytes(pickle.dumps(Exploit()))
    sums = json.loads((step / "checksums.json").read_text())
    sums[INDEX] = hashlib.sha256((step / INDEX).read_bytes()).hexdigest()
    (step / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match="not a checkpoint index"):
        read_index(step)
    assert not (tmp_path / "pwned").exists()
