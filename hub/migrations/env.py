"""Alembic's environment for the hub: the connection comes from hub.store.migrate()."""

from __future__ import annotations

from alembic import context

from hub.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
