"""Alembic's environment for the aggregator's store: always run from :meth:`Store.migrate`,
which hands over an open connection (in a transaction, under the migration lock)."""

from __future__ import annotations

from alembic import context

from aggregator.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with 'footfall-aggregator migrate', not the alembic CLI")
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
