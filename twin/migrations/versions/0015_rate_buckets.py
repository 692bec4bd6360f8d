"""Rate-limit token buckets shared by every twin node on this database (issue 15).

``rate_buckets``: one row per limited caller, written by one ``INSERT ... ON CONFLICT DO
UPDATE ... RETURNING`` per request (twin/ratelimit.py ``PostgresTokenBuckets``); the row lock
serialises the takes of every node, so a key gets its burst once across the cluster. ``key``
is a keyed blake2b hash of the caller's bucket name, never the name or address itself;
``tokens`` and ``at`` are the bucket's tokens and when they were counted (after a refused
take ``tokens`` is negative: see twin/ratelimit.py).

The table is UNLOGGED: its writes skip the WAL (one per request would be the busiest table of
the primary), so a crash or an immediate shutdown empties it. That only refills every bucket:
a caller may get one more burst, nothing else is lost. Unlogged tables are not replicated
either; limits live on the primary, where the nodes write them. No model in
twin/core/models.py: the table is the limiter's private store (like the outbox's tables),
which tests/test_migrations.py leaves out of its comparison.

fillfactor 70: each take rewrites its row; the free third of every page keeps those updates
HOT (``tokens`` and ``at`` are not indexed), so the primary key index is not touched and
pages are pruned in place instead of growing until vacuum.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# Frozen here (no project module is imported: later code may change, this migration may not).
UPGRADE_SQL = """
CREATE UNLOGGED TABLE rate_buckets (
    key text PRIMARY KEY,
    tokens double precision NOT NULL,
    at timestamptz NOT NULL
) WITH (fillfactor = 70);
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS rate_buckets")
