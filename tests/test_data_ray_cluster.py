"""`prepare` on a running Ray cluster: joining it, byte-identical shards, fsspec URLs,
and a worker node killed mid-run.

Each test starts its own cluster on 127.0.0.1 with `ray start` (a head, and for the
kill test a second node), every Ray file under its own short temporary folder and
every port free-picked, and stops exactly the processes of that folder afterwards:
other Ray clusters on the machine are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from lmforge.config import PrepareConfig, PrepareSource
from lmforge.data.pipeline import ATTEMPTS, STATE, local_path, prepare

try:
    import psutil
    import ray  # noqa: F401
except ImportError:
    psutil = None
# the `ray` extra installs both
needs_ray = pytest.mark.skipif(psutil is None, reason="needs ray (pip install lmforge[ray])")

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")

# Ray turns 127.0.0.1 into the machine's routable address unless clusters are "off"
# (head and driver). A worker node refuses to start with clusters off, so it runs the
# `ray start` command with the node-address lookup pinned to the loopback address.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
WORKER_RAY_START = (
    "import sys, ray._private.services as s; "
    "s.get_node_ip_address = lambda address=None: '127.0.0.1'; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    names = [
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    ]
    return [f"--{name}={free_port()}" for name in names]


class LocalCluster:
    """A Ray head and worker nodes on this machine, each with its own temp folder."""

    def __init__(self) -> None:
        # Short: Ray's Unix sockets live under it and a socket path has ≤ 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="lmray", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",  # a token left in ~/.ray must not apply here
            "RAY_USAGE_STATS_ENABLED": "0",
            # the nodes' workers import this checkout's lmforge, as the driver does
            "PYTHONPATH": str(REPO / "src"),
        }

    def start_head(self) -> None:
        cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}"]
        cmd += ["--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"]
        cmd += [f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        cmd += [f"--temp-dir={self.root / 'head'}", *node_ports()]
        self._run(cmd, {**self.env, **LOOPBACK})

    def add_node(self, name: str) -> None:
        cmd = [sys.executable, "-c", WORKER_RAY_START, "start", f"--address={self.address}"]
        cmd += ["--num-cpus=1", f"--temp-dir={self.root / name}", *node_ports()]
        self._run(cmd, self.env)

    def _run(self, cmd: list[str], env: dict[str, str]) -> None:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    def processes(self, name: str = "") -> list:
        """Every process of this cluster (or of one node): its temp folder is in its command line."""
        mark = str(self.root / name)
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if mark in " ".join(p.info["cmdline"] or []):
                found.append(p)
        return found

    def kill(self, name: str = "") -> int:
        procs = self.processes(name)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        return len(procs)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def driver_env(self, address: str = "") -> dict[str, str]:
        """The environment of `lmforge prepare` run as a driver of this cluster."""
        env = {**self.env, **LOOPBACK}
        if address:
            env["RAY_ADDRESS"] = address  # what `ray_address=auto` finds
        return env


@pytest.fixture
def cluster():
    c = LocalCluster()
    try:
        yield c
    finally:
        c.stop()


def books(shared: Path, include: list[str]) -> PrepareConfig:
    src = PrepareSource(path=str(shared / "gutenberg"), name="books", include=include)
    # one book per task; the near-duplicate stage sees every book
    return PrepareConfig(sources=[src], task_bytes=1, workers=1, write_exclusions=True)


def recipe(tmp: Path, cfg: PrepareConfig, source_url: str) -> Path:
    """The same run as a recipe file, its source named by a file:// URL."""
    src = cfg.sources[0]
    data = {
        "prepare": {
            "sources": [{"path": source_url, "name": src.name, "include": src.include}],
            "task_bytes": cfg.task_bytes,
            "workers": cfg.workers,
        }
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def outputs(out: Path) -> dict[str, bytes]:
    files = sorted((out / "shards").glob("*")) + sorted((out / "exclusions").glob("*"))
    return {f"{f.parent.name}/{f.name}": f.read_bytes() for f in files}


def test_local_path_takes_file_urls_and_refuses_unmounted_stores(tmp_path):
    assert local_path(str(tmp_path)) == str(tmp_path)
    assert local_path(f"file://{tmp_path}/") == str(tmp_path)
    assert local_path(f"file:{tmp_path}") == str(tmp_path)  # what Path() makes of file:///x
    with pytest.raises(ValueError, match="mounted on every node"):
        local_path("memory://corpus")


@needs_ray
def test_joins_a_running_cluster_byte_identical_to_local(tmp_path, shared, cluster):
    """Smoke: `ray start --head`, then `lmforge prepare ... --prepare.executor=ray
    --prepare.ray_address=auto` with file:// URLs; the shards are the local run's bytes."""
    cfg = books(shared, ["pg35_*", "pg46_*", "pg1513_*"])
    prepare(cfg, tmp_path / "local", log=lambda s: None)
    cluster.start_head()
    out_url = f"file://{tmp_path / 'ray'}"
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "prepare",
        str(recipe(tmp_path, cfg, f"file://{shared}/gutenberg")),
    ]
    cmd += ["--prepare.executor=ray", "--prepare.ray_address=auto", "--out", out_url]
    r = subprocess.run(
        cmd, env=cluster.driver_env(cluster.address), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    local, ray_out = outputs(tmp_path / "local"), outputs(tmp_path / "ray")
    assert len(local) >= 3 and ray_out == local
    report = json.loads((tmp_path / "ray" / "data_report.json").read_text())
    assert report["timing"]["ray_address"] == "auto"
    # every task ran once per parallel stage, none twice
    assert report["retries"] == {"attempts": 6, "retried_tasks": 0, "retried": {}}


@needs_ray
def test_no_cluster_is_one_line_not_a_new_cluster(tmp_path, shared, cluster):
    """ray_address names a cluster to join: with none there, prepare fails in one line.
    (A port nobody listens on: `auto` would join any other cluster of this machine.)"""
    cfg = books(shared, ["pg35_*"])
    address = f"127.0.0.1:{free_port()}"
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "prepare",
        str(recipe(tmp_path, cfg, str(shared / "gutenberg"))),
    ]
    cmd += ["--prepare.executor=ray", f"--prepare.ray_address={address}"]
    cmd += ["--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, env=cluster.driver_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"prepare.ray_address={address}: no Ray cluster to join" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]  # no traceback, no Ray log


@pytest.mark.slow
@needs_ray
def test_failing_task_is_retried_then_one_line(tmp_path, shared, cluster):
    """An OSError is retried (`ray_max_retries`), then the run stops with one line that
    names the file; here the final shard's temporary name is taken by a folder."""
    cfg = books(shared, ["pg35_*"])
    out = tmp_path / "o"
    (out / "shards" / "00000-books.jsonl.zst.tmp").mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "prepare",
        str(recipe(tmp_path, cfg, str(shared / "gutenberg"))),
    ]
    cmd += ["--prepare.executor=ray", "--prepare.ray_max_retries=1", "--out", str(out)]
    r = subprocess.run(cmd, env=cluster.driver_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "prepare stage3: a Ray task failed after 1 retries (IsADirectoryError" in last, r.stderr
    assert "00000-books.jsonl.zst.tmp" in last
    assert sorted(p.name for p in (out / ATTEMPTS / "stage3").iterdir()) == ["00000.1", "00000.2"]
    assert (out / STATE / "stage1" / "00000.done").exists()  # finished work is kept


def node_id(cluster: LocalCluster, name: str) -> str:
    """A node's Ray id, read off its raylet's command line (workers retitle themselves)."""
    for p in cluster.processes(name):
        for arg in " ".join(p.info["cmdline"] or []).split():
            if arg.startswith("--node-id="):
                return arg.split("=", 1)[1]
    raise AssertionError(f"no raylet for node {name}")


def running_on(node: str, out: Path) -> str | None:
    """A stage-1 task that started on `node` and has not finished, if any."""
    for f in (out / ATTEMPTS / "stage1").glob("*"):
        task = f.name.rsplit(".", 1)[0]
        if (out / STATE / "stage1" / f"{task}.done").exists():
            continue
        try:
            if json.loads(f.read_text())["node"] == node:
                return task
        except ValueError:
            continue  # the attempt file is being written
    return None


@pytest.mark.slow
@needs_ray
def test_killed_worker_node_run_completes_byte_identical(tmp_path, shared, cluster):
    """Kill a worker node (SIGKILL to its raylet and workers) while one of its tasks
    runs: Ray reruns the task on the head, the run completes with the local run's bytes,
    and the report names the rerun task."""
    include = ["pg35_*", "pg46_*", "pg1513_*", "pg84_*", "pg174_*", "pg844_*", "pg64317_*"]
    cfg = books(shared, include)
    prepare(cfg, tmp_path / "local", log=lambda s: None)
    cluster.start_head()
    cluster.add_node("worker")
    out = tmp_path / "ray"
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "prepare",
        str(recipe(tmp_path, cfg, f"file://{shared}/gutenberg")),
    ]
    cmd += ["--prepare.executor=ray", f"--prepare.ray_address={cluster.address}"]
    cmd += ["--out", str(out)]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(cmd, env=cluster.driver_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        killed_task = None
        worker = node_id(cluster, "worker")
        while killed_task is None and time.monotonic() < deadline and driver.poll() is None:
            killed_task = running_on(worker, out)
            time.sleep(0.02)
        assert killed_task, "no task ran on the worker node"
        assert cluster.kill("worker") > 0
        assert driver.wait(timeout=400) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert outputs(out) == outputs(tmp_path / "local")
    report = json.loads((out / "data_report.json").read_text())
    assert report["retries"]["retried_tasks"] >= 1
    assert killed_task in report["retries"]["retried"]["stage1"]
    assert "rerun after a worker or node failure" in (out / "data_report.md").read_text()


def test_docs_show_the_tested_commands():
    """docs/distributed.md shows the commands the tests above run (with the docs' ports)."""
    text = (REPO / "docs" / "distributed.md").read_text(encoding="utf-8")
    section = text.split("## Data on a Ray cluster", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = [c.strip() for c in block.splitlines() if c.strip() and not c.startswith("#")]
    assert [c.split()[:2] for c in commands] == [["ray", "start"]] * 2 + [["lmforge", "prepare"]]
    assert "--head" in commands[0] and "--address=" in commands[1]
    assert "--prepare.executor=ray --prepare.ray_address=auto" in commands[2]
    assert "--out file:///" in commands[2]


def test_run_resumes_on_another_executor(tmp_path, shared):
    """A run stopped on a cluster resumes anywhere: the executor keys are not part of the
    run's fingerprint, finished tasks are kept and the unfinished one is redone."""
    cfg = books(shared, ["pg35_*", "pg46_*"])
    out = tmp_path / "run"
    prepare(cfg, out, log=lambda s: None)
    before = outputs(out)
    # as if the cluster died while task 00001 wrote its final shard
    (out / STATE / "stage3" / "00001.done").unlink()
    shard = next((out / "shards").glob("00001-*"))
    shard.rename(shard.with_name(shard.name + ".tmp"))
    done = (out / STATE / "stage3" / "00000.done").stat().st_mtime_ns
    elsewhere = replace(cfg, executor="local", workers=2, ray_address="auto", ray_max_retries=9)
    prepare(elsewhere, out, log=lambda s: None)
    assert outputs(out) == before
    assert (out / STATE / "stage3" / "00000.done").stat().st_mtime_ns == done  # not redone
