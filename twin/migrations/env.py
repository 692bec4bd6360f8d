"""Alembic environment: runs twin's migrations on the connection twin hands it."""

from __future__ import annotations

from alembic import context
from geoalchemy2 import alembic_helpers

from twin.core.models import Base
from twin.migrate import include_object

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_object=include_object,
        process_revision_directives=alembic_helpers.writer,
        render_item=alembic_helpers.render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
