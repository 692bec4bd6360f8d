"""Source CRS and offset datum of an upload, and the way to EPSG:4326.

pyproj knows CGCS2000 and its Gauss-Krüger zones (EPSG:4491-4554); GCJ-02 and BD-09 are not CRSs
at all but obfuscations of WGS84 coordinates, undone with prcoords (twin.core.datum) after the
reprojection, and only when the uploader declares them.
"""

from __future__ import annotations

import re
from enum import StrEnum

import geopandas as gpd
import numpy as np
from pyproj import CRS
from pyproj.exceptions import CRSError, ProjError

from twin.core.datum import coords_to_wgs84, geometries_to_wgs84
from twin.core.errors import InvalidParameter


class Datum(StrEnum):
    """The datum an upload's coordinates were recorded in (a str: 'wgs84', 'gcj02', 'bd09')."""

    WGS84 = "wgs84"
    GCJ02 = "gcj02"
    BD09 = "bd09"


DATUMS = tuple(datum.value for datum in Datum)
WGS84 = CRS.from_epsg(4326)
_EPSG = re.compile(r"^(?:EPSG:)?(\d{4,6})$", re.IGNORECASE)
# The municipality of Chongqing (105.28-110.20 E, 28.15-32.21 N; data_samples.terrain).
MUNICIPALITY_BBOX = (105.28, 28.15, 110.20, 32.21)


class SourceError(Exception):
    """The data cannot be placed; the message is the job's reason."""


class MissingCrs(SourceError):
    """Neither the file nor the form names a CRS: uploading again with source_crs= helps
    (the job report says ``"needs": ["source_crs"]`` so a client can ask for it)."""


def parse_source_crs(raw: str | None) -> CRS | None:
    """``EPSG:4524`` (or ``4524``) -> a CRS; anything else is refused (never passed to GDAL)."""
    if raw is None or not raw.strip():
        return None
    match = _EPSG.match(raw.strip())
    if not match:
        raise InvalidParameter(f"source_crs: expected an EPSG code such as 'EPSG:4524', "
                               f"got {raw!r}")
    try:
        return CRS.from_epsg(int(match.group(1)))
    except CRSError:
        raise InvalidParameter(f"source_crs: EPSG:{match.group(1)} is not a known CRS") from None


def parse_datum(raw: str | None) -> Datum:
    datum = (raw or "wgs84").strip().lower().replace("-", "")
    if datum not in DATUMS:
        raise InvalidParameter(f"datum: expected one of {', '.join(DATUMS)}, got {raw!r}")
    return Datum(datum)


def describe(crs: CRS) -> str:
    """A short name for the layers table: 'EPSG:4524', else the CRS's own name."""
    authority = crs.to_authority(min_confidence=70)
    return f"{authority[0]}:{authority[1]}" if authority else crs.name[:32]


def choose_crs(file_crs: CRS | None, declared: CRS | None, missing_reason: str) -> CRS:
    """The declared CRS wins over the file's (a wrong .prj is common); one of them must exist."""
    crs = declared or file_crs
    if crs is None:
        raise MissingCrs(missing_reason)
    return crs


def to_wgs84(frame: gpd.GeoDataFrame, crs: CRS, datum: Datum) -> gpd.GeoDataFrame:
    """Reproject to EPSG:4326 with pyproj, then undo a declared GCJ-02/BD-09 offset."""
    frame = frame.set_crs(crs, allow_override=True)
    if not crs.equals(WGS84):
        try:
            frame = frame.to_crs(WGS84)
        except (CRSError, ProjError) as error:
            # A .prj naming a local or engineering CRS has no way to the earth.
            raise SourceError(f"the data's CRS ({describe(crs)}) cannot be transformed to "
                              f"WGS84 ({error}); give source_crs (e.g. EPSG:4524)") from None
    if datum != Datum.WGS84:
        frame["geometry"] = geometries_to_wgs84(frame.geometry.values, datum)
    return frame.set_crs(WGS84, allow_override=True)


def point_to_wgs84(lon: float, lat: float, datum: Datum) -> tuple[float, float]:
    if datum == Datum.WGS84:
        return lon, lat
    out = coords_to_wgs84(np.array([[lon, lat]]), datum)
    return float(out[0, 0]), float(out[0, 1])


def far_outside(frame: gpd.GeoDataFrame, margin_deg: float) -> int:
    """How many features lie wholly more than ``margin_deg`` outside the municipality's box."""
    west, south, east, north = MUNICIPALITY_BBOX
    bounds = frame.geometry.bounds
    outside = ((bounds.maxx < west - margin_deg) | (bounds.minx > east + margin_deg)
               | (bounds.maxy < south - margin_deg) | (bounds.miny > north + margin_deg))
    return int(outside.sum())


def bbox_far_outside(bbox: list[float], margin_deg: float) -> bool:
    """Whether a (west, south, east, north) box lies wholly ``margin_deg`` outside the city."""
    west, south, east, north = MUNICIPALITY_BBOX
    return (bbox[2] < west - margin_deg or bbox[0] > east + margin_deg
            or bbox[3] < south - margin_deg or bbox[1] > north + margin_deg)
