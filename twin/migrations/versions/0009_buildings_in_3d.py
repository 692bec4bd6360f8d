"""Buildings in 3D (issue 13): roof form, street, and surfaces of their own.

* ``roof_type`` (flat, gable, hip): the CIM3 roof form the 3D tiles build over the footprint's
  oriented rectangle. Existing rows are flat, the form a block already has.
* ``street_code``: the street/town the building stands in, a property of every building in
  its 3D tiles. A row inserted or moved without one gets it from the street polygon under its
  footprint (a trigger, so writes through SQL and through the API agree).
* ``surfaces``: a building's own LOD2 surfaces (absolute heights, metres above the
  ellipsoid), as a CityJSON upload brings them; NULL for a building drawn from its footprint.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# Frozen here (no project module is imported: later code may change, this migration may not).
UPGRADE_SQL = """
ALTER TABLE buildings
    ADD COLUMN roof_type varchar(8) NOT NULL DEFAULT 'flat'
        CONSTRAINT building_roof_type CHECK (roof_type IN ('flat', 'gable', 'hip')),
    ADD COLUMN street_code varchar(15) REFERENCES admin_units (code),
    ADD COLUMN surfaces geometry(MultiPolygonZ, 4326);

CREATE FUNCTION twin_building_street() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A street given with the row wins; a moved footprint keeps a street only if the
    -- writer set it in the same statement.
    IF NEW.street_code IS NULL
            OR (TG_OP = 'UPDATE' AND NEW.geom IS DISTINCT FROM OLD.geom
                AND NEW.street_code IS NOT DISTINCT FROM OLD.street_code) THEN
        SELECT code INTO NEW.street_code FROM admin_units
         WHERE level = 'street' AND ST_Intersects(geom, ST_PointOnSurface(NEW.geom))
         ORDER BY code LIMIT 1;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER buildings_street BEFORE INSERT OR UPDATE ON buildings
    FOR EACH ROW EXECUTE FUNCTION twin_building_street();
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS buildings_street ON buildings")
    op.execute("DROP FUNCTION IF EXISTS twin_building_street()")
    op.execute("ALTER TABLE buildings DROP COLUMN surfaces, DROP COLUMN street_code, "
               "DROP COLUMN roof_type")
