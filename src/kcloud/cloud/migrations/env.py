"""Alembic environment: migrations run on the connection `kcloud.cloud.db.upgrade` passes in."""

from alembic import context

from kcloud.cloud.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
