"""Hourly rollups of sensor readings (issue 15, data growth).

``sensor_readings_hourly``: one row per sensor and closed UTC hour that has readings: how
many (``count``), ``min``, ``max``, ``sum`` (``avg`` is stored as ``sum / count``, for
readers; ``sum`` is what adds up exactly into days or districts), the first and last
reading's instant, and when the row was computed. Kept by the partition keeper
(twin/live/partitions.py) from the day partitions of ``sensor_readings``, before raw
retention drops them; it has retention of its own (TWIN_READINGS_ROLLUP_RETENTION_DAYS):
a year of rollups is what a trend chart reads long after the raw readings are gone.

``sensor_readings_rollup_seen``: the keeper's bookkeeping, one row per day partition it
rolled up: the partition's insert, update and delete counter (PostgreSQL's cumulative
statistics) when it did, and up to which hour. A partition whose counter moved since (a
late reading came in) or that has closed hours beyond that mark is rolled up again.

Neither table has a model in twin/core/models.py: both are the keeper's own store, which
tests/test_migrations.py leaves out of its comparison.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

# Frozen here (no project module is imported: later code may change, this migration may not).
UPGRADE_SQL = """
CREATE TABLE sensor_readings_hourly (
    sensor_id integer NOT NULL,
    hour timestamptz NOT NULL,
    count integer NOT NULL CONSTRAINT sensor_readings_hourly_count CHECK (count > 0),
    min double precision NOT NULL,
    max double precision NOT NULL,
    sum double precision NOT NULL,
    avg double precision GENERATED ALWAYS AS (sum / count) STORED,
    first_ts timestamptz NOT NULL,
    last_ts timestamptz NOT NULL,
    rolled_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sensor_readings_hourly_pkey PRIMARY KEY (sensor_id, hour),
    CONSTRAINT sensor_readings_hourly_whole_hour
        CHECK (hour = date_trunc('hour', hour, 'UTC')),
    CONSTRAINT sensor_readings_hourly_in_hour
        CHECK (first_ts >= hour AND last_ts < hour + interval '1 hour' AND first_ts <= last_ts)
);
-- Retention and city-wide questions ("readings per hour, every sensor") go by hour.
CREATE INDEX ix_sensor_readings_hourly_hour ON sensor_readings_hourly (hour);

CREATE TABLE sensor_readings_rollup_seen (
    partition oid PRIMARY KEY,
    name text NOT NULL,
    changes bigint NOT NULL,
    stats_epoch text NOT NULL,
    rolled_until timestamptz NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE_SQL = """
DROP TABLE IF EXISTS sensor_readings_rollup_seen;
DROP TABLE IF EXISTS sensor_readings_hourly;
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute(DOWNGRADE_SQL)
