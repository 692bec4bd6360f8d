"""Whether an upload's coordinates can be where its CRS says they are.

A file is refused (its job fails, nothing is published) when any feature has a coordinate that
is not a finite number, or lies outside the range of its CRS: longitude -180..180 and latitude
-90..90 for a geographic CRS; for a projected one, the CRS's area of use (pyproj) widened by
``AREA_MARGIN_DEG`` (data a zone or so beyond its CRS's area is common and still accurate).
The reason names how many features are bad and the first of them, and says so when the two
coordinates look swapped (latitude first, or a CSV's columns named the wrong way round).
"""

from __future__ import annotations

from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import shapely
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError, ProjError

from layers.crs import MUNICIPALITY_BBOX, WGS84, SourceError, describe

# How far beyond a projected CRS's area of use coordinates may lie: about one 3-degree
# Gauss-Krüger zone (data kept in the neighbouring zone's CRS is common in Chongqing, which
# spans 105.3-110.2 E across three zones).
AREA_MARGIN_DEG = 3.0
GEOGRAPHIC_RANGE = (-180.0, -90.0, 180.0, 90.0)


@dataclass(frozen=True)
class Places:
    """Every vertex of a frame as read (before reprojection), with the feature it belongs to,
    and how to name a feature in a reason."""

    xy: np.ndarray  # (vertices, 2)
    feature: np.ndarray  # (vertices,) position of the vertex's feature
    count: int
    unit: str  # "row" (CSV) or "feature"
    columns: tuple[str, str] | None  # a CSV's (lon, lat) or (x, y) columns
    ids: tuple | None  # the features' own ids, when the file has an id field

    @classmethod
    def of(cls, frame: gpd.GeoDataFrame, fmt: str, columns: list[str] | None) -> Places:
        xy, feature = shapely.get_coordinates(frame.geometry.values, return_index=True)
        id_column = next((c for c in frame.columns
                          if c != frame.geometry.name and str(c).lower() == "id"), None)
        ids = None if id_column is None else tuple(frame[id_column].tolist())
        return cls(xy, feature, len(frame), "row" if fmt == "csv" else "feature",
                   (columns[0], columns[1]) if columns else None, ids)

    def name(self, position: int) -> str:
        label = f"{self.unit} {position + 1}"
        if self.ids is not None and self.ids[position] is not None:
            label += f" (id {self.ids[position]})"
        return label

    def at(self, vertex: int) -> str:
        """A vertex's coordinates as the file has them (CSV: by column name)."""
        x, y = (_number(v) for v in self.xy[vertex])
        if self.columns:
            return f"{self.columns[0]} {x}, {self.columns[1]} {y}"
        return f"({x}, {y})"


def check_source(places: Places, crs: CRS) -> None:
    """Refuse non-finite coordinates, and coordinates outside ``crs``'s range."""
    finite = np.isfinite(places.xy).all(axis=1)
    if not finite.all():
        raise SourceError(_bad(places, ~finite, "have coordinates that are not numbers (NaN "
                                                "or Infinity)")
                          + "; fix or remove them and upload again")
    limits = valid_range(crs)
    if limits is None:
        return
    bounds, what = limits
    outside = _outside(places.xy, bounds)
    if not outside.any():
        return
    if not _outside(places.xy[outside][:, ::-1], bounds).any():
        raise SourceError(_swapped(places, outside, crs))
    hint = "; check source_crs"
    if crs.is_geographic and np.abs(places.xy[outside]).max() > 1000:
        hint += (" (these look like projected metres: give their CRS, e.g. "
                 "source_crs=EPSG:4545 for Gauss-Krüger zone 36 without the zone number)")
    raise SourceError(_bad(places, outside, f"lie outside the range of {describe(crs)} "
                                            f"({what})") + hint)


def check_reprojected(places: Places, frame: gpd.GeoDataFrame, crs: CRS) -> None:
    """Refuse coordinates that PROJ could not place on the earth (no finite longitude and
    latitude, or none in range), naming them as the file has them."""
    xy = shapely.get_coordinates(frame.geometry.values)
    if len(xy) != len(places.xy):
        return  # a datum step changed the vertices; nothing to line up with
    bad = ~np.isfinite(xy).all(axis=1) | _outside(np.nan_to_num(xy), GEOGRAPHIC_RANGE)
    if bad.any():
        raise SourceError(_bad(places, bad, f"cannot be transformed from {describe(crs)} to "
                                            "longitude and latitude")
                          + "; check source_crs")


