"""The city model: one spatial schema that tiles, queries and uploads all read.

All geometry is EPSG:4326 (lon, lat) and GiST-indexed (GeoAlchemy2 creates the index
for every ``Geometry`` column). Codes follow DOMAIN.md: 6-digit adcodes for the city and
districts, then 3 digits each for street, community and grid (a grid code has 15 digits).
"""

from __future__ import annotations

from datetime import datetime

from geoalchemy2 import Geometry
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SRID = 4326
ADMIN_LEVELS = ("city", "district", "street", "community", "grid")
CODE_LENGTH = {"city": 6, "district": 6, "street": 9, "community": 12, "grid": 15}
TEAM_TYPES = ("fire", "medical", "police", "rescue", "utility_repair")
NETWORKS = ("drainage", "water", "gas")
SENSOR_KINDS = ("level", "flow", "pressure", "gas")

# Risk points keep their H3 cell at every resolution that tiles and statistics group by.
H3_RESOLUTIONS = (3, 4, 5, 6, 7, 8, 9)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    pass


class AdminUnit(Base):
    """City, districts, streets/towns, communities and grid cells in one hierarchy."""

    __tablename__ = "admin_units"
    __table_args__ = (
        CheckConstraint(_in("level", ADMIN_LEVELS), name="admin_level_known"),
        CheckConstraint(
            "length(code) = CASE level WHEN 'street' THEN 9 WHEN 'community' THEN 12 "
            "WHEN 'grid' THEN 15 ELSE 6 END AND code ~ '^[0-9]+$'",
            name="admin_code_length",
        ),
        Index("admin_units_level_idx", "level"),
        Index("admin_units_parent_idx", "parent_code"),
        # Tiles and locate read one level at a time: a GiST index per level keeps the
        # 65,300 grid cells out of a district tile's index scan and vice versa.
        *(
            Index(f"admin_units_{level}_geom_idx", "geom", postgresql_using="gist",
                  postgresql_where=text(f"level = '{level}'"))
            for level in ("district", "street", "community", "grid")
        ),
    )

    code: Mapped[str] = mapped_column(String(15), primary_key=True)
    level: Mapped[str] = mapped_column(String(10))
    parent_code: Mapped[str | None] = mapped_column(ForeignKey("admin_units.code"))
    name_zh: Mapped[str] = mapped_column(Text)
    name_en: Mapped[str] = mapped_column(Text)
    # municipality, district, county, autonomous county, street, town, community, village, grid
    kind: Mapped[str] = mapped_column(String(20))
    population: Mapped[int] = mapped_column(Integer)
    area_km2: Mapped[float] = mapped_column(Double)
    geom = mapped_column(Geometry("MULTIPOLYGON", srid=SRID, spatial_index=True), nullable=False)


class Sector(Base):
    """The risk taxonomy (seven sectors by default) is data, so an eighth needs no code."""

    __tablename__ = "sectors"

    code: Mapped[str] = mapped_column(String(40), primary_key=True)
    name_zh: Mapped[str] = mapped_column(Text)
    name_en: Mapped[str] = mapped_column(Text)
    sort_order: Mapped[int] = mapped_column(SmallInteger)


class EmergencyPlan(Base):
    __tablename__ = "emergency_plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    title_zh: Mapped[str] = mapped_column(Text)
    title_en: Mapped[str] = mapped_column(Text)
    sector_code: Mapped[str] = mapped_column(ForeignKey("sectors.code"))
    # Response level of the plan, I (most severe) to IV, as in Chinese emergency practice.
    response_level: Mapped[int] = mapped_column(SmallInteger)
    issuer_code: Mapped[str] = mapped_column(ForeignKey("admin_units.code"))
    summary: Mapped[str] = mapped_column(Text)


