"""The reconcile loop and the gateway, with engines in bubblewrap sandboxes.

The engine here is the plain-command one (tests/cloud_engine.py: a unix-socket HTTP server
that echoes its deployment's name) so that the loop's behaviour can be watched in seconds;
test_cloud_e2e.py runs the real `kcloud serve`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kcloud.cloud.api import create_app
from tests.cloud_support import admin_headers, bwrap_ok, make_control, wait_for

pytestmark = pytest.mark.slow

if bwrap_ok() is not None:
    pytest.skip(f"no bubblewrap sandbox here: {bwrap_ok()}", allow_module_level=True)


class Plane:
    """A control plane on a data directory that a test can stop and start again."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.control: Any = None
        self.http: TestClient | None = None

    def up(self) -> Plane:
        self.control = make_control(self.data)
        self.http = TestClient(create_app(self.control))
        self.http.__enter__()
        self.admin = admin_headers(self.control)
        return self

    def down(self) -> None:
        if self.http is not None:
            self.http.__exit__(None, None, None)
            self.http = None

    def tenant(self, name: str, **quota: Any) -> dict[str, str]:
        assert self.http is not None
        tid = self.http.post("/api/v1/tenants", json={"name": name, "quota": quota},
                             headers=self.admin).json()["id"]
        key = self.http.post(f"/api/v1/tenants/{tid}/keys", headers=self.admin).json()["key"]
        return {"Authorization": f"Bearer {key}"}

    def deploy(self, h: dict[str, str], name: str) -> dict[str, Any]:
        assert self.http is not None
        r = self.http.post("/api/v1/deployments", json={"name": name, "model": "mlp",
                                                        "objective": "cost"}, headers=h)
        assert r.status_code == 201, r.text
        return r.json()

    def get(self, h: dict[str, str], dep_id: str) -> dict[str, Any]:
        assert self.http is not None
        return self.http.get(f"/api/v1/deployments/{dep_id}", headers=h).json()

    def running(self, h: dict[str, str], dep_id: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(lambda: (d := self.get(h, dep_id))["state"] == "running" and d, timeout)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path / "data").up()
    yield p
    p.down()


