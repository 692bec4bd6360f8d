"""Buildings carry ``height`` and ``base_height``: the properties a map extrudes them by.

``height`` is the roof above the ground (the stored ``height_m``, generated, so it can never
disagree with it); ``base_height`` is where the extrusion starts, 0 for a building standing
on the ground (a tower on a podium, or a bridge deck, starts higher). The buildings layer
serves both in its tiles instead of ``height_m``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("buildings", sa.Column("height", sa.Double(), sa.Computed("height_m"),
                                         nullable=True))
    op.add_column("buildings", sa.Column("base_height", sa.Double(), nullable=False,
                                         server_default="0"))
    op.create_check_constraint("building_base_below_roof", "buildings",
                               "base_height >= 0 AND base_height <= height_m")


def downgrade() -> None:
    op.drop_constraint("building_base_below_roof", "buildings")
    op.drop_column("buildings", "base_height")
    op.drop_column("buildings", "height")
