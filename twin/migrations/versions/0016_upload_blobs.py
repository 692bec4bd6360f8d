"""Uploaded versions' files in the database, and old versions dropped after a grace (issue 15).

Every twin node has a TWIN_HOME of its own, so a file one node wrote (a version's COG, its 3D
model) is kept where every node reads it: the database. layers/blobs.py stores a version's
files in its publishing transaction and each node fetches them into its own uploads folder on
first use.

``upload_blobs``: one row per distinct content, keyed by its SHA-256 (the same file published
twice is stored once). ``upload_blob_chunks``: the content in rows of at most 1 MiB of bytea,
in order (``seq`` from 0). Chunked bytea, not large objects: rows are deleted with their blob
(ON DELETE CASCADE; a large object outlives a deleted row unless every path calls
lo_unlink), stream in bounded memory with plain SELECTs on any connection (large objects need
a transaction per read and their own permissions), and travel with the rows through streaming
replication and pg_dump like any table. STORAGE EXTERNAL: a COG or a GLB is compressed
already, so TOAST stores the chunks out of line without trying to compress them again.

``upload_files``: which file of which version is which blob, by its path relative to the
version's folder (``layers/<layer>/v<n>/``). No foreign key to ``layer_versions``: a deleted
layer's versions go at once, their files only after the grace.

``upload_drops``: versions superseded (a newer one or a rollback published) or of a deleted
layer, with the time their table and files may go (``drop_after``); a periodic pass in one
process drops them and records ``dropped_at``. The row stays as a tombstone, so a rollback to
a dropped version is refused with a reason. A deleted layer's rows here and in
``upload_files`` move to the id ``<layer>~<token>`` (its tables are renamed alike), so the id
is free at once for a new layer.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

# Frozen here (no project module is imported: later code may change, this migration may not).
UPGRADE_SQL = """
CREATE TABLE upload_blobs (
    sha256 bytea PRIMARY KEY CHECK (length(sha256) = 32),
    size bigint NOT NULL CHECK (size >= 0),
    chunks integer NOT NULL CHECK (chunks >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE upload_blob_chunks (
    sha256 bytea NOT NULL REFERENCES upload_blobs (sha256) ON DELETE CASCADE,
    seq integer NOT NULL CHECK (seq >= 0),
    data bytea NOT NULL,
    PRIMARY KEY (sha256, seq)
);
ALTER TABLE upload_blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE upload_files (
    layer_id varchar(64) NOT NULL,
    version integer NOT NULL,
    path text NOT NULL CHECK (path <> '' AND path NOT LIKE '/%' AND path NOT LIKE '%..%'),
    sha256 bytea NOT NULL REFERENCES upload_blobs (sha256),
    size bigint NOT NULL,
    PRIMARY KEY (layer_id, version, path)
);
CREATE INDEX upload_files_sha256 ON upload_files (sha256);

CREATE TABLE upload_drops (
    layer_id varchar(64) NOT NULL,
    version integer NOT NULL,
    table_name text,
    drop_after timestamptz NOT NULL,
    dropped_at timestamptz,
    PRIMARY KEY (layer_id, version)
);
CREATE INDEX upload_drops_due ON upload_drops (drop_after) WHERE dropped_at IS NULL;
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS upload_drops, upload_files, upload_blob_chunks, "
               "upload_blobs")
