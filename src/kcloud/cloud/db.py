"""The control plane's state: SQLAlchemy 2 models, the engine, migrations to head on open.

The same schema runs on SQLite (the default, one file in the data directory, WAL mode) and on
PostgreSQL (`postgresql+psycopg://...`). The schema is created and upgraded only by the Alembic
migrations in `kcloud/cloud/migrations`, never by `create_all`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from kcloud.errors import KCloudError

MIGRATIONS = Path(__file__).parent / "migrations"


def now() -> float:
    return time.time()


def today(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), UTC).strftime("%Y-%m-%d")


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    quota: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # admin | tenant
    digest: Mapped[str] = mapped_column(String(128))  # sha256 of the key, hex
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class Deployment(Base):
    __tablename__ = "deployments"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(512))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the request as submitted
    desired: Mapped[str] = mapped_column(String(16))  # running | deleted
    state: Mapped[str] = mapped_column(String(16))  # starting|running|restarting|replacing|...
    reason: Mapped[str] = mapped_column(Text, default="")
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    placement: Mapped[list[Any]] = mapped_column(JSON)  # [{device, partition, offset, units}]
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # at most one live deployment of a name per tenant: `live_name` is the name while the
    # deployment is desired running and NULL once deleted (NULLs never collide)
    live_name: Mapped[str | None] = mapped_column(String(64))
    __table_args__ = (UniqueConstraint("tenant_id", "live_name", name="uq_deployment_live_name"),)


class Usage(Base):
    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id"))
    day: Mapped[str] = mapped_column(String(10))
    requests: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    device_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    energy_j: Mapped[float] = mapped_column(Float, default=0.0)  # modeled
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)  # estimated (catalog prices)
    __table_args__ = (UniqueConstraint("deployment_id", "day", name="uq_usage_deployment_day"),)


class Audit(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    tenant_id: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(16))  # HTTP method
    target: Mapped[str] = mapped_column(String(512))  # path
    status: Mapped[int] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(Text, default="")


class Cordon(Base):
    """A fleet device taken out of service by the operator (its deployments are re-placed)."""

    __tablename__ = "cordons"
    device: Mapped[str] = mapped_column(String(256), primary_key=True)
    at: Mapped[float] = mapped_column(Float)


def database_url(url: str | None, data_dir: Path) -> str:
    return url or f"sqlite:///{data_dir / 'kcloud.db'}"


def open_db(url: str) -> tuple[Engine, sessionmaker]:
    """An engine on `url`, migrated to the newest schema, and its session factory."""
    if not url.startswith(("sqlite:", "postgresql")):
        raise KCloudError(f"unsupported database URL scheme in '{url.split(':', 1)[0]}'",
                          "use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB")
    kw: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kw["pool_pre_ping"] = True
    engine = create_engine(url, **kw)
    if url.startswith("sqlite:"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    try:
        upgrade(engine)
    except Exception as exc:  # unreachable server, bad credentials, ...
        raise KCloudError(f"cannot open database {engine.url.render_as_string()}: "
                          f"{str(exc).splitlines()[0]}", "check --database") from None
    return engine, sessionmaker(engine, expire_on_commit=False)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations on `engine` up to `revision`."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
