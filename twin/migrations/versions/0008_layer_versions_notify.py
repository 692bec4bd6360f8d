"""Every change of a layer's row is announced on the ``twin_layer_versions`` channel.

Each server process LISTENs there (twin/core/versions.py) and keeps every layer's data version
in memory, so a cached tile costs no database round trip. The existing trigger of migration
0001 bumps ``layers.data_version`` on every write to a layer's table, which is an UPDATE of
the ``layers`` row: that UPDATE fires this trigger too, so writes to layer tables, publishes,
rollbacks and deletes all notify. NOTIFY is transactional: it is delivered after commit, in
commit order, and never for a transaction that rolled back.

Payload: ``<layer id>:<data version>``, or ``<layer id>:`` when the layer was deleted.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Frozen here (no project module is imported: later code may change, this migration may not).
NOTIFY_SQL = """
CREATE OR REPLACE FUNCTION twin_notify_layer_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('twin_layer_versions', OLD.id || ':');
        RETURN NULL;
    END IF;
    -- Only a new id or a new version is news: title or meta edits change no tile.
    IF TG_OP = 'INSERT' OR NEW.data_version IS DISTINCT FROM OLD.data_version
            OR NEW.id IS DISTINCT FROM OLD.id THEN
        IF TG_OP = 'UPDATE' AND NEW.id IS DISTINCT FROM OLD.id THEN
            PERFORM pg_notify('twin_layer_versions', OLD.id || ':');
        END IF;
        PERFORM pg_notify('twin_layer_versions', NEW.id || ':' || NEW.data_version);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER layers_notify_version AFTER INSERT OR UPDATE OR DELETE ON layers
    FOR EACH ROW EXECUTE FUNCTION twin_notify_layer_version();
"""


def upgrade() -> None:
    op.execute(NOTIFY_SQL)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS layers_notify_version ON layers")
    op.execute("DROP FUNCTION IF EXISTS twin_notify_layer_version()")
