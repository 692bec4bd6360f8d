"""The layers every twin serves: views of the city model, registered after the sample loads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinLayer:
    id: str
    title_zh: str
    title_en: str
    kind: str
    geometry_type: str | None
    source_table: str | None
    # Columns published as feature properties (tiles, features); the id column comes first.
    fields: tuple[str, ...] = ()
    source_filter: str | None = None
    min_zoom: int = 0
    max_zoom: int = 22
    # Raster layers: the file in the sample directory.
    file_name: str | None = None


def _admin(layer_id: str, level: str, zh: str, en: str, min_zoom: int) -> BuiltinLayer:
    return BuiltinLayer(
        id=layer_id,
        title_zh=zh,
        title_en=en,
        kind="vector",
        geometry_type="MultiPolygon",
        source_table="admin_units",
        fields=("code", "name_zh", "name_en", "kind", "parent_code", "population", "area_km2"),
        source_filter=f"level = '{level}'",
        min_zoom=min_zoom,
    )


BUILTIN_LAYERS: tuple[BuiltinLayer, ...] = (
    _admin("districts", "district", "区县", "Districts and counties", 0),
    _admin("streets", "street", "镇街", "Streets and towns", 8),
    _admin("communities", "community", "村社", "Communities and villages", 11),
    _admin("grids", "grid", "网格", "Grid cells", 13),
    BuiltinLayer(
        "risk_points", "风险点", "Risk points", "vector", "Point", "risk_points",
        ("id", "code", "name", "sector_code", "category", "level", "grid_code", "plan_id"),
    ),
    BuiltinLayer(
        "response_teams", "应急队伍", "Response teams", "vector", "Point", "response_teams",
        ("id", "code", "name_zh", "name_en", "team_type", "headcount", "status", "district_code"),
    ),
    BuiltinLayer(
        "supply_depots", "应急物资库", "Supply depots", "vector", "Point", "supply_depots",
        ("id", "code", "name_zh", "name_en", "district_code"),
    ),
    BuiltinLayer(
        "roads", "道路", "Road network", "vector", "LineString", "road_edges",
        ("id", "road_class", "name", "speed_kmh", "length_m"),
    ),
    BuiltinLayer(
        "pipe_segments", "管线", "Pipe segments", "vector", "LineString", "pipe_segments",
        ("id", "code", "network", "diameter_mm", "material", "install_year", "flow_direction"),
        min_zoom=10,
    ),
    BuiltinLayer(
        "pipe_nodes", "管点", "Pipe nodes", "vector", "Point", "pipe_nodes",
        ("id", "code", "network", "kind", "ground_elev_m", "invert_elev_m"),
        min_zoom=13,
    ),
    BuiltinLayer(
        "sensors", "传感器", "Sensors", "vector", "Point", "sensors",
        ("id", "code", "network", "kind", "unit", "node_id", "segment_id"),
        min_zoom=12,
    ),
    BuiltinLayer(
        "hazard_sources", "危险源", "Hazard sources", "vector", "Point", "hazard_sources",
        ("id", "code", "kind", "name", "gas_threshold_ppm", "level_threshold_m"),
        min_zoom=10,
    ),
    BuiltinLayer(
        "buildings", "建筑", "Buildings", "vector", "Polygon", "buildings",
        ("id", "name", "use", "height", "base_height", "floors", "cim_level"),
        min_zoom=13,
    ),
    # Events (issue 14): located on the grid, restyled by status and level as they change.
    BuiltinLayer(
        "events", "事件", "Events", "vector", "Point", "events",
        ("id", "kind", "sector_code", "title", "status", "level", "grid_code", "source"),
    ),
    BuiltinLayer(
        "terrain", "地形（全市）", "Terrain (municipality)", "raster", None, None,
        file_name="dem_municipality.tif", max_zoom=12,
    ),
    BuiltinLayer(
        "terrain_central", "地形（主城）", "Terrain (central urban area)", "raster", None, None,
        file_name="dem_central.tif", max_zoom=15,
    ),
)