def check_extent(bounds: tuple[float, float, float, float], crs: CRS) -> None:
    """A raster's extent (west, south, east, north, in ``crs``) must lie within ``crs``'s range
    and have a place on the earth."""
    west, south, east, north = bounds
    extent = f"({_number(west)}, {_number(south)}) - ({_number(east)}, {_number(north)})"
    limits = valid_range(crs)
    corners = np.array([[west, south], [east, north]], dtype=float)
    if not np.isfinite(corners).all() or (limits and _outside(corners, limits[0]).any()):
        what = f" ({limits[1]})" if limits else ""
        raise SourceError(f"the raster's extent {extent} lies outside the range of "
                          f"{describe(crs)}{what}; check its georeferencing and source_crs")
    try:
        lonlat = Transformer.from_crs(crs, WGS84, always_xy=True).transform_bounds(
            *bounds, densify_pts=21)
    except ProjError as error:
        raise SourceError(f"the raster's CRS ({describe(crs)}) cannot be transformed to WGS84 "
                          f"({error}); give source_crs (e.g. EPSG:4524)") from None
    if not np.isfinite(lonlat).all() or _outside(np.array(lonlat).reshape(2, 2),
                                                  GEOGRAPHIC_RANGE).any():
        raise SourceError(f"the raster's extent {extent} cannot be transformed from "
                          f"{describe(crs)} to longitude and latitude; check its "
                          "georeferencing and source_crs")


def valid_range(crs: CRS) -> tuple[tuple[float, float, float, float], str] | None:
    """(xmin, ymin, xmax, ymax) in ``crs``'s own units and a description, or None when the
    CRS gives none (no area of use, or one across the antimeridian)."""
    if crs.is_geographic:
        return GEOGRAPHIC_RANGE, "longitude -180..180, latitude -90..90"
    area = _area_of_use(crs)
    if not crs.is_projected or area is None or area.west > area.east:
        return None
    margin = AREA_MARGIN_DEG
    box = (max(area.west - margin, -180.0), max(area.south - margin, -90.0),
           min(area.east + margin, 180.0), min(area.north + margin, 90.0))
    try:
        bounds = Transformer.from_crs(WGS84, crs, always_xy=True).transform_bounds(
            *box, densify_pts=21)
    except ProjError:
        return None
    if not np.isfinite(bounds).all():
        return None
    xmin, ymin, xmax, ymax = (float(b) for b in bounds)
    what = (f"its area of use, {area.name.rstrip('.')}: {area.west:g}..{area.east:g}°E, "
            f"{area.south:g}..{area.north:g}°N, with a {margin:g}° margin")
    return (xmin, ymin, xmax, ymax), what


def _area_of_use(crs: CRS):
    """The CRS's area of use; a CRS read from a .prj or GeoTIFF keys has none of its own, but
    the EPSG definition it matches has."""
    if crs.area_of_use is not None:
        return crs.area_of_use
    authority = crs.to_authority(min_confidence=70)
    if authority is None:
        return None
    try:
        return CRS.from_authority(*authority).area_of_use
    except CRSError:
        return None


def _outside(xy: np.ndarray, bounds) -> np.ndarray:
    xmin, ymin, xmax, ymax = bounds
    return (xy[:, 0] < xmin) | (xy[:, 0] > xmax) | (xy[:, 1] < ymin) | (xy[:, 1] > ymax)


def _bad(places: Places, bad_vertices: np.ndarray, what: str) -> str:
    features = np.unique(places.feature[bad_vertices])
    first_vertex = int(np.flatnonzero(bad_vertices)[0])
    first = int(places.feature[first_vertex])
    return (f"{len(features)} of {places.count} {places.unit}s {what}; first: "
            f"{places.name(first)} at {places.at(first_vertex)}")


def _swapped(places: Places, outside: np.ndarray, crs: CRS) -> str:
    """Every bad coordinate is in range once its two values change places."""
    first_vertex = int(np.flatnonzero(outside)[0])
    features = np.unique(places.feature[outside])
    geographic = crs.is_geographic
    if places.columns:
        x_name, y_name = places.columns
        head = (f"the columns look swapped: {x_name} holds "
                f"{'latitudes' if geographic else 'northings'} and {y_name} "
                f"{'longitudes' if geographic else 'eastings'}")
    else:
        head = ("the coordinates look swapped: "
                + ("latitude comes before longitude (GeoJSON, KML and Shapefiles put "
                   "longitude first)" if geographic else "northing comes before easting"))
    tail = ""
    if geographic:
        west, south, east, north = MUNICIPALITY_BBOX
        lat, lon = places.xy[first_vertex]
        if west <= lon <= east and south <= lat <= north:
            tail = "; swapped, they lie in Chongqing"
    first = int(places.feature[first_vertex])
    return (f"{head} ({len(features)} of {places.count} {places.unit}s lie outside the range "
            f"of {describe(crs)} as given and inside it swapped; first: {places.name(first)} "
            f"at {places.at(first_vertex)}){tail}; swap them and upload again")


def _number(value: float) -> str:
    """Up to millimetres of a Gauss-Krüger easting with its zone number (8 digits + 3)."""
    return format(float(value), ".12g")
