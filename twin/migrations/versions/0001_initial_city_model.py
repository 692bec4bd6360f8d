"""initial city model

Creates the PostGIS and pgRouting extensions, every table of twin.models, and the
triggers that keep each layer's data_version current.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from geoalchemy2 import Geometry
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen here (not read from a file that later code may edit).
LAYER_DATA_VERSION_SQL = """
-- Every write to a layer's table bumps the layer's data_version in the same transaction,
-- so a tile cache keyed by (layer, data_version) is exact without TTLs or purges.
CREATE OR REPLACE FUNCTION twin_bump_data_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE layers
       SET data_version = data_version + 1, updated_at = now()
     WHERE source_table = TG_TABLE_NAME;
    RETURN NULL;
END
$$;
"""
# Tables that back built-in layers; uploads register their own tables later.
VERSIONED_TABLES = (
    "admin_units",
    "risk_points",
    "response_teams",
    "supply_depots",
    "road_edges",
    "pipe_nodes",
    "pipe_segments",
    "sensors",
    "hazard_sources",
    "buildings",
)


def create_version_triggers() -> None:
    op.execute(LAYER_DATA_VERSION_SQL)
    for table in VERSIONED_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_data_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
            f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION twin_bump_data_version()"
        )


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    op.execute("CREATE EXTENSION IF NOT EXISTS pgrouting")
    op.create_geospatial_table(
        "admin_units",
        sa.Column("code", sa.String(length=15), nullable=False),
        sa.Column("level", sa.String(length=10), nullable=False),
        sa.Column("parent_code", sa.String(length=15), nullable=True),
        sa.Column("name_zh", sa.Text(), nullable=False),
        sa.Column("name_en", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("population", sa.Integer(), nullable=False),
        sa.Column("area_km2", sa.Double(), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="MULTIPOLYGON",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.CheckConstraint(
            "length(code) = CASE level WHEN 'street' THEN 9 WHEN 'community' THEN 12 WHEN 'grid' THEN 15 ELSE 6 END AND code ~ '^[0-9]+$'",
            name="admin_code_length",
        ),
        sa.CheckConstraint(
            "level IN ('city', 'district', 'street', 'community', 'grid')", name="admin_level_known"
        ),
        sa.ForeignKeyConstraint(
            ["parent_code"],
            ["admin_units.code"],
        ),
        sa.PrimaryKeyConstraint("code"),
    )
    op.create_index("admin_units_level_idx", "admin_units", ["level"], unique=False)
    op.create_index("admin_units_parent_idx", "admin_units", ["parent_code"], unique=False)
    op.create_geospatial_index(
        "idx_admin_units_geom",
        "admin_units",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_table(
        "dataset_loads",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("row_count", sa.BigInteger(), nullable=False),
        sa.Column(
            "loaded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "layers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("title_zh", sa.Text(), nullable=False),
        sa.Column("title_en", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("geometry_type", sa.String(length=24), nullable=True),
        sa.Column("source_table", sa.String(length=63), nullable=True),
        sa.Column("source_filter", sa.Text(), nullable=True),
        sa.Column("fields", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("bbox", postgresql.ARRAY(sa.Double()), nullable=True),
        sa.Column("source_crs", sa.String(length=32), nullable=False),
        sa.Column("source_datum", sa.String(length=16), nullable=False),
        sa.Column("file_path", sa.Text(), nullable=True),
        sa.Column("min_zoom", sa.SmallInteger(), nullable=False),
        sa.Column("max_zoom", sa.SmallInteger(), nullable=False),
        sa.Column("origin", sa.String(length=8), nullable=False),
        sa.Column("data_version", sa.BigInteger(), server_default="1", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("kind IN ('vector', 'raster', '3d')", name="layer_kind"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("layers_source_table_idx", "layers", ["source_table"], unique=False)
    op.create_geospatial_table(
        "pipe_nodes",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("code", sa.String(length=24), nullable=False),
        sa.Column("network", sa.String(length=10), nullable=False),
        sa.Column("kind", sa.String(length=12), nullable=False),
        sa.Column("ground_elev_m", sa.Double(), nullable=False),
        sa.Column("invert_elev_m", sa.Double(), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="POINT",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.CheckConstraint("network IN ('drainage', 'water', 'gas')", name="pipe_node_network"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_geospatial_index(
        "idx_pipe_nodes_geom",
        "pipe_nodes",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_geospatial_table(
        "road_nodes",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="POINT",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_geospatial_index(
        "idx_road_nodes_geom",
        "road_nodes",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_table(
        "sectors",
        sa.Column("code", sa.String(length=40), nullable=False),
        sa.Column("name_zh", sa.Text(), nullable=False),
        sa.Column("name_en", sa.Text(), nullable=False),
        sa.Column("sort_order", sa.SmallInteger(), nullable=False),
        sa.PrimaryKeyConstraint("code"),
    )
    op.create_geospatial_table(
        "buildings",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("use", sa.String(length=16), nullable=False),
        sa.Column("height_m", sa.Double(), nullable=False),
        sa.Column("floors", sa.SmallInteger(), nullable=False),
        sa.Column("cim_level", sa.SmallInteger(), nullable=False),
        sa.Column("district_code", sa.String(length=15), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="POLYGON",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.CheckConstraint("cim_level BETWEEN 1 AND 6", name="building_cim_level"),
        sa.ForeignKeyConstraint(
            ["district_code"],
            ["admin_units.code"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_geospatial_index(
        "idx_buildings_geom",
        "buildings",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_table(
        "emergency_plans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("title_zh", sa.Text(), nullable=False),
        sa.Column("title_en", sa.Text(), nullable=False),
        sa.Column("sector_code", sa.String(length=40), nullable=False),
        sa.Column("response_level", sa.SmallInteger(), nullable=False),
        sa.Column("issuer_code", sa.String(length=15), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["issuer_code"],
            ["admin_units.code"],
        ),
        sa.ForeignKeyConstraint(
            ["sector_code"],
            ["sectors.code"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_geospatial_table(
        "hazard_sources",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=24), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("node_id", sa.BigInteger(), nullable=True),
        sa.Column("gas_threshold_ppm", sa.Double(), nullable=False),
        sa.Column("level_threshold_m", sa.Double(), nullable=False),
        sa.Column("temp_threshold_c", sa.Double(), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="POINT",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["pipe_nodes.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_geospatial_index(
        "idx_hazard_sources_geom",
        "hazard_sources",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_geospatial_table(
        "pipe_segments",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("code", sa.String(length=24), nullable=False),
        sa.Column("network", sa.String(length=10), nullable=False),
        sa.Column("from_node", sa.BigInteger(), nullable=False),
        sa.Column("to_node", sa.BigInteger(), nullable=False),
        sa.Column("diameter_mm", sa.SmallInteger(), nullable=False),
        sa.Column("material", sa.String(length=16), nullable=False),
        sa.Column("install_year", sa.SmallInteger(), nullable=False),
        sa.Column("length_m", sa.Double(), nullable=False),
        sa.Column("flow_direction", sa.String(length=10), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="LINESTRING",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.CheckConstraint("network IN ('drainage', 'water', 'gas')", name="pipe_segment_network"),
        sa.ForeignKeyConstraint(
            ["from_node"],
            ["pipe_nodes.id"],
        ),
        sa.ForeignKeyConstraint(
            ["to_node"],
            ["pipe_nodes.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_geospatial_index(
        "idx_pipe_segments_geom",
        "pipe_segments",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_index("pipe_segments_from_idx", "pipe_segments", ["from_node"], unique=False)
    op.create_index("pipe_segments_to_idx", "pipe_segments", ["to_node"], unique=False)
    op.create_geospatial_table(
        "response_teams",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=24), nullable=False),
        sa.Column("name_zh", sa.Text(), nullable=False),
        sa.Column("name_en", sa.Text(), nullable=False),
        sa.Column("team_type", sa.String(length=20), nullable=False),
        sa.Column("headcount", sa.SmallInteger(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("phone", sa.String(length=20), nullable=False),
        sa.Column("district_code", sa.String(length=15), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="POINT",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.CheckConstraint("status IN ('standby', 'dispatched', 'off_duty')", name="team_status"),
        sa.CheckConstraint(
            "team_type IN ('fire', 'medical', 'police', 'rescue', 'utility_repair')",
            name="team_type_known",
        ),
        sa.ForeignKeyConstraint(
            ["district_code"],
            ["admin_units.code"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_geospatial_index(
        "idx_response_teams_geom",
        "response_teams",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_geospatial_table(
        "road_edges",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.BigInteger(), nullable=False),
        sa.Column("target", sa.BigInteger(), nullable=False),
        sa.Column("road_class", sa.String(length=12), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("speed_kmh", sa.Double(), nullable=False),
        sa.Column("length_m", sa.Double(), nullable=False),
        sa.Column("cost_s", sa.Double(), nullable=False),
        sa.Column("reverse_cost_s", sa.Double(), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="LINESTRING",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["source"],
            ["road_nodes.id"],
        ),
        sa.ForeignKeyConstraint(
            ["target"],
            ["road_nodes.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_geospatial_index(
        "idx_road_edges_geom",
        "road_edges",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_index("road_edges_source_idx", "road_edges", ["source"], unique=False)
    op.create_index("road_edges_target_idx", "road_edges", ["target"], unique=False)
    op.create_geospatial_table(
        "supply_depots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=24), nullable=False),
        sa.Column("name_zh", sa.Text(), nullable=False),
        sa.Column("name_en", sa.Text(), nullable=False),
        sa.Column("district_code", sa.String(length=15), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="POINT",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["district_code"],
            ["admin_units.code"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_geospatial_index(
        "idx_supply_depots_geom",
        "supply_depots",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_table(
        "depot_stock",
        sa.Column("depot_id", sa.Integer(), nullable=False),
        sa.Column("item_code", sa.String(length=32), nullable=False),
        sa.Column("item_name_zh", sa.Text(), nullable=False),
        sa.Column("unit", sa.String(length=16), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["depot_id"],
            ["supply_depots.id"],
        ),
        sa.PrimaryKeyConstraint("depot_id", "item_code"),
    )
    op.create_geospatial_table(
        "risk_points",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("code", sa.String(length=24), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("sector_code", sa.String(length=40), nullable=False),
        sa.Column("category", sa.Text(), nullable=False),
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("grid_code", sa.String(length=15), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=True),
        sa.Column("h3_r3", sa.BigInteger(), nullable=False),
        sa.Column("h3_r4", sa.BigInteger(), nullable=False),
        sa.Column("h3_r5", sa.BigInteger(), nullable=False),
        sa.Column("h3_r6", sa.BigInteger(), nullable=False),
        sa.Column("h3_r7", sa.BigInteger(), nullable=False),
        sa.Column("h3_r8", sa.BigInteger(), nullable=False),
        sa.Column("h3_r9", sa.BigInteger(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="POINT",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.CheckConstraint("level BETWEEN 1 AND 4", name="risk_level_1_to_4"),
        sa.ForeignKeyConstraint(
            ["grid_code"],
            ["admin_units.code"],
        ),
        sa.ForeignKeyConstraint(
            ["plan_id"],
            ["emergency_plans.id"],
        ),
        sa.ForeignKeyConstraint(
            ["sector_code"],
            ["sectors.code"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_geospatial_index(
        "idx_risk_points_geom",
        "risk_points",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_index("risk_points_grid_idx", "risk_points", ["grid_code"], unique=False)
    op.create_index(
        "risk_points_sector_level_idx", "risk_points", ["sector_code", "level"], unique=False
    )
    op.create_geospatial_table(
        "sensors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=24), nullable=False),
        sa.Column("network", sa.String(length=10), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("unit", sa.String(length=10), nullable=False),
        sa.Column("node_id", sa.BigInteger(), nullable=True),
        sa.Column("segment_id", sa.BigInteger(), nullable=True),
        sa.Column("min_value", sa.Double(), nullable=False),
        sa.Column("max_value", sa.Double(), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="POINT",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.CheckConstraint("kind IN ('level', 'flow', 'pressure', 'gas')", name="sensor_kind"),
        sa.CheckConstraint(
            "num_nonnulls(node_id, segment_id) = 1", name="sensor_on_node_or_segment"
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["pipe_nodes.id"],
        ),
        sa.ForeignKeyConstraint(
            ["segment_id"],
            ["pipe_segments.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_geospatial_index(
        "idx_sensors_geom",
        "sensors",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_table(
        "team_jurisdictions",
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("admin_code", sa.String(length=15), nullable=False),
        sa.ForeignKeyConstraint(
            ["admin_code"],
            ["admin_units.code"],
        ),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["response_teams.id"],
        ),
        sa.PrimaryKeyConstraint("team_id", "admin_code"),
    )
    op.create_table(
        "sensor_readings",
        sa.Column("sensor_id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sensor_id"],
            ["sensors.id"],
        ),
        sa.PrimaryKeyConstraint("sensor_id", "ts"),
    )
    create_version_triggers()


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS twin_bump_data_version() CASCADE")
    op.drop_table("sensor_readings")
    op.drop_table("team_jurisdictions")
    op.drop_geospatial_index(
        "idx_sensors_geom", table_name="sensors", postgresql_using="gist", column_name="geom"
    )
    op.drop_geospatial_table("sensors")
    op.drop_index("risk_points_sector_level_idx", table_name="risk_points")
    op.drop_index("risk_points_grid_idx", table_name="risk_points")
    op.drop_geospatial_index(
        "idx_risk_points_geom",
        table_name="risk_points",
        postgresql_using="gist",
        column_name="geom",
    )
    op.drop_geospatial_table("risk_points")
    op.drop_table("depot_stock")
    op.drop_geospatial_index(
        "idx_supply_depots_geom",
        table_name="supply_depots",
        postgresql_using="gist",
        column_name="geom",
    )
    op.drop_geospatial_table("supply_depots")
    op.drop_index("road_edges_target_idx", table_name="road_edges")
    op.drop_index("road_edges_source_idx", table_name="road_edges")
    op.drop_geospatial_index(
        "idx_road_edges_geom", table_name="road_edges", postgresql_using="gist", column_name="geom"
    )
    op.drop_geospatial_table("road_edges")
    op.drop_geospatial_index(
        "idx_response_teams_geom",
        table_name="response_teams",
        postgresql_using="gist",
        column_name="geom",
    )
    op.drop_geospatial_table("response_teams")
    op.drop_index("pipe_segments_to_idx", table_name="pipe_segments")
    op.drop_index("pipe_segments_from_idx", table_name="pipe_segments")
    op.drop_geospatial_index(
        "idx_pipe_segments_geom",
        table_name="pipe_segments",
        postgresql_using="gist",
        column_name="geom",
    )
    op.drop_geospatial_table("pipe_segments")
    op.drop_geospatial_index(
        "idx_hazard_sources_geom",
        table_name="hazard_sources",
        postgresql_using="gist",
        column_name="geom",
    )
    op.drop_geospatial_table("hazard_sources")
    op.drop_table("emergency_plans")
    op.drop_geospatial_index(
        "idx_buildings_geom", table_name="buildings", postgresql_using="gist", column_name="geom"
    )
    op.drop_geospatial_table("buildings")
    op.drop_table("sectors")
    op.drop_geospatial_index(
        "idx_road_nodes_geom", table_name="road_nodes", postgresql_using="gist", column_name="geom"
    )
    op.drop_geospatial_table("road_nodes")
    op.drop_geospatial_index(
        "idx_pipe_nodes_geom", table_name="pipe_nodes", postgresql_using="gist", column_name="geom"
    )
    op.drop_geospatial_table("pipe_nodes")
    op.drop_index("layers_source_table_idx", table_name="layers")
    op.drop_table("layers")
    op.drop_table("dataset_loads")
    op.drop_geospatial_index(
        "idx_admin_units_geom",
        table_name="admin_units",
        postgresql_using="gist",
        column_name="geom",
    )
    op.drop_index("admin_units_parent_idx", table_name="admin_units")
    op.drop_index("admin_units_level_idx", table_name="admin_units")
    op.drop_geospatial_table("admin_units")
