"""Fixtures for the control plane's tests: databases (SQLite and PostgreSQL), a control plane
with a quick plain-command engine, and a live HTTP server for clients that need a real socket.

PostgreSQL: `KCLOUD_TEST_POSTGRES_URL` (set by .ci/run, which installs and starts PostgreSQL
15) names a server; without it, a throw-away server is started here with the local PostgreSQL
binaries (initdb/pg_ctl as the `postgres` user, on 127.0.0.1 and a free port). Each test gets
its own fresh database on it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ENGINE = Path(__file__).with_name("cloud_engine.py")
ENV_PG = "KCLOUD_TEST_POSTGRES_URL"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return None


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture() -> Iterator[str]:
    """A PostgreSQL server URL without a database name (`postgresql+psycopg://u@h:p`)."""
    url = os.environ.get(ENV_PG)
    if url:
        yield url.rsplit("/", 1)[0]
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip(f"no PostgreSQL: set {ENV_PG} or install postgresql (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip(f"starting PostgreSQL here needs root (su postgres); set {ENV_PG}")
    base = Path(tempfile.mkdtemp(prefix="kcloud-pg-"))  # pytest's own tmp is root-only
    data = base / "data"
    shutil.chown(base, "postgres")
    os.chmod(base, 0o700)
    port = free_port()

    def su(cmd: str) -> None:
        subprocess.run(["su", "postgres", "-c", cmd], check=True, capture_output=True,
                       timeout=120)

    su(f"{initdb} -D {data} -A trust -U postgres")
    su(f"{pg_ctl} -D {data} -l {base}/log -w -o '-p {port} -k {base} "
       f"-c listen_addresses=127.0.0.1' start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(["su", "postgres", "-c", f"{pg_ctl} -D {data} -m fast -w stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def fresh_postgres(server: str) -> str:
    import psycopg

    name = f"kcloud_{uuid.uuid4().hex[:12]}"
    plain = server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"], name="db_url")
def db_url_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None (SQLite in the data directory) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return fresh_postgres(request.getfixturevalue("postgres_server"))


def engine_argv(d: Any, plan_file: Path, sock: Path) -> list[str]:
    return [sys.executable, str(ENGINE), "--uds", sock.name, "--name", d.name]


def make_control(data_dir: Path, database: str | None = None, **kw: Any):
    from kcloud.cloud.control import Config, Control

    kw.setdefault("local_cores", 0)
    kw.setdefault("isolation", "bwrap")
    kw.setdefault("reconcile_s", 0.2)
    kw.setdefault("engine_argv", engine_argv)
    return Control(Config(data_dir, database=database, **kw))


def wait_for(pred: Any, timeout: float = 30.0, every: float = 0.1) -> Any:
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


class LiveServer:
    """The app on a real port in a thread (uvicorn), for real clients (browser, openai)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                             access_log=False)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def admin_headers(control: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {control.admin_key_path.read_text().strip()}"}


def bwrap_ok() -> str | None:
    from kcloud.cloud.sandbox import BwrapBackend

    return BwrapBackend.problem()
