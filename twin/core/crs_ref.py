"""Coordinate reference systems features are served in, by reference (OGC API – Features Part 2).

Storage is EPSG:4326 with longitude first, which is OGC's CRS84 (the storage CRS and the
default). A client names another CRS by its URI; each is served in its *authority* axis order,
as Part 2 requires: EPSG:4326 and EPSG:4490 latitude first, the CGCS2000 Gauss-Krüger zones
northing first. The axis order comes from PROJ's definition, not from a hand-written table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np
from pyproj import CRS, Transformer
from pyproj.exceptions import ProjError

from twin.core.errors import InvalidParameter

CRS84 = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
EPSG_URI = "http://www.opengis.net/def/crs/EPSG/0/"

# WGS 84 (lat/lon), CGCS2000 (lat/lon), Web Mercator, and CGCS2000 3-degree Gauss-Krüger over
# Chongqing (105.3–110.2°E): zones 35–37 with the zone number in the false easting (4523–4525)
# and the same central meridians without it (4544–4546).
SERVED_EPSG = (4326, 4490, 3857, 4523, 4524, 4525, 4544, 4545, 4546)

_EPSG_FORMS = (re.compile(r"^https?://www\.opengis\.net/def/crs/EPSG/0/(\d+)$", re.IGNORECASE),
               re.compile(r"^\[?EPSG:(\d+)\]?$", re.IGNORECASE))
_CRS84_FORMS = re.compile(r"^(https?://www\.opengis\.net/def/crs/OGC/1\.3/CRS84|\[?OGC:CRS84\]?)$",
                          re.IGNORECASE)


@dataclass(frozen=True)
class CrsRef:
    uri: str
    # The PostGIS SRID of the CRS (CRS84 is SRID 4326, whose PostGIS order is lon/lat).
    srid: int
    # True where the CRS's first axis points north: coordinates leave PostGIS (always
    # east/north) flipped, and a bbox arrives latitude or northing first.
    north_first: bool
    geographic: bool
    name: str

    @property
    def is_storage(self) -> bool:
        return self.uri == CRS84

    def axis_names(self) -> str:
        if self.geographic:
            return "lat,lon" if self.north_first else "lon,lat"
        return "northing,easting" if self.north_first else "easting,northing"


def _from_epsg(code: int) -> CrsRef:
    crs = CRS.from_epsg(code)
    north_first = crs.axis_info[0].direction in ("north", "south")
    return CrsRef(f"{EPSG_URI}{code}", code, north_first, crs.is_geographic, crs.name)


@cache
def served() -> dict[str, CrsRef]:
    """Every CRS features are served in, by URI; CRS84 (the storage CRS) first."""
    refs = [CrsRef(CRS84, 4326, False, True, "WGS 84 (CRS84)")]
    refs += [_from_epsg(code) for code in SERVED_EPSG]
    return {ref.uri: ref for ref in refs}


def served_uris() -> list[str]:
    return list(served())


def resolve(value: str | None, parameter: str) -> CrsRef:
    """The CRS a parameter names (its URI; ``EPSG:n``/``[EPSG:n]`` and ``OGC:CRS84`` also do);
    absent, CRS84. An unknown one is an InvalidParameter listing the served ones."""
    if value is None:
        return served()[CRS84]
    text = value.strip()
    if _CRS84_FORMS.match(text):
        return served()[CRS84]
    for form in _EPSG_FORMS:
        match = form.match(text)
        if match:
            ref = served().get(f"{EPSG_URI}{int(match.group(1))}")
            if ref is not None:
                return ref
    raise InvalidParameter(
        f"{parameter}: {value!r} is not a CRS twin serves features in; use one of these URIs: "
        + ", ".join(f"{uri} ({ref.name})" for uri, ref in served().items()))


def lonlat_bounds(ref: CrsRef, bounds: tuple[float, float, float, float]
                  ) -> tuple[float, float, float, float]:
    """A (lon, lat) box that contains the east/north box ``bounds`` of ``ref``: a coarse
    first filter for the spatial index, so it is widened a little. Where PROJ cannot take the
    box's outline back to lon/lat and forth again to within a metre (a box reaching outside
    the projection's domain), the whole world: the exact test in ``ref`` still decides."""
    world = (-180.0, -90.0, 180.0, 90.0)
    west, south, east, north = bounds
    steps = np.linspace(0.0, 1.0, _OUTLINE_POINTS)
    xs = np.concatenate([west + (east - west) * steps, np.full_like(steps, east),
                         east - (east - west) * steps, np.full_like(steps, west)])
    ys = np.concatenate([np.full_like(steps, south), south + (north - south) * steps,
                         np.full_like(steps, north), north - (north - south) * steps])
    back, forth = _transformers(ref.srid)
    try:
        lons, lats = back.transform(xs, ys, errcheck=True)
        again_x, again_y = forth.transform(lons, lats, errcheck=True)
    except ProjError:
        return world
    values = np.concatenate([lons, lats, again_x, again_y])
    if not np.isfinite(values).all() or max(np.abs(again_x - xs).max(),
                                            np.abs(again_y - ys).max()) > 1.0:
        return world
    lon_min, lon_max, lat_min, lat_max = lons.min(), lons.max(), lats.min(), lats.max()
    if lon_max - lon_min > 180.0:  # the outline wraps round the antimeridian
        return world
    margin_x, margin_y = (lon_max - lon_min) * 0.01 + 1e-6, (lat_max - lat_min) * 0.01 + 1e-6
    return (max(float(lon_min - margin_x), -180.0), max(float(lat_min - margin_y), -90.0),
            min(float(lon_max + margin_x), 180.0), min(float(lat_max + margin_y), 90.0))


# Points per edge of a projected box's outline: its edges bend in lon/lat, by centimetres
# between points this close even for a box of a few hundred kilometres.
_OUTLINE_POINTS = 257


@cache
def _transformers(srid: int) -> tuple[Transformer, Transformer]:
    """East/north of ``srid`` to lon/lat, and back."""
    crs, crs84 = CRS.from_epsg(srid), CRS.from_user_input("OGC:CRS84")
    return (Transformer.from_crs(crs, crs84, always_xy=True),
            Transformer.from_crs(crs84, crs, always_xy=True))
