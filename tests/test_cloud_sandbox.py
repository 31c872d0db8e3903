"""Sandboxes (bubblewrap, runc): a deployment cannot read another's directory, signal its
processes or reach its socket; the system is read-only; a memory limit is enforced."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest

from kcloud.cloud.sandbox import (
    BwrapBackend,
    RuncBackend,
    SandboxSpec,
    _cgroup_v1_ok,
    limits_status,
)
from tests.cloud_support import ENGINE, wait_for

PROBE = textwrap.dedent("""
    import json, os, signal, socket, sys
    other_dir, other_pid, other_sock, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    res = {}
    try:
        res["read_other"] = open(os.path.join(other_dir, "secret")).read()
    except OSError as e:
        res["read_other"] = type(e).__name__
    try:
        res["list_other"] = os.listdir(other_dir)
    except OSError as e:
        res["list_other"] = type(e).__name__
    try:
        os.kill(other_pid, signal.SIGTERM)
        res["signal_other"] = "sent"
    except OSError as e:
        res["signal_other"] = type(e).__name__
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(other_sock)
        res["connect_other"] = "connected"
    except OSError as e:
        res["connect_other"] = type(e).__name__
    try:
        open("/usr/kcloud-probe", "w")
        res["write_system"] = "written"
    except OSError as e:
        res["write_system"] = type(e).__name__
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[5])), timeout=2)
        res["tcp_host"] = "connected"
    except OSError as e:
        res["tcp_host"] = type(e).__name__
    res["pids_visible"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    open(out, "w").write(json.dumps(res))
""")


def _backend(name: str, tmp_path: Path):
    b = BwrapBackend() if name == "bwrap" else RuncBackend(
        Path(f"/run/kcloud-runc-test-{uuid.uuid4().hex[:8]}"))
    problem = b.problem()
    if problem:
        pytest.skip(problem)
    return b


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("name", ["bwrap", "runc"])
def test_one_deployment_cannot_reach_another(name: str, tmp_path: Path) -> None:
    import socket

    b = _backend(name, tmp_path)
    data = tmp_path / "data"
    a_root, b_root = data / "deployments" / "a", data / "deployments" / "b"
    a_root.mkdir(parents=True)
    b_root.mkdir(parents=True)
    (a_root / "secret").write_text("tenant a's weights")
    (data / "admin.key").write_text("kc_not_for_engines")
    listener = socket.socket()  # a TCP service on the host's loopback
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    a_sock = a_root / "engine.sock"
    a = b.start(SandboxSpec(f"t-{uuid.uuid4().hex[:6]}-a", a_root,
                            (sys.executable, str(ENGINE), "--uds", str(a_sock)),
                            env=_env(), hide=(data,)))
    try:
        wait_for(a_sock.exists, 30)
        # the gateway (the host) reaches a's engine through its socket
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(a_sock))) as c:
            assert c.get("http://engine/ready").status_code == 200
        target_pid = a.inner_pid if getattr(a, "inner_pid", None) else a.pid
        (b_root / "probe.py").write_text(PROBE)
        out = b_root / "result.json"
        pb = b.start(SandboxSpec(f"t-{uuid.uuid4().hex[:6]}-b", b_root,
                                 (sys.executable, str(b_root / "probe.py"), str(a_root),
                                  str(target_pid), str(a_sock), str(out),
                                  str(listener.getsockname()[1])),
                                 env=_env(), hide=(data,)))
        wait_for(lambda: not pb.alive(), 60)
        pb.stop()
        res = json.loads(out.read_text())
    finally:
        a.stop(5)
        listener.close()
    assert res["read_other"] == "FileNotFoundError"
    assert res["list_other"] == "FileNotFoundError"
    assert res["signal_other"] == "ProcessLookupError"  # not in its pid namespace
    assert res["connect_other"] in ("FileNotFoundError", "ConnectionRefusedError")
    assert res["write_system"] != "written"  # read-only system
    assert res["tcp_host"] != "connected"  # its own network namespace
    assert max(res["pids_visible"]) < 20  # its own few processes, not the host's
    assert a.alive() is False
    assert not (data / "deployments" / "b" / "admin.key").exists()


@pytest.mark.parametrize("name", ["bwrap", "runc"])
def test_memory_limit_is_enforced(name: str, tmp_path: Path) -> None:
    if not _cgroup_v1_ok():
        pytest.skip(f"no cgroup limits on this host: {limits_status()}")
    b = _backend(name, tmp_path)
    root = tmp_path / "d"
    root.mkdir()
    hog = ("import sys; b = bytearray(256 * 2**20); "
           "[b.__setitem__(i, 1) for i in range(0, len(b), 4096)]; print('survived')")

    def run(limit: int | None) -> tuple[int | None, str]:
        log = f"log-{limit}.txt"
        sb = b.start(SandboxSpec(f"m-{uuid.uuid4().hex[:6]}", root, (sys.executable, "-c", hog),
                                 env=_env(), memory_bytes=limit, log=log))
        wait_for(lambda: not sb.alive(), 120)
        return sb.stop(), (root / log).read_text()

    code, text = run(64 * 2**20)
    assert code != 0 and "survived" not in text
    code, text = run(None)  # the same program with no limit runs to the end
    assert code == 0 and "survived" in text


def test_limits_status_says_what_applies() -> None:
    s = limits_status()
    assert "cgroup" in s