def test_deploy_serve_stream_meter_and_wall_off_other_tenants(plane: Plane) -> None:
    a = plane.tenant("a")
    b = plane.tenant("b")
    dep = plane.deploy(a, "echo")
    plane.running(a, dep["id"])
    http = plane.http
    assert http is not None
    r = http.post("/v1/completions", json={"model": "echo", "prompt": "hi"}, headers=a)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "echo:hi"
    with http.stream("POST", "/v1/completions", headers=a,
                     json={"model": "echo", "prompt": "yo", "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in s.iter_lines() if ln.startswith("data:")]
    assert len(events) == len("echo:yo") + 1 and events[-1] == "data: [DONE]"
    # another tenant: the name does not exist for it
    r = http.post("/v1/completions", json={"model": "echo", "prompt": "hi"}, headers=b)
    assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
    assert http.get("/v1/models", headers=b).json()["data"] == []
    assert [m["id"] for m in http.get("/v1/models", headers=a).json()["data"]] == ["echo"]
    # metered: two requests, the tokens of both
    def metered() -> dict[str, Any] | None:
        rows = http.get("/api/v1/usage", headers=a).json()["usage"]
        return rows[0] if rows and rows[0]["requests"] == 2 else None
    row = wait_for(metered, 10)
    assert row["tokens"] == len("echo:hi") + len("echo:yo")
    assert row["device_seconds"] > 0 and row["energy_j"] > 0
    assert http.get("/api/v1/usage", headers=b).json()["usage"] == []


def test_rate_limit_is_a_token_bucket_per_key(plane: Plane) -> None:
    a = plane.tenant("a", requests_per_minute=6)  # a burst of one, then one per 10 s
    dep = plane.deploy(a, "echo")
    plane.running(a, dep["id"])
    assert plane.http is not None
    body = {"model": "echo", "prompt": "x"}
    assert plane.http.post("/v1/completions", json=body, headers=a).status_code == 200
    r = plane.http.post("/v1/completions", json=body, headers=a)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 10


def test_a_dead_engine_is_restarted(plane: Plane) -> None:
    a = plane.tenant("a")
    dep = plane.running(a, plane.deploy(a, "echo")["id"])
    pid = dep["engine_pid"]
    os.killpg(pid, signal.SIGKILL)
    back = wait_for(lambda: (d := plane.get(a, dep["id"]))["state"] == "running"
                    and d["engine_pid"] != pid and d, 60)
    assert back["restarts"] == 1


def test_cordoned_devices_are_replaced(plane: Plane) -> None:
    a = plane.tenant("a")
    dep = plane.running(a, plane.deploy(a, "echo")["id"])
    device = dep["placement"][0]["device"]
    assert plane.http is not None
    r = plane.http.post(f"/api/v1/fleet/devices/{device}", json={"cordoned": True},
                        headers=plane.admin)
    assert r.status_code == 200
    moved = wait_for(lambda: (d := plane.get(a, dep["id"]))["state"] == "running"
                     and d["placement"] and d["placement"][0]["device"] != device and d, 60)
    assert all(p["device"] != device for p in moved["placement"])
    fleet = plane.http.get("/api/v1/fleet", headers=plane.admin).json()
    cordoned = next(d for d in fleet["devices"] if d["id"] == device)
    assert cordoned["cordoned"] and cordoned["held"] == []


def test_a_restart_loses_nothing(plane: Plane) -> None:
    a = plane.tenant("a")
    deps = [plane.running(a, plane.deploy(a, f"m{i}")["id"]) for i in range(3)]
    plane.down()  # engines stop; desired state stays
    for d in deps:
        assert not (plane.data / "deployments" / d["id"] / "sandbox.pid").exists()
    plane.up()
    assert not plane.control.admin_key_created
    for d in deps:
        back = plane.running(a, d["id"])
        assert back["placement"] == d["placement"]
    assert plane.http is not None
    r = plane.http.post("/v1/completions", json={"model": "m1", "prompt": "?"}, headers=a)
    assert r.json()["choices"][0]["text"] == "m1:?"


def test_an_orphaned_engine_is_reaped(plane: Plane) -> None:
    a = plane.tenant("a")
    dep = plane.running(a, plane.deploy(a, "echo")["id"])
    old = dep["engine_pid"]
    # the control plane dies without stopping its engines
    plane.control._stop.set()
    plane.control.wake()
    plane.control._thread.join(30)
    # the engine it left (a slow health check under load may have restarted it once before)
    e = plane.control.engines.get(dep["id"])
    old = e.run.sandbox.pid if e is not None and e.run is not None else old
    plane.control.engines.clear()
    os.kill(old, 0)  # still running
    plane.http.__exit__(None, None, None)
    plane.http = None
    plane.up()
    wait_for(lambda: not _alive(old), 30)
    back = plane.running(a, dep["id"])
    assert back["engine_pid"] != old


def test_deleting_stops_the_engine_and_frees_its_devices(plane: Plane) -> None:
    a = plane.tenant("a")
    dep = plane.running(a, plane.deploy(a, "echo")["id"])
    assert plane.http is not None
    assert plane.http.delete(f"/api/v1/deployments/{dep['id']}", headers=a).status_code == 200
    wait_for(lambda: plane.http.get(f"/api/v1/deployments/{dep['id']}",
                                    headers=a).status_code == 404, 30)
    wait_for(lambda: not _alive(dep["engine_pid"]), 30)
    assert plane.control.fleet.held_by(dep["id"]) == []
    assert not (plane.data / "deployments" / dep["id"]).exists()
    r = plane.http.post("/v1/completions", json={"model": "echo", "prompt": "x"}, headers=a)
    assert r.status_code == 404
    # the name is free again
    assert plane.deploy(a, "echo")["name"] == "echo"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of this test process counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
