"""The REST API and its security: keys, tenants' walls, quotas, refusals, bad input, audit.

These run the app in-process with the reconcile loop off (deployments stay as the database
holds them); engines, the gateway and the loop are covered in test_cloud_control.py.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from kcloud.cloud.api import API_BODY_LIMIT, create_app
from kcloud.cloud.db import ApiKey
from tests.cloud_support import admin_headers, db_url_fixture, make_control, postgres_server_fixture  # noqa: F401


class Cloud:
    def __init__(self, control: Any, client: TestClient) -> None:
        self.c = control
        self.http = client
        self.admin = admin_headers(control)

    def tenant(self, name: str, **quota: Any) -> tuple[str, dict[str, str], str]:
        r = self.http.post("/api/v1/tenants", json={"name": name, "quota": quota},
                           headers=self.admin)
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        k = self.http.post(f"/api/v1/tenants/{tid}/keys", headers=self.admin)
        assert k.status_code == 201
        return tid, {"Authorization": f"Bearer {k.json()['key']}"}, k.json()["id"]

    def deploy(self, headers: dict[str, str], **body: Any) -> Any:
        body.setdefault("objective", "cost")
        return self.http.post("/api/v1/deployments", json=body, headers=headers)


@pytest.fixture
def cloud(db_url: str | None, tmp_path: Path) -> Iterator[Cloud]:
    control = make_control(tmp_path / "data", db_url)
    with TestClient(create_app(control, reconcile=False)) as client:
        yield Cloud(control, client)
    control.engine.dispose()


ENDPOINTS = [("POST", "/api/v1/tenants"), ("GET", "/api/v1/tenants"),
             ("POST", "/api/v1/tenants/t_x/keys"), ("DELETE", "/api/v1/keys/k_x"),
             ("POST", "/api/v1/deployments"), ("GET", "/api/v1/deployments"),
             ("GET", "/api/v1/deployments/d_x"), ("DELETE", "/api/v1/deployments/d_x"),
             ("GET", "/api/v1/fleet"), ("GET", "/api/v1/usage"), ("GET", "/api/v1/audit"),
             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
             ("POST", "/v1/infer"), ("GET", "/v1/models")]


def test_admin_key_file_is_private_and_first_start_only(cloud: Cloud) -> None:
    p = cloud.c.admin_key_path
    assert p.stat().st_mode & 0o777 == 0o600
    assert cloud.c.admin_key_created
    r = cloud.http.get("/api/v1/whoami", headers=cloud.admin)
    assert r.json()["role"] == "admin"


def test_every_endpoint_refuses_no_key_a_bad_key_and_a_revoked_key(cloud: Cloud) -> None:
    _, tenant, kid = cloud.tenant("acme")
    assert cloud.http.delete(f"/api/v1/keys/{kid}", headers=cloud.admin).status_code == 200
    for method, path in ENDPOINTS:
        for headers in ({}, {"Authorization": "Bearer kc_0123456789abcdef_" + "A" * 43},
                        {"Authorization": "Basic abc"}, tenant):
            r = cloud.http.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.text)
            assert "Traceback" not in r.text


def test_admin_calls_refuse_tenant_keys(cloud: Cloud) -> None:
    tid, tenant, _ = cloud.tenant("acme")
    for method, path in [("POST", "/api/v1/tenants"), ("GET", "/api/v1/tenants"),
                         ("POST", f"/api/v1/tenants/{tid}/keys"), ("GET", "/api/v1/fleet"),
                         ("GET", "/api/v1/audit")]:
        r = cloud.http.request(method, path, headers=tenant,
                               json={"name": "x"} if method == "POST" else None)
        assert r.status_code == 403, (path, r.text)


def test_a_tenant_sees_and_touches_only_its_own(cloud: Cloud) -> None:
    _, a, _ = cloud.tenant("a")
    _, b, b_key_id = cloud.tenant("b")
    r = cloud.deploy(a, name="m", model="mlp")
    assert r.status_code == 201, r.text
    dep = r.json()
    assert dep["state"] == "starting" and dep["placement"]
    assert cloud.http.get(f"/api/v1/deployments/{dep['id']}", headers=a).status_code == 200
    assert cloud.http.get(f"/api/v1/deployments/{dep['id']}", headers=b).status_code == 404
    assert cloud.http.delete(f"/api/v1/deployments/{dep['id']}", headers=b).status_code == 404
    assert cloud.http.get("/api/v1/deployments", headers=b).json()["deployments"] == []
    # b may reuse the name: names are per tenant
    assert cloud.deploy(b, name="m", model="mlp").status_code == 201
    assert cloud.deploy(a, name="m", model="mlp").status_code == 409
    # a tenant cannot revoke another tenant's key
    assert cloud.http.delete(f"/api/v1/keys/{b_key_id}", headers=a).status_code == 404
    usage_b = cloud.http.get("/api/v1/usage", headers=b).json()["usage"]
    assert all(u["deployment"] == "m" and u["tenant"] == "b" for u in usage_b)


def test_keys_are_stored_only_as_hashes(cloud: Cloud, db_url: str | None) -> None:
    _, tenant, kid = cloud.tenant("acme")
    key = tenant["Authorization"].split()[1]
    with cloud.c.Session() as s:
        rows = s.scalars(select(ApiKey)).all()
        assert all(key not in (r.digest, r.id) for r in rows)
        row = s.get(ApiKey, kid)
        assert row.digest == hashlib.sha256(key.encode()).hexdigest()
    if db_url is None:  # the key is nowhere in the database files
        for f in cloud.c.dir.glob("kcloud.db*"):
            assert key.encode() not in f.read_bytes()
        admin = cloud.admin["Authorization"].split()[1].encode()
        assert all(admin not in f.read_bytes() for f in cloud.c.dir.glob("kcloud.db*"))


@pytest.mark.parametrize("name", ["o'brien", 'quote"s', "x'; DROP TABLE tenants; --",
                                  "../../etc/passwd", "<script>alert(1)</script>", "Robert%00"])
def test_tenant_names_are_stored_literally(cloud: Cloud, name: str) -> None:
    _, tenant, _ = cloud.tenant(name)
    names = [t["name"] for t in cloud.http.get("/api/v1/tenants", headers=cloud.admin)
             .json()["tenants"]]
    assert names == [name]
    login = cloud.http.post("/console/login", json={"key": tenant["Authorization"].split()[1]})
    assert login.status_code == 200
    page = cloud.http.get("/").text
    assert "<script>alert(1)</script>" not in page  # escaped in the console
    cloud.http.cookies.clear()


@pytest.mark.parametrize("name", ["../x", "a/b", "x'; --", "a b", "", "-lead", "x" * 64,
                                  "name\n"])
def test_deployment_names_that_are_not_names_are_refused(cloud: Cloud, name: str) -> None:
    _, tenant, _ = cloud.tenant("acme")
    r = cloud.deploy(tenant, name=name, model="mlp")
    assert r.status_code == 422 and r.json()["field"] == "name", r.text


def test_model_paths_outside_the_allowed_roots_are_refused(cloud: Cloud, tmp_path: Path) -> None:
    _, tenant, _ = cloud.tenant("acme")
    outside = tmp_path / "evil.py"
    outside.write_text("def f():\n    raise SystemExit\n")
    link = cloud.c.dir / "models" / "link.py"
    os.symlink(outside, link)
    for model in ["/etc/passwd", "../../../etc/passwd", f"{outside}:f", "models/../../x.onnx",
                  f"{link}:f", "link.py:f"]:
        r = cloud.deploy(tenant, name="m", model=model)
        assert r.status_code == 422 and r.json()["field"] == "model", (model, r.text)


def test_a_model_that_is_code_is_refused_even_inside_the_roots(cloud: Cloud) -> None:
    _, tenant, _ = cloud.tenant("acme")
    inside = cloud.c.dir / "models" / "net.py"
    inside.write_text("import os\nos.system('touch /tmp/kcloud-pwned')\n"
                      "def f():\n    raise SystemExit\n")
    r = cloud.deploy(tenant, name="m", model=f"{inside}:f")
    assert r.status_code == 422 and "Python code" in r.json()["error"], r.text
    assert not Path("/tmp/kcloud-pwned").exists()


def test_bodies_over_the_limit_are_413(cloud: Cloud) -> None:
    _, tenant, _ = cloud.tenant("acme")
    big = b'{"name": "' + b"x" * (API_BODY_LIMIT + 10) + b'"}'
    r = cloud.http.post("/api/v1/deployments", content=big,
                        headers={**tenant, "content-type": "application/json"})
    assert r.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"name": "'
        for _ in range(API_BODY_LIMIT // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'
    r = cloud.http.post("/api/v1/deployments", content=chunks(),
                        headers={**tenant, "content-type": "application/json"})
    assert r.status_code == 413


def test_malformed_bodies_are_422_naming_the_field(cloud: Cloud) -> None:
    _, tenant, _ = cloud.tenant("acme")
    cases = [(b"{not json", "body"), (b'{"model": "mlp"}', "name"),
             (b'{"name": "m", "model": "mlp", "mode": "quantum"}', "mode"),
             (b'{"name": "m", "model": "mlp", "slo_ms": -1}', "slo_ms"),
             (b'{"name": "m", "model": "mlp", "extra": 1}', "extra"),
             (b'[1, 2]', "body")]
    for body, field in cases:
        r = cloud.http.post("/api/v1/deployments", content=body,
                            headers={**tenant, "content-type": "application/json"})
        assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
    r = cloud.http.post("/api/v1/tenants", json={"name": "x", "quota": {"devices": {
        "furiosa-rngd": "lots"}}}, headers=cloud.admin)
    assert r.status_code == 422 and r.json()["field"] == "quota.devices.furiosa-rngd"
    r = cloud.http.post("/api/v1/tenants", json={"name": "x", "quota": {"devices": {
        "no-such-chip": 1}}}, headers=cloud.admin)
    assert r.status_code == 422 and r.json()["field"] == "quota.devices.no-such-chip"


def test_an_unsatisfiable_deployment_is_refused_with_the_nearest_request(cloud: Cloud) -> None:
    _, tenant, _ = cloud.tenant("acme")
    r = cloud.deploy(tenant, name="fast", model="tiny-gpt", objective="latency", slo_ms=0.001)
    assert r.status_code == 422
    body = r.json()
    assert "SLO" in body["error"] and body["nearest"].startswith("slo_ms: ")
    looser = float(body["nearest"].split()[1])
    r = cloud.deploy(tenant, name="fast", model="tiny-gpt", objective="latency", slo_ms=looser)
    assert r.status_code == 201, r.text  # the nearest request is admitted
    assert cloud.http.get("/api/v1/deployments", headers=tenant).json()["deployments"][0][
        "name"] == "fast"


def test_over_quota_is_403_naming_the_quota(cloud: Cloud) -> None:
    _, small, _ = cloud.tenant("small", devices={"furiosa-rngd": 0.125}, max_deployments=2)
    r = cloud.deploy(small, name="a", model="mlp")
    assert r.status_code == 201, r.text
    assert r.json()["placement"][0]["partition"] == "1core.6gb"  # an eighth of a card
    r = cloud.deploy(small, name="b", model="mlp")
    assert r.status_code == 403 and r.json()["quota"] == "devices.furiosa-rngd", r.text
    _, one, _ = cloud.tenant("one", max_deployments=1)
    assert cloud.deploy(one, name="a", model="mlp").status_code == 201
    r = cloud.deploy(one, name="b", model="mlp")
    assert r.status_code == 403 and r.json()["quota"] == "max_deployments"


def test_fleet_view_shows_holders_power_and_domestic_share(cloud: Cloud) -> None:
    tid, tenant, _ = cloud.tenant("acme", devices={"furiosa-rngd": 1})
    dep = cloud.deploy(tenant, name="m", model="mlp").json()
    fleet = cloud.http.get("/api/v1/fleet", headers=cloud.admin).json()
    held = [d for d in fleet["devices"] if d["held"]]
    assert [h["holder"] for d in held for h in d["held"]] == [dep["id"]]
    assert held[0]["tenants"] == [tid] and held[0]["type"] == "furiosa-rngd"
    assert fleet["domestic_share_in_use"] == 1.0 and fleet["power_figures"] == "modeled"
    assert fleet["devices_total"] == len(cloud.c.fleet.devices)
    assert fleet["power_w"] > fleet["idle_power_w"]


def test_every_mutating_call_is_audited(cloud: Cloud) -> None:
    tid, tenant, kid = cloud.tenant("acme")
    cloud.deploy(tenant, name="m", model="mlp")
    cloud.deploy(tenant, name="../bad", model="mlp")
    cloud.http.delete(f"/api/v1/keys/{kid}", headers=cloud.admin)
    cloud.http.post("/api/v1/tenants", json={"name": "z"})  # no key
    log = cloud.http.get("/api/v1/audit", headers=cloud.admin).json()["audit"]
    seen = [(a["action"], a["target"], a["status"], a["tenant_id"]) for a in reversed(log)]
    assert seen == [("POST", "/api/v1/tenants", 201, None),
                    ("POST", f"/api/v1/tenants/{tid}/keys", 201, None),
                    ("POST", "/api/v1/deployments", 201, tid),
                    ("POST", "/api/v1/deployments", 422, tid),
                    ("DELETE", f"/api/v1/keys/{kid}", 200, None),
                    ("POST", "/api/v1/tenants", 401, None)]
    assert all(a["at"] > 0 for a in log)


def test_no_traceback_reaches_a_client(cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> None:
        raise RuntimeError("secret internals /etc/shadow")
    monkeypatch.setattr(cloud.c, "tenants", boom)
    with TestClient(create_app(cloud.c, reconcile=False), raise_server_exceptions=False) as c:
        r = c.get("/api/v1/tenants", headers=cloud.admin)
    assert r.status_code == 500 and r.json() == {"error": "internal error"}
    assert "secret" not in r.text


def test_openapi_schema_is_served(cloud: Cloud) -> None:
    paths = cloud.http.get("/openapi.json").json()["paths"]
    assert {"/api/v1/tenants", "/api/v1/deployments", "/api/v1/fleet", "/api/v1/usage",
            "/v1/completions"} <= set(paths)
