"""The control plane's state on SQLite and PostgreSQL: migrations, constraints, restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from kcloud.cloud.db import Base, Deployment, Tenant, database_url, open_db
from tests.cloud_support import db_url_fixture, make_control, postgres_server_fixture  # noqa: F401


def test_migrations_build_exactly_the_models_schema(db_url: str | None, tmp_path: Path) -> None:
    engine, _ = open_db(database_url(db_url, tmp_path))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        assert conn.execute(text("select version_num from alembic_version")).scalar() == "0001"
    assert {"tenants", "api_keys", "deployments", "usage", "audit", "cordons"} <= set(
        inspect(engine).get_table_names())
    engine.dispose()
    again, _ = open_db(database_url(db_url, tmp_path))  # opening twice is a no-op upgrade
    again.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    engine, _ = open_db(database_url(None, tmp_path))
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_one_live_deployment_per_name_and_tenant(db_url: str | None, tmp_path: Path) -> None:
    engine, Session = open_db(database_url(db_url, tmp_path))
    row = {"model": "mlp", "spec": {}, "desired": "running", "state": "starting", "reason": "",
           "plan": {}, "placement": [], "restarts": 0, "priority": 0, "created_at": 0.0,
           "updated_at": 0.0}
    with Session() as s:
        s.add(Tenant(id="t1", name="a", quota={}, created_at=0.0))
        s.commit()
        s.add(Deployment(id="d1", tenant_id="t1", name="x", live_name="x", **row))
        s.commit()
        s.add(Deployment(id="d2", tenant_id="t1", name="x", live_name="x", **row))
        with pytest.raises(IntegrityError):
            s.commit()
        s.rollback()
        # a deleted deployment frees its name (live_name NULL never collides)
        s.get(Deployment, "d1").live_name = None
        s.add(Deployment(id="d3", tenant_id="t1", name="x", live_name=None, **row))
        s.add(Deployment(id="d4", tenant_id="t1", name="x", live_name="x", **row))
        s.commit()
        assert len(s.scalars(select(Deployment).where(Deployment.name == "x")).all()) == 3
    engine.dispose()


def test_state_survives_a_restart(db_url: str | None, tmp_path: Path) -> None:
    from kcloud.cloud.control import Principal

    c = make_control(tmp_path / "data", db_url)
    t = c.create_tenant("o'brien; drop table tenants; --", {"devices": {"furiosa-rngd": 2}})
    kid, key = c.create_key(t["id"])
    who = c.authenticate(key)
    assert who == Principal(kid, "tenant", t["id"])
    d = c.submit(who, {"name": "m", "model": "mlp", "objective": "cost", "mode": "emulated"})
    held = c.fleet.held_by(d["id"])
    with c.Session() as s:  # as if its engine had been serving when the plane stopped
        s.get(Deployment, d["id"]).state = "running"
        s.commit()
    c.engine.dispose()

    c2 = make_control(tmp_path / "data", db_url)
    assert not c2.admin_key_created  # the first start's key stays; none is printed again
    assert [x["name"] for x in c2.tenants()] == ["o'brien; drop table tenants; --"]
    assert c2.authenticate(key) == who
    assert sorted(c2.fleet.held_by(d["id"]), key=str) == sorted(held, key=str)
    assert [x.id for x in c2.list(who)] == [d["id"]]
    # no engine runs yet after a restart: the state says so until the loop sees one ready
    assert [(x.state, x.reason) for x in c2.list(who)] == [("starting",
                                                           "control plane restarted")]
    c2.engine.dispose()