class RiskPoint(Base):
    __tablename__ = "risk_points"
    __table_args__ = (
        CheckConstraint("level BETWEEN 1 AND 4", name="risk_level_1_to_4"),
        Index("risk_points_grid_idx", "grid_code"),
        Index("risk_points_sector_level_idx", "sector_code", "level"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    code: Mapped[str] = mapped_column(String(24), unique=True)
    name: Mapped[str] = mapped_column(Text)
    sector_code: Mapped[str] = mapped_column(ForeignKey("sectors.code"))
    category: Mapped[str] = mapped_column(Text)
    # 1 major (red), 2 large (orange), 3 general (yellow), 4 low (blue)
    level: Mapped[int] = mapped_column(SmallInteger)
    address: Mapped[str] = mapped_column(Text)
    grid_code: Mapped[str] = mapped_column(ForeignKey("admin_units.code"))
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("emergency_plans.id"))
    h3_r3: Mapped[int] = mapped_column(BigInteger)
    h3_r4: Mapped[int] = mapped_column(BigInteger)
    h3_r5: Mapped[int] = mapped_column(BigInteger)
    h3_r6: Mapped[int] = mapped_column(BigInteger)
    h3_r7: Mapped[int] = mapped_column(BigInteger)
    h3_r8: Mapped[int] = mapped_column(BigInteger)
    h3_r9: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    geom = mapped_column(Geometry("POINT", srid=SRID, spatial_index=True), nullable=False)


RISK_POINT_EDIT_ACTIONS = ("create", "replace", "update", "delete")


class RiskPointEdit(Base):
    """One edit of a risk point through the API (twin/live/risk_edits.py), written in the
    edit's transaction: the point before (NULL for a create) and after (NULL for a delete).
    No foreign key: a deleted point keeps its history."""

    __tablename__ = "risk_point_edits"
    __table_args__ = (
        CheckConstraint(_in("action", RISK_POINT_EDIT_ACTIONS), name="risk_point_edit_action"),
        Index("risk_point_edits_point_at", "risk_point_id", "at"),
        Index("risk_point_edits_at", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    risk_point_id: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    principal: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String(8))
    before: Mapped[dict | None] = mapped_column(JSONB)
    after: Mapped[dict | None] = mapped_column(JSONB)


class RiskPointH3Count(Base):
    """Risk points per H3 cell, sector and level, for hexagon tiles (tiles/hexagons.py).

    Kept exact by statement-level triggers on risk_points (migration 0005);
    a row whose count drops to 0 is deleted.
    """

    __tablename__ = "risk_point_h3_counts"
    __table_args__ = (
        CheckConstraint("n >= 0", name="h3_count_not_negative"),
        # One small index per resolution: a tile asks for one resolution only.
        *(
            Index(f"risk_point_h3_counts_r{res}_anchor_idx", "anchor", postgresql_using="gist",
                  postgresql_where=text(f"res = {res}"))
            for res in H3_RESOLUTIONS
        ),
        # The rows the triggers empty, found without a scan.
        Index("risk_point_h3_counts_empty_idx", "res", postgresql_where=text("n = 0")),
    )

    res: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    cell: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sector_code: Mapped[str] = mapped_column(String(40), primary_key=True)
    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    # A point inside the cell (one of its risk points at some time): where a tile finds the
    # cell. Any point of the cell will do, since a tile reads cells within one diameter.
    anchor = mapped_column(Geometry("POINT", srid=SRID, spatial_index=False), nullable=False)


class H3CellOutline(Base):
    """An H3 cell's outline and centre in Web Mercator (tiles/outlines.py), so a hexagon
    tile is drawn by PostGIS alone. Derived and never edited: a cell's shape never changes.

    Not EPSG:4326 like the city model: these exist only to be cut into tiles.
    """

    __tablename__ = "h3_cell_outlines"

    cell: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    res: Mapped[int] = mapped_column(SmallInteger)
    outline = mapped_column(Geometry("POLYGON", srid=3857, spatial_index=False), nullable=False)
    # Decides which tile owns the cell (tiles/hexagons.py).
    centre = mapped_column(Geometry("POINT", srid=3857, spatial_index=False), nullable=False)


class ResponseTeam(Base):
    __tablename__ = "response_teams"
    __table_args__ = (
        CheckConstraint(_in("team_type", TEAM_TYPES), name="team_type_known"),
        CheckConstraint(_in("status", ("standby", "dispatched", "off_duty")), name="team_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(24), unique=True)
    name_zh: Mapped[str] = mapped_column(Text)
    name_en: Mapped[str] = mapped_column(Text)
    team_type: Mapped[str] = mapped_column(String(20))
    headcount: Mapped[int] = mapped_column(SmallInteger)
    status: Mapped[str] = mapped_column(String(12))
    phone: Mapped[str] = mapped_column(String(20))
    district_code: Mapped[str] = mapped_column(ForeignKey("admin_units.code"))
    geom = mapped_column(Geometry("POINT", srid=SRID, spatial_index=True), nullable=False)


class TeamJurisdiction(Base):
    """Which teams answer for which streets: the grid's responsible teams in a locate."""

    __tablename__ = "team_jurisdictions"

    __table_args__ = (Index("team_jurisdictions_admin_idx", "admin_code"),)

    team_id: Mapped[int] = mapped_column(ForeignKey("response_teams.id"), primary_key=True)
    admin_code: Mapped[str] = mapped_column(ForeignKey("admin_units.code"), primary_key=True)


class SupplyDepot(Base):
    __tablename__ = "supply_depots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(24), unique=True)
    name_zh: Mapped[str] = mapped_column(Text)
    name_en: Mapped[str] = mapped_column(Text)
    district_code: Mapped[str] = mapped_column(ForeignKey("admin_units.code"))
    geom = mapped_column(Geometry("POINT", srid=SRID, spatial_index=True), nullable=False)


class DepotStock(Base):
    __tablename__ = "depot_stock"

    depot_id: Mapped[int] = mapped_column(ForeignKey("supply_depots.id"), primary_key=True)
    item_code: Mapped[str] = mapped_column(String(32), primary_key=True)
    item_name_zh: Mapped[str] = mapped_column(Text)
    unit: Mapped[str] = mapped_column(String(16))
    quantity: Mapped[int] = mapped_column(Integer)


class RoadNode(Base):
    __tablename__ = "road_nodes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    geom = mapped_column(Geometry("POINT", srid=SRID, spatial_index=True), nullable=False)


class RoadEdge(Base):
    """A pgRouting edge: costs are travel seconds; a negative reverse cost means one-way."""

    __tablename__ = "road_edges"
    __table_args__ = (
        Index("road_edges_source_idx", "source"),
        Index("road_edges_target_idx", "target"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    source: Mapped[int] = mapped_column(ForeignKey("road_nodes.id"))
    target: Mapped[int] = mapped_column(ForeignKey("road_nodes.id"))
    # expressway, arterial, secondary, local
    road_class: Mapped[str] = mapped_column(String(12))
    name: Mapped[str] = mapped_column(Text)
    speed_kmh: Mapped[float] = mapped_column(Double)
    length_m: Mapped[float] = mapped_column(Double)
    cost_s: Mapped[float] = mapped_column(Double)
    reverse_cost_s: Mapped[float] = mapped_column(Double)
    geom = mapped_column(Geometry("LINESTRING", srid=SRID, spatial_index=True), nullable=False)


class PipeNode(Base):
    __tablename__ = "pipe_nodes"
    __table_args__ = (CheckConstraint(_in("network", NETWORKS), name="pipe_node_network"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    code: Mapped[str] = mapped_column(String(24), unique=True)
    network: Mapped[str] = mapped_column(String(10))
    # manhole, junction, outfall (drainage); valve, junction, source (water, gas)
    kind: Mapped[str] = mapped_column(String(12))
    ground_elev_m: Mapped[float] = mapped_column(Double)
    invert_elev_m: Mapped[float] = mapped_column(Double)
    geom = mapped_column(Geometry("POINT", srid=SRID, spatial_index=True), nullable=False)


class PipeSegment(Base):
    """A pipe between two nodes. Drainage flows from ``from_node`` to ``to_node``."""

    __tablename__ = "pipe_segments"
    __table_args__ = (
        CheckConstraint(_in("network", NETWORKS), name="pipe_segment_network"),
        Index("pipe_segments_from_idx", "from_node"),
        Index("pipe_segments_to_idx", "to_node"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    code: Mapped[str] = mapped_column(String(24), unique=True)
    network: Mapped[str] = mapped_column(String(10))
    from_node: Mapped[int] = mapped_column(ForeignKey("pipe_nodes.id"))
    to_node: Mapped[int] = mapped_column(ForeignKey("pipe_nodes.id"))
    diameter_mm: Mapped[int] = mapped_column(SmallInteger)
    material: Mapped[str] = mapped_column(String(16))
    install_year: Mapped[int] = mapped_column(SmallInteger)
    length_m: Mapped[float] = mapped_column(Double)
    # 'downstream' for drainage (gravity flow from_node -> to_node); 'both' for pressurised pipes.
    flow_direction: Mapped[str] = mapped_column(String(10))
    geom = mapped_column(Geometry("LINESTRING", srid=SRID, spatial_index=True), nullable=False)


class Sensor(Base):
    __tablename__ = "sensors"
    __table_args__ = (
        CheckConstraint(_in("kind", SENSOR_KINDS), name="sensor_kind"),
        CheckConstraint("num_nonnulls(node_id, segment_id) = 1", name="sensor_on_node_or_segment"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(24), unique=True)
    network: Mapped[str] = mapped_column(String(10))
    kind: Mapped[str] = mapped_column(String(10))
    unit: Mapped[str] = mapped_column(String(10))
    node_id: Mapped[int | None] = mapped_column(ForeignKey("pipe_nodes.id"))
    segment_id: Mapped[int | None] = mapped_column(ForeignKey("pipe_segments.id"))
    # The physically possible range; readings outside it are rejected on ingest.
    min_value: Mapped[float] = mapped_column(Double)
    max_value: Mapped[float] = mapped_column(Double)
    geom = mapped_column(Geometry("POINT", srid=SRID, spatial_index=True), nullable=False)


class SensorReading(Base):
    """Partitioned by UTC day on ts (migration 0011, pg_partman); no foreign key to sensors
    (a per-row trigger): the ingest checks a batch's sensor ids itself."""

    __tablename__ = "sensor_readings"
    __table_args__ = (
        Index("ix_sensor_readings_ts_brin", "ts", postgresql_using="brin"),
        {"postgresql_partition_by": "RANGE (ts)"},
    )

    sensor_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    value: Mapped[float] = mapped_column(Double)


class SensorLatest(Base):
    """The newest reading of each sensor, kept by the ingest in the batch's transaction."""

    __tablename__ = "sensor_latest"

    sensor_id: Mapped[int] = mapped_column(ForeignKey("sensors.id", ondelete="CASCADE"),
                                           primary_key=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    value: Mapped[float] = mapped_column(Double)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                  server_default=func.now())


class ReadingDeadLetter(Base):
    """What MQTT or HTTP delivered that could not be stored, and why."""

    __tablename__ = "reading_dead_letters"
    __table_args__ = (
        CheckConstraint(_in("source", ("mqtt", "http")), name="reading_dead_letters_source"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                  server_default=func.now(), index=True)
    source: Mapped[str] = mapped_column(String(8))
    topic: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    reason: Mapped[str] = mapped_column(Text)


class HazardSource(Base):
    """Septic tanks and sewers watched for gas, liquid level and temperature."""

    __tablename__ = "hazard_sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(24), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(Text)
    node_id: Mapped[int | None] = mapped_column(ForeignKey("pipe_nodes.id"))
    gas_threshold_ppm: Mapped[float] = mapped_column(Double)
    level_threshold_m: Mapped[float] = mapped_column(Double)
    temp_threshold_c: Mapped[float] = mapped_column(Double)
    geom = mapped_column(Geometry("POINT", srid=SRID, spatial_index=True), nullable=False)


class Building(Base):
    __tablename__ = "buildings"
    __table_args__ = (
        CheckConstraint("cim_level BETWEEN 1 AND 6", name="building_cim_level"),
        CheckConstraint("base_height >= 0 AND base_height <= height_m",
                        name="building_base_below_roof"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)
    # residential, commercial, office, industrial, public, school, hospital
    use: Mapped[str] = mapped_column(String(16))
    height_m: Mapped[float] = mapped_column(Double)
    # What maps extrude by (migration 0007): the roof above the ground, generated from
    # height_m, and where the extrusion starts (0 on the ground; higher for a podium tower).
    height: Mapped[float | None] = mapped_column(Double, Computed("height_m"))
    base_height: Mapped[float] = mapped_column(Double, server_default="0")
    floors: Mapped[int] = mapped_column(SmallInteger)
    cim_level: Mapped[int] = mapped_column(SmallInteger)
    district_code: Mapped[str] = mapped_column(ForeignKey("admin_units.code"))
    geom = mapped_column(Geometry("POLYGON", srid=SRID, spatial_index=True), nullable=False)
    # Migration 0009 (3D): the CIM3 roof form over the footprint's oriented rectangle, the
    # street it stands in (a trigger fills it from the footprint when not given), and its own
    # LOD2 surfaces when a CityJSON upload brought them (absolute ellipsoidal heights).
    roof_type: Mapped[str] = mapped_column(String(8), server_default="flat")
    street_code: Mapped[str | None] = mapped_column(ForeignKey("admin_units.code"))
    surfaces = mapped_column(Geometry("MULTIPOLYGONZ", srid=SRID, spatial_index=False))


ROOF_TYPES = ("flat", "gable", "hip")


class Layer(Base):
    """The layer registry: every published layer, built-in or uploaded.

    ``data_version`` is bumped by a trigger on every write to ``source_table`` so that
    tile caches keyed by it are exact without any TTL.
    """

    __tablename__ = "layers"
    __table_args__ = (
        CheckConstraint(_in("kind", ("vector", "raster", "3d")), name="layer_kind"),
        Index("layers_source_table_idx", "source_table"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title_zh: Mapped[str] = mapped_column(Text)
    title_en: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(8))
    geometry_type: Mapped[str | None] = mapped_column(String(24))
    source_table: Mapped[str | None] = mapped_column(String(63))
    # A fixed SQL predicate that selects the layer's rows from a shared table (built-in only).
    source_filter: Mapped[str | None] = mapped_column(Text)
    fields: Mapped[list] = mapped_column(JSONB, default=list)
    bbox: Mapped[list[float] | None] = mapped_column(ARRAY(Double))
    source_crs: Mapped[str] = mapped_column(String(32), default="EPSG:4326")
    source_datum: Mapped[str] = mapped_column(String(16), default="wgs84")
    file_path: Mapped[str | None] = mapped_column(Text)
    min_zoom: Mapped[int] = mapped_column(SmallInteger, default=0)
    max_zoom: Mapped[int] = mapped_column(SmallInteger, default=22)
    origin: Mapped[str] = mapped_column(String(8), default="builtin")
    data_version: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Uploaded layers (migration 0003): the published version, who uploaded it, and who may
    # see it (owner_scope/shared are read by issue 7's access rules; NULL scope = everyone).
    current_version: Mapped[int | None] = mapped_column(Integer)
    uploaded_by: Mapped[str | None] = mapped_column(Text)
    owner_scope: Mapped[str | None] = mapped_column(Text)
    shared: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    # Kind-specific facts of the published version: a 3D model's anchor, heading and CIM level,
    # a raster's bands, nodata and whether it is a DEM.
    meta: Mapped[dict] = mapped_column(JSONB, default=dict, server_default=text("'{}'::jsonb"))


UPLOAD_JOB_STATES = ("queued", "running", "succeeded", "failed")


class LayerVersion(Base):
    """Every uploaded version of a layer: its own table (vector) or file (raster, 3D).

    Rollback copies a version's fields/bbox/geometry type back onto ``layers``; a version's
    table or file is kept until the layer is deleted.
    """

    __tablename__ = "layer_versions"

    layer_id: Mapped[str] = mapped_column(
        ForeignKey("layers.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    table_name: Mapped[str | None] = mapped_column(String(63))
    file_path: Mapped[str | None] = mapped_column(Text)
    geometry_type: Mapped[str | None] = mapped_column(String(24))
    fields: Mapped[list] = mapped_column(JSONB, default=list)
    bbox: Mapped[list[float] | None] = mapped_column(ARRAY(Double))
    feature_count: Mapped[int | None] = mapped_column(BigInteger)
    source_file_name: Mapped[str] = mapped_column(Text)
    # The CRS as given (EPSG code or the .prj's WKT) and the declared offset datum.
    source_crs: Mapped[str] = mapped_column(Text)
    source_datum: Mapped[str] = mapped_column(String(16))
    meta: Mapped[dict] = mapped_column(JSONB, default=dict)
    report: Mapped[dict] = mapped_column(JSONB, default=dict)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class UploadJob(Base):
    """An upload being ingested in the background; GET /jobs/{id} reads this row."""

    __tablename__ = "upload_jobs"
    __table_args__ = (
        CheckConstraint(_in("state", UPLOAD_JOB_STATES), name="upload_job_state"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="upload_job_progress"),
        # One queued or running job per layer: a second concurrent upload is refused (409).
        Index("upload_jobs_one_active_per_layer", "layer_id", unique=True,
              postgresql_where=text("state IN ('queued', 'running')")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    layer_id: Mapped[str] = mapped_column(String(64))
    # 'create' (POST /layers) or 'replace' (PUT /layers/{id})
    action: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(10))
    progress: Mapped[int] = mapped_column(SmallInteger, default=0)
    step: Mapped[str] = mapped_column(Text, default="queued")
    reasons: Mapped[list] = mapped_column(JSONB, default=list)
    report: Mapped[dict] = mapped_column(JSONB, default=dict)
    # The job's typed plan as three explicit parts (layers/plan.py JobPlan.to_row): the form as
    # sent, the plan, and the runner's liveness marks (layers/jobs.py, layers/job_liveness.py).
    params: Mapped[dict] = mapped_column(JSONB, default=dict)
    file_name: Mapped[str] = mapped_column(Text)
    version: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DatasetLoad(Base):
    """What the sample loader has put in, so a second run can skip it."""

    __tablename__ = "dataset_loads"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    row_count: Mapped[int] = mapped_column(BigInteger)
    loaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


API_ROLES = ("viewer", "planner", "gis-editor", "admin")
AUDIT_OUTCOMES = ("ok", "refused", "failed")


class ApiKey(Base):
    """An API key: a lookup prefix and the SHA-256 of the key, never the key itself."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(_in("role", API_ROLES), name="api_key_role"),
        Index("api_keys_prefix", "prefix", unique=True),
        # A name names one live key; revoked keys keep theirs for the audit trail.
        Index("api_keys_active_name", "name", unique=True,
              postgresql_where=text("revoked_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Text)
    prefix: Mapped[str] = mapped_column(String(16))
    hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    # Same text format as twin.core.principal.parse_scope: city | district=... | street=...
    scope: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """One write request: who, when, what, and how it ended (refused and failed ones too)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        CheckConstraint(_in("outcome", AUDIT_OUTCOMES), name="audit_outcome"),
        Index("audit_log_at", "at"),
        Index("audit_log_principal_at", "principal", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    principal: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str | None] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(SmallInteger)
    outcome: Mapped[str] = mapped_column(String(8))
    detail: Mapped[dict] = mapped_column(JSONB, default=dict)
    request_id: Mapped[str] = mapped_column(String(64))


# --- events (issue 14; migration 0012; owner: twin/live/events.py) -------------------------
EVENT_STATES = ("reported", "responded", "verified", "handled", "closed")
EVENT_LEVELS = ("grid", "street", "district", "city")
EVENT_SOURCES = ("report", "rule", "detector")
EVENT_STEPS = ("respond", "verify", "handle")
EVENT_ACTIONS = ("reported", "raised", "transitioned", "escalated")


class EventKind(Base):
    """What can happen, by sector, and the seconds allowed (from the report) per step.

    ``sector_code`` has no foreign key: the sample loader truncates ``sectors`` (CASCADE).
    """

    __tablename__ = "event_kinds"
    __table_args__ = (
        CheckConstraint("0 < respond_s AND respond_s <= verify_s AND verify_s <= handle_s",
                        name="event_kind_deadlines"),
    )

    code: Mapped[str] = mapped_column(String(40), primary_key=True)
    sector_code: Mapped[str] = mapped_column(String(40))
    name_zh: Mapped[str] = mapped_column(Text)
    name_en: Mapped[str] = mapped_column(Text)
    respond_s: Mapped[int] = mapped_column(Integer, server_default="60")
    verify_s: Mapped[int] = mapped_column(Integer, server_default="180")
    handle_s: Mapped[int] = mapped_column(Integer, server_default="300")


class Event(Base):
    """An event located on the grid (its four admin codes), with its state and level."""

    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint(_in("source", EVENT_SOURCES), name="event_source"),
        CheckConstraint(_in("status", EVENT_STATES), name="event_status"),
        CheckConstraint(_in("level", EVENT_LEVELS), name="event_level"),
        Index("events_grid_idx", "grid_code"),
        Index("events_reported_at_idx", "reported_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(ForeignKey("event_kinds.code"))
    sector_code: Mapped[str] = mapped_column(String(40))
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(10), server_default="reported")
    level: Mapped[str] = mapped_column(String(10), server_default="grid")
    grid_code: Mapped[str] = mapped_column(ForeignKey("admin_units.code"))
    community_code: Mapped[str] = mapped_column(String(15))
    street_code: Mapped[str] = mapped_column(String(15))
    district_code: Mapped[str] = mapped_column(String(15))
    geom = mapped_column(Geometry("POINT", srid=SRID, spatial_index=True), nullable=False)
    reported_by: Mapped[str] = mapped_column(Text)
    reported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                  server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                 server_default=func.now())
    version: Mapped[int] = mapped_column(Integer, server_default="1")
    sensor_id: Mapped[int | None] = mapped_column(BigInteger)
    rule_code: Mapped[str | None] = mapped_column(String(40))
    links: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class EventHistory(Base):
    """Every change of an event: report, transition, escalation (append-only)."""

    __tablename__ = "event_history"
    __table_args__ = (
        CheckConstraint(_in("action", EVENT_ACTIONS), name="event_history_action"),
        Index("event_history_event_idx", "event_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    action: Mapped[str] = mapped_column(String(12))
    from_status: Mapped[str | None] = mapped_column(String(10))
    to_status: Mapped[str | None] = mapped_column(String(10))
    from_level: Mapped[str | None] = mapped_column(String(10))
    to_level: Mapped[str | None] = mapped_column(String(10))
    step: Mapped[str | None] = mapped_column(String(8))
    principal: Mapped[str | None] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)


class EventDeadline(Base):
    """One step's deadline; open ones (neither met nor fired) are the escalation's work."""

    __tablename__ = "event_deadlines"
    __table_args__ = (
        CheckConstraint(_in("step", EVENT_STEPS), name="event_deadline_step"),
        Index("event_deadlines_open_idx", "due_at",
              postgresql_where=text("met_at IS NULL AND fired_at IS NULL")),
    )

    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"),
                                          primary_key=True)
    step: Mapped[str] = mapped_column(String(8), primary_key=True)
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    met_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    fired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# --- alert rules, sensor alerts and live anomaly zones (issue 14, migration 0013) ---------

class AlertRule(Base):
    """A threshold test with hysteresis, or a silence test, on one kind of sensor."""

    __tablename__ = "alert_rules"
    __table_args__ = (
        CheckConstraint(_in("sensor_kind", SENSOR_KINDS), name="alert_rule_sensor_kind"),
        CheckConstraint("network IS NULL OR " + _in("network", NETWORKS),
                        name="alert_rule_network"),
        CheckConstraint("(silent_minutes IS NULL) = (num_nonnulls(open_above, open_below) > 0)",
                        name="alert_rule_test"),
        CheckConstraint("silent_minutes IS NULL OR silent_minutes > 0",
                        name="alert_rule_silence"),
        CheckConstraint(
            "(open_above IS NULL) = (close_below IS NULL) "
            "AND (open_below IS NULL) = (close_above IS NULL) "
            "AND (open_above IS NULL OR close_below <= open_above) "
            "AND (open_below IS NULL OR close_above >= open_below) "
            "AND (close_above IS NULL OR close_below IS NULL OR close_above < close_below)",
            name="alert_rule_hysteresis"),
    )

    code: Mapped[str] = mapped_column(String(40), primary_key=True)
    sensor_kind: Mapped[str] = mapped_column(String(10))
    network: Mapped[str | None] = mapped_column(String(10))
    name_zh: Mapped[str] = mapped_column(Text)
    name_en: Mapped[str] = mapped_column(Text)
    open_above: Mapped[float | None] = mapped_column(Double)
    open_below: Mapped[float | None] = mapped_column(Double)
    close_above: Mapped[float | None] = mapped_column(Double)
    close_below: Mapped[float | None] = mapped_column(Double)
    silent_minutes: Mapped[int | None] = mapped_column(Integer)
    event_kind: Mapped[str | None] = mapped_column(ForeignKey("event_kinds.code"))
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                 server_default=func.now())


class SensorAlert(Base):
    """An alert a rule opened on a sensor; at most one open per sensor and rule."""

    __tablename__ = "sensor_alerts"
    __table_args__ = (
        CheckConstraint("closed_at IS NULL OR closed_at >= opened_at",
                        name="sensor_alert_closes_after"),
        Index("sensor_alerts_one_open", "sensor_id", "rule_code", unique=True,
              postgresql_where=text("closed_at IS NULL")),
        Index("sensor_alerts_opened_idx", "opened_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sensor_id: Mapped[int] = mapped_column(ForeignKey("sensors.id", ondelete="CASCADE"))
    rule_code: Mapped[str] = mapped_column(ForeignKey("alert_rules.code", onupdate="CASCADE"))
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    opened_value: Mapped[float | None] = mapped_column(Double)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_value: Mapped[float | None] = mapped_column(Double)
    event_id: Mapped[int | None] = mapped_column(ForeignKey("events.id", ondelete="SET NULL"))


class AnomalyZone(Base):
    """A pipe-anomaly zone found by the incremental detector, followed from run to run."""

    __tablename__ = "anomaly_zones"
    __table_args__ = (
        CheckConstraint(_in("network", NETWORKS), name="anomaly_zone_network"),
        Index("anomaly_zones_live_idx", "network", postgresql_where=text("closed_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    network: Mapped[str] = mapped_column(String(10))
    geom = mapped_column(Geometry("MULTIPOLYGON", srid=SRID, spatial_index=True), nullable=False)
    sensors: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    segments: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    source_segment_id: Mapped[int] = mapped_column(BigInteger)
    severity: Mapped[float] = mapped_column(Double)
    details: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                 server_default=func.now())
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    event_id: Mapped[int | None] = mapped_column(ForeignKey("events.id", ondelete="SET NULL"))
