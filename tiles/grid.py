"""The tile grid (WebMercatorQuad) and the checks on a requested tile address."""

from __future__ import annotations

import morecantile

from twin.core.errors import InvalidParameter, NotFound

TILE_MATRIX_SETS = ("WebMercatorQuad",)
MIN_ZOOM, MAX_ZOOM = 0, 22
WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")


def tile_matrix_set(tms_id: str) -> morecantile.TileMatrixSet:
    if tms_id not in TILE_MATRIX_SETS:
        raise NotFound(f"unknown tile matrix set '{tms_id}'; available: "
                       f"{', '.join(TILE_MATRIX_SETS)}")
    return WEB_MERCATOR


def tile_address(z: int, x: int, y: int) -> morecantile.Tile:
    """A WebMercatorQuad tile, or InvalidParameter naming what is out of range."""
    if not MIN_ZOOM <= z <= MAX_ZOOM:
        raise InvalidParameter(f"zoom {z} is outside {MIN_ZOOM}-{MAX_ZOOM}")
    last = 2**z - 1
    if not 0 <= x <= last:
        raise InvalidParameter(f"tile column x={x} is outside 0-{last} at zoom {z}")
    if not 0 <= y <= last:
        raise InvalidParameter(f"tile row y={y} is outside 0-{last} at zoom {z}")
    return morecantile.Tile(x, y, z)


def lonlat_bounds(tile: morecantile.Tile) -> tuple[float, float, float, float]:
    """(west, south, east, north) in degrees; exact, since Mercator keeps the box a box."""
    west, south, east, north = WEB_MERCATOR.bounds(tile)
    return west, south, east, north
