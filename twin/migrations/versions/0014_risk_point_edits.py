"""The history of risk points edited through the API (issue 14, OGC API - Features Part 4).

``risk_point_edits``: one row per create, replace, update or delete of a risk point, written
in the transaction of the change: who, when, what, and the point before and after (jsonb;
``before`` is NULL for a create, ``after`` for a delete). ``risk_point_id`` has no foreign key:
the history of a deleted point stays. The ETag of an item is a hash of its stored content
(twin/live/risk_edits.py), so no column is added to ``risk_points``.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# Frozen here (no project module is imported: later code may change, this migration may not).
UPGRADE_SQL = """
CREATE TABLE risk_point_edits (
    id bigserial PRIMARY KEY,
    risk_point_id bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    principal text NOT NULL,
    action varchar(8) NOT NULL
        CONSTRAINT risk_point_edit_action
        CHECK (action IN ('create', 'replace', 'update', 'delete')),
    before jsonb,
    after jsonb
);
CREATE INDEX risk_point_edits_point_at ON risk_point_edits (risk_point_id, at);
CREATE INDEX risk_point_edits_at ON risk_point_edits (at);
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS risk_point_edits")
