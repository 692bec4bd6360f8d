"""Layer uploads: versions, upload jobs, and the columns uploaded layers need on ``layers``.

Each uploaded vector version lives in a table of its own (``upload_<layer>_v<n>``), created
by the ingestion code, not by a migration; ``layer_versions`` records it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _now() -> sa.TextClause:
    return sa.text("now()")


def upgrade() -> None:
    op.add_column("layers", sa.Column("current_version", sa.Integer(), nullable=True))
    op.add_column("layers", sa.Column("uploaded_by", sa.Text(), nullable=True))
    op.add_column("layers", sa.Column("owner_scope", sa.Text(), nullable=True))
    op.add_column("layers", sa.Column("shared", sa.Boolean(), server_default=sa.text("true"),
                                      nullable=False))
    op.add_column("layers", sa.Column("meta", postgresql.JSONB(astext_type=sa.Text()),
                                      server_default=sa.text("'{}'::jsonb"), nullable=False))
    op.create_table(
        "layer_versions",
        sa.Column("layer_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("table_name", sa.String(length=63), nullable=True),
        sa.Column("file_path", sa.Text(), nullable=True),
        sa.Column("geometry_type", sa.String(length=24), nullable=True),
        sa.Column("fields", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("bbox", postgresql.ARRAY(sa.Double()), nullable=True),
        sa.Column("feature_count", sa.BigInteger(), nullable=True),
        sa.Column("source_file_name", sa.Text(), nullable=False),
        sa.Column("source_crs", sa.Text(), nullable=False),
        sa.Column("source_datum", sa.String(length=16), nullable=False),
        sa.Column("meta", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("report", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(),
                  nullable=False),
        sa.ForeignKeyConstraint(["layer_id"], ["layers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("layer_id", "version"),
    )
    op.create_table(
        "upload_jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("layer_id", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("progress", sa.SmallInteger(), nullable=False),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("reasons", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("report", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("params", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("file_name", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(),
                  nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now(),
                  nullable=False),
        sa.CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed')",
                           name="upload_job_state"),
        sa.CheckConstraint("progress BETWEEN 0 AND 100", name="upload_job_progress"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "upload_jobs_one_active_per_layer", "upload_jobs", ["layer_id"], unique=True,
        postgresql_where=sa.text("state IN ('queued', 'running')"),
    )


def downgrade() -> None:
    op.drop_index("upload_jobs_one_active_per_layer", table_name="upload_jobs")
    op.drop_table("upload_jobs")
    op.drop_table("layer_versions")
    for column in ("meta", "shared", "owner_scope", "uploaded_by", "current_version"):
        op.drop_column("layers", column)
