"""Metres for the infrastructure generator: a local projection and geodesic lengths.

Geometry is laid out in UTM zone 48N (central meridian 105°E, 1.5° from the city centre, so
scale error is under 0.03 %) and stored in WGS84 lon/lat. Lengths written to the tables are
geodesic on the WGS84 ellipsoid, so they agree with ``ST_Length(geom::geography)``.
"""

from __future__ import annotations

import numpy as np
from pyproj import Geod, Transformer

LOCAL_CRS = "EPSG:32648"

_TO_LOCAL = Transformer.from_crs("EPSG:4326", LOCAL_CRS, always_xy=True)
_TO_LONLAT = Transformer.from_crs(LOCAL_CRS, "EPSG:4326", always_xy=True)
_GEOD = Geod(ellps="WGS84")


def to_local(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 lon/lat to local easting/northing in metres."""
    x, y = _TO_LOCAL.transform(np.asarray(lon, float), np.asarray(lat, float))
    return np.asarray(x, float), np.asarray(y, float)


def to_lonlat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local easting/northing in metres back to WGS84 lon/lat."""
    lon, lat = _TO_LONLAT.transform(np.asarray(x, float), np.asarray(y, float))
    return np.asarray(lon, float), np.asarray(lat, float)


def geodesic_m(
    lon1: np.ndarray, lat1: np.ndarray, lon2: np.ndarray, lat2: np.ndarray
) -> np.ndarray:
    """Ellipsoidal distance in metres between paired points."""
    lon1, lat1, lon2, lat2 = (np.atleast_1d(np.asarray(a, float)) for a in (lon1, lat1, lon2, lat2))
    if lon1.size == 0:
        return np.zeros(0)
    _, _, distance = _GEOD.inv(lon1, lat1, lon2, lat2)
    return np.asarray(distance, float)
