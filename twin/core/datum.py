"""Chinese offset datums (GCJ-02, BD-09) to WGS84, with prcoords.

PROJ has no definition for GCJ-02 or BD-09, so conversion is explicit and never silent:
every caller names the datum it converts from.
"""

from __future__ import annotations

import numpy as np
import prcoords
import shapely

# prcoords' iterative ("bored") inverses are exact to ~1e-7 degrees (centimetres); the closed-form
# inverse is off by metres, which would show as slivers between converted neighbours.
_TO_WGS84 = {"gcj02": prcoords.gcj_wgs_bored, "bd09": prcoords.bd_wgs_bored}


def to_wgs84(lon: float, lat: float, datum: str) -> tuple[float, float]:
    """One (lon, lat) from ``datum`` ('gcj02' or 'bd09') to WGS84."""
    wgs = _TO_WGS84[datum](prcoords.Coords(lat, lon), False)
    return wgs.lon, wgs.lat


def coords_to_wgs84(coords: np.ndarray, datum: str) -> np.ndarray:
    """An (n, 2) array of lon/lat in ``datum`` to WGS84."""
    convert = _TO_WGS84[datum]
    out = np.empty_like(coords, dtype=float)
    for i, (lon, lat) in enumerate(coords):
        wgs = convert(prcoords.Coords(lat, lon), False)
        out[i] = (wgs.lon, wgs.lat)
    return out


def geometries_to_wgs84(geoms: np.ndarray, datum: str) -> np.ndarray:
    """Convert shapely geometries vertex by vertex. Shared vertices stay shared."""
    return shapely.transform(geoms, lambda xy: coords_to_wgs84(xy, datum))
