"""Alembic environment: the connection comes from server.store.database.migrate()."""

from alembic import context

from server.store.tables import Base

connection = context.config.attributes["connection"]
# on_version_apply: set by migrate(on_step=...) to report each revision as it is applied.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  on_version_apply=context.config.attributes.get("on_version_apply"))
with context.begin_transaction():
    context.run_migrations()
