"""GCJ-02 -> WGS84 conversion against an independent implementation (eviltransform)."""

from __future__ import annotations

import eviltransform
import geopandas as gpd
import pytest
import shapely
from pyproj import Geod

from data_samples.districts import DISTRICTS_FILE, load_districts
from twin.core.datum import to_wgs84

GEOD = Geod(ellps="WGS84")

# Jiefangbei (Chongqing), the Chaotianmen confluence, Wanzhou and a mountain county seat.
KNOWN_GCJ02 = [(106.5809, 29.5583), (106.5880, 29.5696), (108.4089, 30.8073), (108.6627, 31.9499)]


def metres(lon1, lat1, lon2, lat2) -> float:
    return GEOD.inv(lon1, lat1, lon2, lat2)[2]


@pytest.mark.parametrize(("lon", "lat"), KNOWN_GCJ02)
def test_gcj02_to_wgs84_agrees_with_an_independent_reference(lon, lat):
    ours = to_wgs84(lon, lat, "gcj02")
    ref_lat, ref_lon = eviltransform.gcj2wgs_exact(lat, lon)
    assert metres(*ours, ref_lon, ref_lat) < 1.0


@pytest.mark.parametrize(("lon", "lat"), KNOWN_GCJ02)
def test_converting_back_with_the_reference_forward_transform_returns_the_input(lon, lat):
    wgs_lon, wgs_lat = to_wgs84(lon, lat, "gcj02")
    back_lat, back_lon = eviltransform.wgs2gcj(wgs_lat, wgs_lon)
    assert metres(lon, lat, back_lon, back_lat) < 1.0
    # And the offset really was applied: GCJ-02 is ~500 m off WGS84 in Chongqing.
    assert 300 < metres(lon, lat, wgs_lon, wgs_lat) < 700


def test_district_boundaries_are_converted_vertex_by_vertex_on_load():
    converted = load_districts().set_index("adcode")
    source = gpd.read_file(DISTRICTS_FILE).set_index("adcode")
    for adcode in ("500103", "500101", "500238"):
        ours = shapely.get_coordinates(converted.loc[adcode].geometry)
        theirs = shapely.get_coordinates(source.loc[adcode].geometry)
        assert len(ours) == len(theirs)
        for (lon, lat), (src_lon, src_lat) in zip(ours[::97], theirs[::97], strict=True):
            ref_lat, ref_lon = eviltransform.gcj2wgs_exact(src_lat, src_lon)
            assert metres(lon, lat, ref_lon, ref_lat) < 1.0
