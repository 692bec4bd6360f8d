"""Events (issue 14): kinds with their deadlines, events located on the grid, their history,
and the deadlines the escalation worker claims.

* ``event_kinds``: what can happen, by sector, with the seconds allowed to respond, verify
  and handle (counted from the report). Seeded with a dozen kinds across the seven sectors.
  ``sector_code`` names a sector but has no foreign key: the sample loader truncates
  ``sectors`` (CASCADE) when it loads a city, which would empty this table, and the seed
  runs before any sector exists.
* ``events``: one row per event, located (grid, community, street, district codes) when it
  is written; ``version`` counts its changes (the ETag); ``links``: nearby risk points, the
  nearest teams, the plan, as found when it was reported. Its grid references
  ``admin_units``, so loading another city (TRUNCATE ... CASCADE) clears the events too.
* ``event_history``: every change (report, transition, escalation), append-only.
* ``event_deadlines``: one row per step; open ones (neither met nor fired) are found by a
  partial index on ``due_at`` and claimed with ``FOR UPDATE SKIP LOCKED``.

Writes to ``events`` bump the ``events`` layer's data version by the statement-level trigger
of migration 0001 (``twin_bump_data_version``), so tile caches stay exact and migration
0010's trigger on ``layers`` pushes a ``layer`` message. The layer row itself is registered
with the other built-in layers (layers/builtin.py, by the sample loader).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# Frozen here (no project module is imported: later code may change, this migration may not).
UPGRADE_SQL = """
CREATE TABLE event_kinds (
    code varchar(40) PRIMARY KEY,
    sector_code varchar(40) NOT NULL,
    name_zh text NOT NULL,
    name_en text NOT NULL,
    respond_s integer NOT NULL DEFAULT 60,
    verify_s integer NOT NULL DEFAULT 180,
    handle_s integer NOT NULL DEFAULT 300,
    CONSTRAINT event_kind_deadlines CHECK (0 < respond_s AND respond_s <= verify_s
                                           AND verify_s <= handle_s)
);

CREATE TABLE events (
    id bigserial PRIMARY KEY,
    kind varchar(40) NOT NULL REFERENCES event_kinds (code),
    sector_code varchar(40) NOT NULL,
    title text NOT NULL,
    description text NOT NULL,
    source varchar(10) NOT NULL,
    status varchar(10) NOT NULL DEFAULT 'reported',
    level varchar(10) NOT NULL DEFAULT 'grid',
    grid_code varchar(15) NOT NULL REFERENCES admin_units (code),
    community_code varchar(15) NOT NULL,
    street_code varchar(15) NOT NULL,
    district_code varchar(15) NOT NULL,
    geom geometry(POINT, 4326) NOT NULL,
    reported_by text NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    version integer NOT NULL DEFAULT 1,
    sensor_id bigint,
    rule_code varchar(40),
    links jsonb NOT NULL DEFAULT '{}'::jsonb,
    closed_at timestamptz,
    CONSTRAINT event_source CHECK (source IN ('report', 'rule', 'detector')),
    CONSTRAINT event_status CHECK (status IN ('reported', 'responded', 'verified', 'handled',
                                              'closed')),
    CONSTRAINT event_level CHECK (level IN ('grid', 'street', 'district', 'city'))
);
CREATE INDEX idx_events_geom ON events USING gist (geom);
CREATE INDEX events_grid_idx ON events (grid_code);
CREATE INDEX events_reported_at_idx ON events (reported_at);

CREATE TABLE event_history (
    id bigserial PRIMARY KEY,
    event_id bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    at timestamptz NOT NULL DEFAULT now(),
    action varchar(12) NOT NULL,
    from_status varchar(10),
    to_status varchar(10),
    from_level varchar(10),
    to_level varchar(10),
    step varchar(8),
    principal text,
    note text,
    version integer NOT NULL,
    CONSTRAINT event_history_action CHECK (action IN ('reported', 'raised',
                                                      'transitioned', 'escalated'))
);
CREATE INDEX event_history_event_idx ON event_history (event_id, id);

CREATE TABLE event_deadlines (
    event_id bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    step varchar(8) NOT NULL,
    due_at timestamptz NOT NULL,
    met_at timestamptz,
    fired_at timestamptz,
    PRIMARY KEY (event_id, step),
    CONSTRAINT event_deadline_step CHECK (step IN ('respond', 'verify', 'handle'))
);
CREATE INDEX event_deadlines_open_idx ON event_deadlines (due_at)
    WHERE met_at IS NULL AND fired_at IS NULL;

CREATE TRIGGER events_data_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON events FOR EACH STATEMENT EXECUTE FUNCTION twin_bump_data_version();

INSERT INTO event_kinds (code, sector_code, name_zh, name_en) VALUES
    ('fire', 'emergency_mobilisation', '火情', 'Fire'),
    ('geohazard', 'emergency_mobilisation', '地质灾害', 'Landslide or geohazard'),
    ('gas_leak', 'facility_operation', '燃气泄漏', 'Gas leak'),
    ('waterlogging', 'facility_operation', '内涝积水', 'Waterlogging'),
    ('pipe_burst', 'facility_operation', '管道爆裂', 'Pipe burst'),
    ('road_collapse', 'facility_operation', '道路塌陷', 'Road collapse'),
    ('sensor_fault', 'facility_operation', '感知设备离线', 'Sensor silent or faulty'),
    ('crowd_gathering', 'social_governance', '人员聚集', 'Crowd gathering'),
    ('public_opinion', 'party_building', '舆情事件', 'Public opinion incident'),
    ('illegal_dumping', 'civic_civility', '乱堆乱放', 'Illegal dumping'),
    ('water_pollution', 'ecology_landscape', '水体污染', 'Water pollution'),
    ('power_outage', 'production_services', '停电停水', 'Power or water outage');
"""

DOWNGRADE_SQL = """
DROP TABLE IF EXISTS event_deadlines;
DROP TABLE IF EXISTS event_history;
DROP TABLE IF EXISTS events;
DROP TABLE IF EXISTS event_kinds;
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute(DOWNGRADE_SQL)
