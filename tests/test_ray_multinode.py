"""A plan on two Ray nodes, as users meet it: each stage's actor lands on the node that has its
device type, outputs equal the reference, and a node that leaves mid-run ends the run with one
line naming it.

The two nodes run on this machine: the head on 127.0.0.2 (it alone has `kcloud/host-cpu`), a
worker on 127.0.0.3 (it alone has `kcloud/furiosa-rngd`). Each is a `ray start --block` in a
session of its own, so the test reaps exactly the processes it started, by process group,
and never touches another Ray instance on the host (no `ray stop`).
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
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kcloud.errors import KCloudError
from kcloud.runtime import execute, ray_executor
from kcloud.runtime.engine import Engine
from tests.test_runtime import HOST, _layers, _plan

pytestmark = pytest.mark.slow

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
RNGD = "furiosa-rngd"

# A model whose every forward takes a while, so that a node can leave mid-run.
_SLOW = '''
import time

import torch
from torch import nn


@torch.fx.wrap
def pause(x):
    time.sleep(0.025)
    return x


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return pause(self.lin(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block(), Block(), Block()])

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return x


def slow():
    return Net(), (torch.randn(2, 16),)
'''


def _free_port(ip: str) -> int:
    # The kernel's ephemeral range (32768 and up) keeps clear of Ray's worker ports 10002-19999.
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    ip: str
    proc: subprocess.Popen[bytes]
    log: Path

    def leave(self) -> None:
        """Stop this node's processes (its own process group) and wait for them."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what SIGTERM left (gcs, raylet, agents)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def _ray_start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    ray_bin = Path(sys.executable).with_name("ray")
    with log.open("wb") as out:
        return subprocess.Popen([str(ray_bin), "start", "--block", "--disable-usage-stats",
                                 "--num-cpus=2", "--object-store-memory=200000000", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _wait_for(cond, timeout: float, what: str, nodes: list[Node]) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.5)
    logs = "\n".join(n.log.read_text(errors="replace")[-2000:] for n in nodes)
    raise AssertionError(f"{what} within {timeout:.0f} s; logs:\n{logs}")


@pytest.fixture()
def cluster() -> Iterator[tuple[str, Node, Node]]:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'kcloud[ray]')")
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("the ray command is not installed next to this Python")
    assert not ray.is_initialized()
    tmp = Path(tempfile.mkdtemp(prefix="kr-"))  # short: Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = _free_port(HEAD_IP)
    address = f"{HEAD_IP}:{port}"
    nodes: list[Node] = []
    old_env = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the driver (this process) connects without auth
    try:
        head = Node(HEAD_IP, _ray_start(
            ["--head", f"--node-ip-address={HEAD_IP}", f"--port={port}",
             "--include-dashboard=false", f"--temp-dir={tmp}",
             f"--dashboard-agent-listen-port={_free_port(HEAD_IP)}",
             "--resources=" + json.dumps({ray_executor.resource_name(HOST): 2})],
            tmp / "head.log", env), tmp / "head.log")
        nodes.append(head)
        _wait_for(lambda: b"--block" in head.log.read_bytes() or head.proc.poll() is not None,
                  90, "the head node did not start", nodes)
        assert head.proc.poll() is None, head.log.read_text()
        worker = Node(WORKER_IP, _ray_start(
            [f"--address={address}", f"--node-ip-address={WORKER_IP}",
             f"--dashboard-agent-listen-port={_free_port(WORKER_IP)}",
             "--resources=" + json.dumps({ray_executor.resource_name(RNGD): 2})],
            tmp / "worker.log", env), tmp / "worker.log")
        nodes.append(worker)
        ray.init(address=address, _node_ip_address=HEAD_IP, log_to_driver=False,
                 configure_logging=False)

        def both_up() -> bool:
            return sum(1 for n in ray.nodes() if n["Alive"]) == 2

        _wait_for(both_up, 90, "the worker node did not join", nodes)
        yield address, head, worker
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for n in reversed(nodes):
            n.leave()
        if old_env is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old_env
        shutil.rmtree(tmp, ignore_errors=True)


def _placing(monkeypatch: pytest.MonkeyPatch) -> dict[int, str]:
    """Record where the engine of `execute` placed each rank's actor (it keeps the nodes in
    `Engine.placement` when it stops)."""
    where: dict[int, str] = {}
    stop = Engine.stop

    def recording(self: Engine) -> None:
        stop(self)
        where.update(self.placement)

    monkeypatch.setattr(Engine, "stop", recording)
    return where


def test_each_stage_runs_on_the_node_with_its_device_type(
        cluster: tuple[str, Node, Node], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    address, _, _ = cluster
    n = _layers("mlp")
    plan = _plan("mlp", n, [n // 2], types=[HOST, RNGD])
    where = _placing(monkeypatch)
    r = execute(plan, n_micro=4, trace_path=None, ray_address=address)
    assert r.executor == "ray" and r.reference_ok
    # rank 0 is stage 0 (host-cpu, only on the head), rank 1 stage 1 (RNGD, only on the worker)
    assert where == {0: HEAD_IP, 1: WORKER_IP}
    assert all(isinstance(t, torch.Tensor) for t in r.outputs) and len(r.outputs) == 4


def test_a_node_that_leaves_mid_run_ends_it_with_one_line_naming_it(
        cluster: tuple[str, Node, Node], tmp_path: Path) -> None:
    address, _, worker = cluster
    f = tmp_path / "slow.py"
    f.write_text(_SLOW)
    plan = _plan(f"{f}:slow", 2, [1], types=[HOST, RNGD])
    import ray

    rngd = ray_executor.resource_name(RNGD)

    def leave_once_placed() -> None:
        end = time.monotonic() + 120
        # the stage's actor holds one of the worker's two RNGD units once it is placed
        while ray.available_resources().get(rngd, 0) >= 2 and time.monotonic() < end:
            time.sleep(0.2)
        time.sleep(5.0)  # built and under way (600 forwards of 25 ms to go in each stage)
        worker.leave()

    killer = threading.Thread(target=leave_once_placed, daemon=True)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(KCloudError) as info:
        execute(plan, n_micro=600, trace_path=None, ray_address=address, warmup=0, probes=1)
    killer.join(timeout=30)
    msg = info.value.message
    assert "\n" not in msg, msg
    assert f"Ray node {WORKER_IP} leaving the cluster" in msg and RNGD in msg, msg
    assert time.monotonic() - t0 < 120
