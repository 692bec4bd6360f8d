"""Stored H3 counts of risk points, kept exact by triggers, for hexagon tiles.

Hexagon tiles at z5-z9 used to group 30k-120k points each (40-60 ms); reading the stored
counts of the few hundred cells a tile shows takes a millisecond or two. The triggers and the
backfill are in twin/sql/risk_point_h3_counts.sql.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import op
from geoalchemy2 import Geometry

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SQL = Path(__file__).resolve().parent.parent.parent / "sql"
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
    op.execute((SQL / "risk_point_h3_counts.sql").read_text())
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
