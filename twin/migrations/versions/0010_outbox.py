"""The outbox of pushed messages (issue 14), and short-lived tickets for the push stream.

Every change a map must hear about (an alert, an event's change, a layer's new data version)
is written to ``outbox`` in the same transaction as the change itself, and announced on the
``twin_outbox`` channel. Each server process LISTENs there once and fans the rows out to its
Server-Sent Events clients (twin/live/fanout.py); a reconnecting client asks for every row
after the last id it saw.

Ids are handed out in commit order, so "every row after id N" never skips a row that
committed late: a writer takes the transaction-level advisory lock ``OUTBOX_LOCK`` before it
takes an id, and holds it until its commit is visible (PostgreSQL releases a transaction's
locks after its commit is recorded and visible). Writers therefore write the outbox row last,
just before they commit (twin/core/outbox.py).

``area_codes``: the admin codes the message belongs to (an event's grid code; an unshared
upload's owner scope); NULL is everyone's. A principal receives the row when one of its
scope codes and one of the row's codes is a prefix of the other (twin/core/scope.py,
``scopes_overlap``).

Layer data versions: a deferred constraint trigger on ``layers`` writes one ``layer`` row per
changed layer per transaction at commit, with the final version.

``stream_tickets``: EventSource cannot send an Authorization header, so a client trades its
key or token for a ticket (a random string, stored hashed) that the stream URL carries.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# Frozen here (no project module is imported: later code may change, this migration may not).
# 7013 ('twin' outbox): the advisory lock id twin/core/outbox.py takes too.
UPGRADE_SQL = """
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    kind varchar(16) NOT NULL,
    area_codes text[],
    payload jsonb NOT NULL,
    txid bigint NOT NULL DEFAULT txid_current()
);
CREATE INDEX outbox_created_idx ON outbox USING brin (created_at);
CREATE INDEX outbox_txid_idx ON outbox (txid);

CREATE TABLE stream_tickets (
    ticket_hash bytea PRIMARY KEY,
    principal text NOT NULL,
    role varchar(16) NOT NULL,
    scope text NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX stream_tickets_expiry_idx ON stream_tickets (expires_at);

CREATE OR REPLACE FUNCTION twin_outbox_layer_version() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row_now layers%ROWTYPE;
    codes text[];
BEGIN
    -- Deferred to commit: read the layer as it ends up, once per layer and transaction.
    SELECT * INTO row_now FROM layers WHERE id = NEW.id;
    IF EXISTS (SELECT 1 FROM outbox WHERE txid = txid_current() AND kind = 'layer'
                                      AND payload->>'id' = NEW.id) THEN
        RETURN NULL;
    END IF;
    IF row_now.id IS NOT NULL AND row_now.shared IS FALSE AND row_now.owner_scope IS NOT NULL
            AND row_now.owner_scope <> '' THEN
        codes := string_to_array(row_now.owner_scope, ',');
    END IF;
    PERFORM pg_advisory_xact_lock(7013);
    INSERT INTO outbox (kind, area_codes, payload)
    VALUES ('layer', codes,
            jsonb_build_object('id', NEW.id,
                               'data_version', row_now.data_version,
                               'deleted', row_now.id IS NULL));
    PERFORM pg_notify('twin_outbox', '');
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER layers_outbox AFTER INSERT OR UPDATE ON layers
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION twin_outbox_layer_version();

CREATE OR REPLACE FUNCTION twin_outbox_layer_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7013);
    INSERT INTO outbox (kind, area_codes, payload)
    VALUES ('layer', NULL, jsonb_build_object('id', OLD.id, 'data_version', NULL,
                                              'deleted', true));
    PERFORM pg_notify('twin_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER layers_outbox_deleted AFTER DELETE ON layers
    FOR EACH ROW EXECUTE FUNCTION twin_outbox_layer_deleted();
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS layers_outbox_deleted ON layers")
    op.execute("DROP TRIGGER IF EXISTS layers_outbox ON layers")
    op.execute("DROP FUNCTION IF EXISTS twin_outbox_layer_deleted()")
    op.execute("DROP FUNCTION IF EXISTS twin_outbox_layer_version()")
    op.execute("DROP TABLE IF EXISTS stream_tickets")
    op.execute("DROP TABLE IF EXISTS outbox")
