"""Alembic environment of the service database: always run programmatically (:func:`serving.migrate.upgrade`) on
a connection the caller opened, inside its transaction and under its lock."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
