"""H3 cell outlines in Web Mercator, so a hexagon tile is one SQL statement.

Hexagon tiles used to read the counts, build the outlines in Python and send them back in a
second query (~3 ms of Python a tile). The outlines are filled here for every cell the stored
counts hold, by a frozen copy of what tiles/outlines.py did then (the sample loader and the
tiles fill any cell added later). The stored counts are rewritten in the order of place, so a
tile's rows are read from few pages.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from geoalchemy2 import Geometry

import h3
import numpy as np
import pyproj
import shapely

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Frozen here (not read from a file that later code may edit).
COUNTS_ORDER_SQL = """
-- Rewrites risk_point_h3_counts in the order of place (a 5-character geohash, ~5 km), so the
-- rows a hexagon tile reads lie in a few hundred pages instead of one page each (the
-- statement-level triggers insert a bulk load's rows in hash order: 2,490 pages for a
-- zoom-10 tile's 4,721 rows; 161 once ordered). Not ordered by the primary key: rows of one
-- resolution packed together make the planner prefer a primary-key range scan over the
-- tile's GiST index, which reads every cell of that resolution in the city.
CREATE TEMP TABLE risk_point_h3_counts_ordered ON COMMIT DROP AS
SELECT * FROM risk_point_h3_counts ORDER BY ST_GeoHash(anchor, 5), res, cell;
DELETE FROM risk_point_h3_counts;
INSERT INTO risk_point_h3_counts SELECT * FROM risk_point_h3_counts_ordered;
"""


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
    _store_missing_outlines(op.get_bind())
    op.execute(COUNTS_ORDER_SQL)
    op.execute("ANALYZE h3_cell_outlines")
    op.execute("ANALYZE risk_point_h3_counts")


_MISSING = sa.text("""
    SELECT DISTINCT counts.cell
      FROM risk_point_h3_counts AS counts
     WHERE NOT EXISTS (SELECT 1 FROM h3_cell_outlines AS o WHERE o.cell = counts.cell)
""")
_INSERT = sa.text("""
    INSERT INTO h3_cell_outlines (cell, res, outline, centre)
    SELECT cell, res, ST_GeomFromEWKB(outline), ST_GeomFromEWKB(centre)
      FROM unnest(CAST(:cells AS bigint[]), CAST(:resolutions AS smallint[]),
                  CAST(:outlines AS bytea[]), CAST(:centres AS bytea[]))
           AS given(cell, res, outline, centre)
        ON CONFLICT (cell) DO NOTHING
""")


def _store_missing_outlines(conn) -> None:
    """Every counted cell's outline and centre in Web Mercator (EWKB), 20,000 at a time."""
    to_mercator = pyproj.Transformer.from_crs(4326, 3857, always_xy=True)
    missing = conn.execute(_MISSING).scalars().all()
    for start in range(0, len(missing), 20_000):
        cells = sorted(missing[start:start + 20_000])
        outlines, centres = [], []
        for cell in cells:
            text_cell = h3.int_to_str(cell)
            ring = np.array(h3.cell_to_boundary(text_cell))  # (lat, lng) pairs
            xs, ys = to_mercator.transform(ring[:, 1], ring[:, 0])
            outlines.append(shapely.Polygon(np.column_stack([xs, ys])))
            lat, lng = h3.cell_to_latlng(text_cell)
            centres.append(shapely.Point(*to_mercator.transform(lng, lat)))
        conn.execute(_INSERT, {
            "cells": cells,
            "resolutions": [h3.get_resolution(h3.int_to_str(cell)) for cell in cells],
            "outlines": _ewkb(outlines),
            "centres": _ewkb(centres),
        })


def _ewkb(geometries) -> list[bytes]:
    tagged = shapely.set_srid(np.asarray(geometries, dtype=object), 3857)
    return list(shapely.to_wkb(tagged, include_srid=True))


def downgrade() -> None:
    op.drop_table("h3_cell_outlines")
