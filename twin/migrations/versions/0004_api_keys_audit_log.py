"""API keys (stored hashed) and the audit log of writes.

``api_keys`` holds only a lookup prefix and the SHA-256 of each key: the key itself is
shown once by ``twin keys add`` and never stored. ``audit_log`` records every write
request (who, when, what, outcome), refused and failed ones included.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ROLES = "role IN ('viewer', 'planner', 'gis-editor', 'admin')"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(ROLES, name="api_key_role"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("api_keys_prefix", "api_keys", ["prefix"], unique=True)
    op.create_index("api_keys_active_name", "api_keys", ["name"], unique=True,
                    postgresql_where=sa.text("revoked_at IS NULL"))
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("principal", sa.Text(), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=True),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=8), nullable=False),
        sa.Column("detail", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.CheckConstraint("outcome IN ('ok', 'refused', 'failed')", name="audit_outcome"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("audit_log_at", "audit_log", ["at"])
    op.create_index("audit_log_principal_at", "audit_log", ["principal", "at"])


def downgrade() -> None:
    op.drop_index("audit_log_principal_at", table_name="audit_log")
    op.drop_index("audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index("api_keys_active_name", table_name="api_keys")
    op.drop_index("api_keys_prefix", table_name="api_keys")
    op.drop_table("api_keys")
