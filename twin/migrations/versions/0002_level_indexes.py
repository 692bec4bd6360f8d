"""Per-level GiST indexes on admin_units; team jurisdictions by admin code.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LEVELS = ("district", "street", "community", "grid")


def upgrade() -> None:
    for level in LEVELS:
        op.create_index(
            f"admin_units_{level}_geom_idx", "admin_units", ["geom"], unique=False,
            postgresql_using="gist", postgresql_where=sa.text(f"level = '{level}'"),
        )
    op.create_index("team_jurisdictions_admin_idx", "team_jurisdictions", ["admin_code"])


def downgrade() -> None:
    op.drop_index("team_jurisdictions_admin_idx", table_name="team_jurisdictions")
    for level in LEVELS:
        op.drop_index(f"admin_units_{level}_geom_idx", table_name="admin_units")
