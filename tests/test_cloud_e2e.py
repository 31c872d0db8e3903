"""End to end: a tenant deploys tiny-gpt (emulated) as a real `kcloud serve` in a bubblewrap
sandbox and the official `openai` client reaches it through the gateway; another tenant's key
cannot."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kcloud.cloud.api import create_app
from tests.cloud_support import LiveServer, admin_headers, bwrap_ok, make_control, wait_for

pytestmark = pytest.mark.slow


def test_a_tenant_reaches_its_engine_with_the_openai_client(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    if bwrap_ok() is not None:
        pytest.skip(f"no bubblewrap sandbox here: {bwrap_ok()}")
    control = make_control(tmp_path / "data", engine_argv=None)  # the real `kcloud serve`
    with LiveServer(create_app(control)) as srv:
        admin = admin_headers(control)
        keys = {}
        for name in ("acme", "rival"):
            t = httpx.post(f"{srv.url}/api/v1/tenants", json={"name": name}, headers=admin)
            k = httpx.post(f"{srv.url}/api/v1/tenants/{t.json()['id']}/keys", headers=admin)
            keys[name] = k.json()["key"]
        h = {"Authorization": f"Bearer {keys['acme']}"}
        dep = httpx.post(f"{srv.url}/api/v1/deployments", headers=h, timeout=300, json={
            "name": "gpt", "model": "tiny-gpt", "objective": "cost", "mode": "emulated"})
        assert dep.status_code == 201, dep.text
        dep_id = dep.json()["id"]
        wait_for(lambda: httpx.get(f"{srv.url}/api/v1/deployments/{dep_id}", headers=h)
                 .json()["state"] == "running", 300, 1)

        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=keys["acme"])
        r = client.completions.create(model="gpt", prompt="hello", max_tokens=6)
        assert r.usage.completion_tokens == 6 and isinstance(r.choices[0].text, str)
        stream = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            stream=True)
        chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
        assert 1 <= len(chunks) <= 5
        assert [m.id for m in client.models.list().data] == ["gpt"]

        rival = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=keys["rival"])
        with pytest.raises(openai.NotFoundError):
            rival.completions.create(model="gpt", prompt="hello", max_tokens=2)
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="kc_" + "0" * 16 + "_" + "x" * 43)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="gpt", prompt="hello", max_tokens=2)

        def metered() -> dict | None:
            rows = httpx.get(f"{srv.url}/api/v1/usage", headers=h).json()["usage"]
            return rows[0] if rows and rows[0]["requests"] >= 2 else None
        row = wait_for(metered, 20)
        assert row["tokens"] >= 6 + len(chunks)
