"""Readings in day partitions (issue 14), the latest reading per sensor, and dead letters.

``sensor_readings`` becomes a native RANGE-partitioned table on ``ts``, one partition per UTC
day, made ahead and dropped past retention by pg_partman 4.7 (the Debian package
postgresql-15-partman; twin/live/partitions.py runs its maintenance). The primary key
(sensor_id, ts) stays: it is what makes a retried batch idempotent (INSERT ... ON CONFLICT).
A BRIN index on ts serves time-window reads at a few pages per partition.

Deliberately gone: the foreign key to ``sensors`` (a foreign key is checked by a per-row
trigger; the ingest checks the sensor ids of a batch with one query instead). No per-row
trigger of any kind is on the table.

A reading older than every partition (a gateway replaying last month) lands in the default
partition ``sensor_readings_default``: stored, never lost. ``twin_readings_make_partitions``
makes the day partitions of a past range and moves the rows the default partition holds for
those days into them (PostgreSQL refuses to attach a partition whose rows sit in the default).

``sensor_latest``: the newest reading of each sensor, upserted by the ingest in the batch's
own transaction (a newer ts wins; an older reading arriving late leaves it alone).

``reading_dead_letters``: what MQTT (or HTTP) delivered that could not be stored, with the
reason: malformed or oversized payloads, rejected rows (twin/live/mqtt.py writes them).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# Frozen here (no project module is imported: later code may change, this migration may not).
# Partition bounds are UTC days: the session time zone is set to UTC around every partman call
# (partman names and bounds children in the session's zone).
UPGRADE_SQL = r"""
CREATE SCHEMA IF NOT EXISTS partman;
CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman;

SELECT set_config('twin.tz_before_0011', current_setting('TimeZone'), true);
SELECT set_config('TimeZone', 'UTC', true);

ALTER TABLE sensor_readings RENAME TO sensor_readings_before_0011;
ALTER TABLE sensor_readings_before_0011 RENAME CONSTRAINT sensor_readings_pkey
    TO sensor_readings_before_0011_pkey;
ALTER TABLE sensor_readings_before_0011 DROP CONSTRAINT IF EXISTS sensor_readings_sensor_id_fkey;

CREATE TABLE sensor_readings (
    sensor_id integer NOT NULL,
    ts timestamptz NOT NULL,
    value double precision NOT NULL,
    CONSTRAINT sensor_readings_pkey PRIMARY KEY (sensor_id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX ix_sensor_readings_ts_brin ON sensor_readings USING brin (ts);

-- The first partition: the day of the oldest reading kept so far, else today.
SELECT partman.create_parent(
    p_parent_table := 'public.sensor_readings',
    p_control := 'ts',
    p_type := 'native',
    p_interval := 'daily',
    p_premake := 7,
    p_start_partition := (SELECT to_char(coalesce(date_trunc('day', min(ts)),
                                                  date_trunc('day', now())),
                                         'YYYY-MM-DD HH24:MI:SSOF')
                            FROM sensor_readings_before_0011),
    p_jobmon := false);
-- Partitions ahead of time even when no reading came in for a while; retention drops the
-- tables (not only detaches them). twin/live/partitions.py sets premake and retention.
UPDATE partman.part_config
   SET infinite_time_partitions = true, retention_keep_table = false,
       retention_keep_index = false
 WHERE parent_table = 'public.sensor_readings';

INSERT INTO sensor_readings (sensor_id, ts, value)
SELECT sensor_id, ts, value FROM sensor_readings_before_0011;
DROP TABLE sensor_readings_before_0011;

SELECT set_config('TimeZone', current_setting('twin.tz_before_0011'), true);

-- Day partitions [p_from, p_to] (UTC days) of sensor_readings that do not exist yet, with
-- the rows the default partition holds for those days moved into them; the number made.
-- Called by the sample loader before its COPY and by anyone replaying old readings.
CREATE FUNCTION twin_readings_make_partitions(p_from timestamptz, p_to timestamptz)
RETURNS integer
LANGUAGE plpgsql
SET TimeZone = 'UTC'
AS $fn$
DECLARE
    day timestamptz;
    made integer := 0;
    held bigint;
BEGIN
    IF p_to - p_from > interval '3660 days' THEN
        RAISE EXCEPTION 'twin_readings_make_partitions: at most 3660 days at once, asked % to %',
            p_from, p_to;
    END IF;
    FOR day IN SELECT generate_series(date_trunc('day', p_from), p_to, interval '1 day') LOOP
        IF (partman.show_partition_name('public.sensor_readings', day::text)).table_exists THEN
            CONTINUE;
        END IF;
        CREATE TEMP TABLE IF NOT EXISTS twin_readings_moving
            (sensor_id integer, ts timestamptz, value double precision) ON COMMIT DROP;
        WITH moved AS (
            DELETE FROM sensor_readings_default
             WHERE ts >= day AND ts < day + interval '1 day'
            RETURNING sensor_id, ts, value)
        INSERT INTO twin_readings_moving SELECT * FROM moved;
        GET DIAGNOSTICS held = ROW_COUNT;
        PERFORM partman.create_partition_time('public.sensor_readings', ARRAY[day], false);
        IF held > 0 THEN
            INSERT INTO sensor_readings SELECT * FROM twin_readings_moving;
            TRUNCATE twin_readings_moving;
        END IF;
        made := made + 1;
    END LOOP;
    RETURN made;
END
$fn$;

CREATE TABLE sensor_latest (
    sensor_id integer PRIMARY KEY REFERENCES sensors (id) ON DELETE CASCADE,
    ts timestamptz NOT NULL,
    value double precision NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO sensor_latest (sensor_id, ts, value)
SELECT DISTINCT ON (r.sensor_id) r.sensor_id, r.ts, r.value
  FROM sensor_readings AS r JOIN sensors AS s ON s.id = r.sensor_id
 ORDER BY r.sensor_id, r.ts DESC;

CREATE TABLE reading_dead_letters (
    id bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    source varchar(8) NOT NULL,
    topic text,
    payload bytea,
    reason text NOT NULL,
    CONSTRAINT reading_dead_letters_source CHECK (source IN ('mqtt', 'http'))
);
CREATE INDEX ix_reading_dead_letters_received_at ON reading_dead_letters (received_at);
"""

DOWNGRADE_SQL = r"""
DROP TABLE reading_dead_letters;
DROP TABLE sensor_latest;
DROP FUNCTION twin_readings_make_partitions(timestamptz, timestamptz);

CREATE TABLE sensor_readings_flat (
    sensor_id integer NOT NULL,
    ts timestamptz NOT NULL,
    value double precision NOT NULL
);
INSERT INTO sensor_readings_flat
SELECT r.sensor_id, r.ts, r.value FROM sensor_readings AS r
 WHERE EXISTS (SELECT 1 FROM sensors AS s WHERE s.id = r.sensor_id);
DELETE FROM partman.part_config WHERE parent_table = 'public.sensor_readings';
DROP TABLE sensor_readings CASCADE;
DROP TABLE IF EXISTS partman.template_public_sensor_readings;
ALTER TABLE sensor_readings_flat RENAME TO sensor_readings;
ALTER TABLE sensor_readings ADD CONSTRAINT sensor_readings_pkey PRIMARY KEY (sensor_id, ts);
ALTER TABLE sensor_readings ADD CONSTRAINT sensor_readings_sensor_id_fkey
    FOREIGN KEY (sensor_id) REFERENCES sensors (id);

DROP EXTENSION IF EXISTS pg_partman;
DROP SCHEMA IF EXISTS partman CASCADE;
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute(DOWNGRADE_SQL)
