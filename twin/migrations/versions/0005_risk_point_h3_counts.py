"""Stored H3 counts of risk points, kept exact by triggers, for hexagon tiles.

Hexagon tiles at z5-z9 used to group 30k-120k points each (40-60 ms); reading the stored
counts of the few hundred cells a tile shows takes a millisecond or two. The triggers and the
backfill are in H3_COUNTS_SQL below.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from geoalchemy2 import Geometry

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Frozen here (not read from a file that later code may edit).
H3_COUNTS_SQL = """
-- Exact risk-point counts per (H3 resolution, cell, sector, level) for hexagon tiles.
-- Statement-level triggers read the rows a statement wrote from its transition tables
-- (old_points, new_points), so a bulk COPY or UPDATE costs one grouped pass, not one per row.
-- An UPDATE subtracts its old rows and then adds its new ones, so a count never goes below 0
-- on the way (the CHECK would refuse it); counts that reach 0 are deleted at the end.

CREATE OR REPLACE FUNCTION twin_risk_point_h3_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- plpgsql plans each statement when it first runs, so a branch may name a transition
    -- table its event does not have.
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE risk_point_h3_counts AS c
           SET n = c.n - gone.n
          FROM (SELECT r.res, r.cell, p.sector_code, p.level, count(*)::int AS n
                  FROM old_points AS p
                 CROSS JOIN LATERAL (VALUES (3, p.h3_r3), (4, p.h3_r4), (5, p.h3_r5),
                                            (6, p.h3_r6), (7, p.h3_r7), (8, p.h3_r8),
                                            (9, p.h3_r9)) AS r(res, cell)
                 GROUP BY 1, 2, 3, 4) AS gone
         WHERE c.res = gone.res AND c.cell = gone.cell AND c.sector_code = gone.sector_code
           AND c.level = gone.level;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO risk_point_h3_counts AS c (res, cell, sector_code, level, n, anchor)
        SELECT r.res, r.cell, p.sector_code, p.level, count(*)::int, (array_agg(p.geom))[1]
          FROM new_points AS p
         CROSS JOIN LATERAL (VALUES (3, p.h3_r3), (4, p.h3_r4), (5, p.h3_r5), (6, p.h3_r6),
                                    (7, p.h3_r7), (8, p.h3_r8), (9, p.h3_r9)) AS r(res, cell)
         GROUP BY 1, 2, 3, 4
            ON CONFLICT (res, cell, sector_code, level) DO UPDATE SET n = c.n + EXCLUDED.n;
    END IF;
    DELETE FROM risk_point_h3_counts WHERE n = 0;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION twin_risk_point_h3_counts_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE risk_point_h3_counts;
    RETURN NULL;
END
$$;

-- A trigger with transition tables serves one event, hence three.
CREATE TRIGGER risk_points_h3_counts_insert AFTER INSERT ON risk_points
    REFERENCING NEW TABLE AS new_points
    FOR EACH STATEMENT EXECUTE FUNCTION twin_risk_point_h3_counts();
CREATE TRIGGER risk_points_h3_counts_update AFTER UPDATE ON risk_points
    REFERENCING OLD TABLE AS old_points NEW TABLE AS new_points
    FOR EACH STATEMENT EXECUTE FUNCTION twin_risk_point_h3_counts();
CREATE TRIGGER risk_points_h3_counts_delete AFTER DELETE ON risk_points
    REFERENCING OLD TABLE AS old_points
    FOR EACH STATEMENT EXECUTE FUNCTION twin_risk_point_h3_counts();
CREATE TRIGGER risk_points_h3_counts_truncate AFTER TRUNCATE ON risk_points
    FOR EACH STATEMENT EXECUTE FUNCTION twin_risk_point_h3_counts_truncate();

-- The points already there.
INSERT INTO risk_point_h3_counts (res, cell, sector_code, level, n, anchor)
SELECT r.res, r.cell, p.sector_code, p.level, count(*)::int, (array_agg(p.geom))[1]
  FROM risk_points AS p
 CROSS JOIN LATERAL (VALUES (3, p.h3_r3), (4, p.h3_r4), (5, p.h3_r5), (6, p.h3_r6),
                            (7, p.h3_r7), (8, p.h3_r8), (9, p.h3_r9)) AS r(res, cell)
 GROUP BY 1, 2, 3, 4;
"""
RESOLUTIONS = range(3, 10)


def upgrade() -> None:
    op.create_table(
        "risk_point_h3_counts",
        sa.Column("res", sa.SmallInteger(), nullable=False),
        sa.Column("cell", sa.BigInteger(), nullable=False),
        sa.Column("sector_code", sa.String(length=40), nullable=False),
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("anchor", Geometry(geometry_type="POINT", srid=4326, spatial_index=False),
                  nullable=False),
        sa.CheckConstraint("n >= 0", name="h3_count_not_negative"),
        sa.PrimaryKeyConstraint("res", "cell", "sector_code", "level"),
    )
    op.execute(H3_COUNTS_SQL)
    for res in RESOLUTIONS:
        op.create_index(f"risk_point_h3_counts_r{res}_anchor_idx", "risk_point_h3_counts",
                        ["anchor"], postgresql_using="gist",
                        postgresql_where=sa.text(f"res = {res}"))
    op.create_index("risk_point_h3_counts_empty_idx", "risk_point_h3_counts", ["res"],
                    postgresql_where=sa.text("n = 0"))
    op.execute("ANALYZE risk_point_h3_counts")


def downgrade() -> None:
    for event in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER IF EXISTS risk_points_h3_counts_{event} ON risk_points")
    op.execute("DROP FUNCTION IF EXISTS twin_risk_point_h3_counts()")
    op.execute("DROP FUNCTION IF EXISTS twin_risk_point_h3_counts_truncate()")
    op.drop_table("risk_point_h3_counts")
