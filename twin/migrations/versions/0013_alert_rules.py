"""Alert rules on sensor readings, the alerts they open, and live pipe-anomaly zones (issue 14).

* ``alert_rules``: per sensor kind (and optionally network) either a threshold test with
  hysteresis or a silence test. Threshold: an alert opens when a reading is above
  ``open_above`` or below ``open_below``, and closes when a reading is below ``close_below``
  (and above ``close_above``, where set); readings between the two bounds leave the state as
  it is, so a value hovering at the limit does not open and close alerts on every reading.
  Silence: an alert opens when the sensor's newest reading is ``silent_minutes`` old, and
  closes when a newer reading arrives. ``event_kind``: the kind of the event an opened alert
  raises (migration 0012).
* ``sensor_alerts``: one row per alert; at most one open alert per sensor and rule (a partial
  unique index), so concurrent ingest transactions cannot open the same alert twice.
* ``anomaly_zones``: the zones of the pipe-anomaly detector run incrementally
  (twin/live/detectors.py), matched run to run; ``closed_at`` set once the anomaly is over.

Seeded thresholds (the sample's sensors, data_samples/sensors.py): methane above 25 ppm
(closes below 20; the usual 2-12 ppm), manhole level above 1.5 m (closes below 1.2; the usual
0.15-0.8 m), drainage flow above 2.0 m3/s (closes below 1.6), water pressure below 0.15 MPa
(a burst main; closes above 0.18; the usual 0.25-0.5 MPa); every kind silent for 30 minutes
(six missed 5-minute readings).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# Frozen here (no project module is imported: later code may change, this migration may not).
UPGRADE_SQL = """
CREATE TABLE alert_rules (
    code varchar(40) PRIMARY KEY,
    sensor_kind varchar(10) NOT NULL,
    network varchar(10),
    name_zh text NOT NULL,
    name_en text NOT NULL,
    open_above double precision,
    open_below double precision,
    close_above double precision,
    close_below double precision,
    silent_minutes integer,
    event_kind varchar(40) REFERENCES event_kinds (code),
    enabled boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT alert_rule_sensor_kind CHECK (sensor_kind IN ('level', 'flow', 'pressure', 'gas')),
    CONSTRAINT alert_rule_network CHECK (network IS NULL
                                         OR network IN ('drainage', 'water', 'gas')),
    -- Either a threshold test or a silence test.
    CONSTRAINT alert_rule_test CHECK ((silent_minutes IS NULL)
                                      = (num_nonnulls(open_above, open_below) > 0)),
    CONSTRAINT alert_rule_silence CHECK (silent_minutes IS NULL OR silent_minutes > 0),
    -- Each open bound has its close bound on the safe side of it (hysteresis).
    CONSTRAINT alert_rule_hysteresis CHECK (
        (open_above IS NULL) = (close_below IS NULL)
        AND (open_below IS NULL) = (close_above IS NULL)
        AND (open_above IS NULL OR close_below <= open_above)
        AND (open_below IS NULL OR close_above >= open_below)
        AND (close_above IS NULL OR close_below IS NULL OR close_above < close_below))
);

CREATE TABLE sensor_alerts (
    id bigserial PRIMARY KEY,
    sensor_id integer NOT NULL REFERENCES sensors (id) ON DELETE CASCADE,
    rule_code varchar(40) NOT NULL REFERENCES alert_rules (code) ON UPDATE CASCADE,
    opened_at timestamptz NOT NULL,
    opened_value double precision,
    closed_at timestamptz,
    closed_value double precision,
    event_id bigint REFERENCES events (id) ON DELETE SET NULL,
    CONSTRAINT sensor_alert_closes_after CHECK (closed_at IS NULL OR closed_at >= opened_at)
);
CREATE UNIQUE INDEX sensor_alerts_one_open ON sensor_alerts (sensor_id, rule_code)
    WHERE closed_at IS NULL;
CREATE INDEX sensor_alerts_opened_idx ON sensor_alerts (opened_at);

CREATE TABLE anomaly_zones (
    id bigserial PRIMARY KEY,
    network varchar(10) NOT NULL,
    geom geometry(MULTIPOLYGON, 4326) NOT NULL,
    sensors integer[] NOT NULL,
    segments bigint[] NOT NULL,
    source_segment_id bigint NOT NULL,
    severity double precision NOT NULL,
    details jsonb NOT NULL DEFAULT '{}'::jsonb,
    started_at timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    opened_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    closed_at timestamptz,
    event_id bigint REFERENCES events (id) ON DELETE SET NULL,
    CONSTRAINT anomaly_zone_network CHECK (network IN ('drainage', 'water', 'gas'))
);
CREATE INDEX idx_anomaly_zones_geom ON anomaly_zones USING gist (geom);
CREATE INDEX anomaly_zones_live_idx ON anomaly_zones (network) WHERE closed_at IS NULL;

INSERT INTO alert_rules (code, sensor_kind, network, name_zh, name_en, open_above, open_below,
                         close_above, close_below, silent_minutes, event_kind) VALUES
    ('gas_high', 'gas', 'gas', '燃气浓度超限', 'Methane concentration high',
     25, NULL, NULL, 20, NULL, 'gas_leak'),
    ('level_high', 'level', 'drainage', '井下液位超限', 'Manhole water level high',
     1.5, NULL, NULL, 1.2, NULL, 'waterlogging'),
    ('flow_high', 'flow', 'drainage', '排水流量超限', 'Drainage flow high',
     2.0, NULL, NULL, 1.6, NULL, 'waterlogging'),
    ('pressure_low', 'pressure', 'water', '供水压力过低', 'Water pressure low (burst main)',
     NULL, 0.15, 0.18, NULL, NULL, 'pipe_burst'),
    ('gas_silent', 'gas', NULL, '燃气探测器离线', 'Methane detector silent',
     NULL, NULL, NULL, NULL, 30, 'sensor_fault'),
    ('level_silent', 'level', NULL, '液位计离线', 'Level gauge silent',
     NULL, NULL, NULL, NULL, 30, 'sensor_fault'),
    ('flow_silent', 'flow', NULL, '流量计离线', 'Flow meter silent',
     NULL, NULL, NULL, NULL, 30, 'sensor_fault'),
    ('pressure_silent', 'pressure', NULL, '压力计离线', 'Pressure gauge silent',
     NULL, NULL, NULL, NULL, 30, 'sensor_fault');
"""

DOWNGRADE_SQL = """
DROP TABLE IF EXISTS anomaly_zones;
DROP TABLE IF EXISTS sensor_alerts;
DROP TABLE IF EXISTS alert_rules;
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute(DOWNGRADE_SQL)
