"""The cloud CLI over the REST API: `kcloud cloud up`, tenant, key, deploy, deployments,
usage; `--json` prints one object; refusals are one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.cloud_support import free_port, wait_for

pytestmark = pytest.mark.slow


def kcloud(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kcloud.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def up(data: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen([sys.executable, "-m", "kcloud.cli", "cloud", "up", "--data-dir",
                          str(data), "--port", str(port), "--local-cores", "0",
                          "--isolation", "none"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/openapi.json", timeout=2).status_code == 200
        except httpx.HTTPError:
            assert p.poll() is None, p.stdout.read() if p.stdout else ""
            return False
    wait_for(ready, 120, 0.2)
    return p, url


def down(p: subprocess.Popen[str]) -> str:
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    return out


def test_cloud_cli_round_trip(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    p, url = up(data, port)
    try:
        admin = (data / "admin.key").read_text().strip()
        assert (data / "admin.key").stat().st_mode & 0o777 == 0o600
        env = {**os.environ, "KCLOUD_URL": url, "KCLOUD_KEY": admin}
        r = kcloud("tenant", "create", "acme", "--devices", "furiosa-rngd=2",
                   "--max-deployments", "2", "--json", env=env)
        assert r.returncode == 0, r.stderr
        tenant = json.loads(r.stdout)
        assert tenant["quota"]["devices"] == {"furiosa-rngd": 2.0}
        listed = json.loads(kcloud("tenant", "list", "--json", env=env).stdout)
        assert [t["name"] for t in listed["tenants"]] == ["acme"]
        assert "acme" in kcloud("tenant", "list", env=env).stdout
        key = json.loads(kcloud("key", "create", tenant["id"], "--json", env=env).stdout)
        tenv = {**env, "KCLOUD_KEY": key["key"]}
        r = kcloud("deploy", "mlp", "--name", "m", "--objective", "cost", "--json", env=tenv)
        assert r.returncode == 0, r.stderr
        dep = json.loads(r.stdout)
        assert dep["name"] == "m" and dep["placement"]
        deps = json.loads(kcloud("deployments", "--json", env=tenv).stdout)["deployments"]
        assert [d["id"] for d in deps] == [dep["id"]]
        assert "m" in kcloud("deployments", env=tenv).stdout
        usage = json.loads(kcloud("usage", "--json", env=tenv).stdout)
        assert usage["figures"]["energy_j"] == "modeled"
        # refusals: one line, exit 2
        r = kcloud("deploy", "/etc/passwd", "--name", "x", env=tenv)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "422" in r.stderr
        r = kcloud("tenant", "list", env=tenv)
        assert r.returncode == 2 and "403" in r.stderr
        assert kcloud("key", "revoke", key["id"], "--json", env=env).returncode == 0
        r = kcloud("deployments", env=tenv)
        assert r.returncode == 2 and "401" in r.stderr
        r = kcloud("deployments", env={**env, "KCLOUD_URL": f"http://127.0.0.1:{free_port()}"})
        assert r.returncode == 2 and "cannot reach" in r.stderr
    finally:
        first = down(p)
    assert "admin key written to" in first and admin not in first
    p, _ = up(data, port)  # a second start neither makes nor shows a key
    second = down(p)
    assert "admin key written" not in second and admin not in second
    assert (data / "admin.key").read_text().strip() == admin
