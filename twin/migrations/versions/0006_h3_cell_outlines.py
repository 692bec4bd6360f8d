"""H3 cell outlines in Web Mercator, so a hexagon tile is one SQL statement.

Hexagon tiles used to read the counts, build the outlines in Python and send them back in a
second query (~3 ms of Python a tile). The outlines are filled here for every cell the stored
counts hold, by tiles/outlines.py (the sample loader and the tiles fill any cell added later).
The stored counts are rewritten in the order of place (twin/sql/risk_point_h3_counts_order.sql),
so a tile's rows are read from few pages.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import op
from geoalchemy2 import Geometry

from tiles import outlines

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SQL = Path(__file__).resolve().parent.parent.parent / "sql"


def upgrade() -> None:
    op.create_table(
        "h3_cell_outlines",
        sa.Column("cell", sa.BigInteger(), nullable=False),
        sa.Column("res", sa.SmallInteger(), nullable=False),
        sa.Column("outline", Geometry(geometry_type="POLYGON", srid=3857, spatial_index=False),
                  nullable=False),
        sa.Column("centre", Geometry(geometry_type="POINT", srid=3857, spatial_index=False),
                  nullable=False),
        sa.PrimaryKeyConstraint("cell"),
    )
    outlines.store_missing(op.get_bind())
    op.execute((SQL / "risk_point_h3_counts_order.sql").read_text())
    op.execute("ANALYZE h3_cell_outlines")
    op.execute("ANALYZE risk_point_h3_counts")


def downgrade() -> None:
    op.drop_table("h3_cell_outlines")
