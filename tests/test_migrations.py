"""The migrated schema is exactly the model: nothing missing, nothing extra."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from twin.core.models import Base
from twin.migrate import alembic_config, current_revision, include_object, upgrade


def test_migrated_database_matches_the_models(engine: Engine):
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"include_object": include_object, "compare_type": True}
        )
        assert compare_metadata(context, Base.metadata) == []


def test_migrating_again_is_a_no_op(engine: Engine):
    before = current_revision(engine)
    upgrade(engine)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert current_revision(engine) == before == head


def test_every_layer_table_bumps_its_data_version_on_write(engine: Engine):
    with engine.begin() as conn:
        before = conn.execute(text("SELECT data_version FROM layers WHERE id = 'risk_points'"))
        before = before.scalar_one()
        conn.execute(text("UPDATE risk_points SET name = name WHERE id = 1"))
        after = conn.execute(text("SELECT data_version FROM layers WHERE id = 'risk_points'"))
        assert after.scalar_one() == before + 1
        conn.rollback()
