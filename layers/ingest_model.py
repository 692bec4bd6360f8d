"""glTF/GLB uploads: a checked model file stored with its anchor, heading and CIM level.

The model keeps its own local coordinates (glTF: metres, +Y up); the anchor places its origin
on the map and ``heading`` turns it clockwise from north, as 3D Tiles and MapLibre expect.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from layers.crs import MUNICIPALITY_BBOX, Datum, point_to_wgs84
from layers.safety import check_gltf_json
from twin.core.errors import InvalidParameter

CIM_LEVELS = range(1, 8)


@dataclass(frozen=True)
class Anchor:
    lon: float
    lat: float
    height: float = 0.0
    heading: float = 0.0
    cim_level: int = 3
    # The building of the buildings table the model replaces (its block gives way to the
    # model when the camera is close); checked against the uploader's scope by the request.
    building_id: int | None = None


def parse_anchor(lon: str | None, lat: str | None, height: str | None, heading: str | None,
                 cim_level: str | None, building_id: str | None = None) -> Anchor:
    """The form fields of a 3D upload; lon and lat are required."""
    if lon is None or lat is None:
        raise InvalidParameter("lon, lat: a 3D model needs its anchor point (lon=, lat= in "
                               "degrees; datum= if they come from a commercial map)")
    values = {}
    west, south, east, north = MUNICIPALITY_BBOX
    for name, raw, low, high in (("lon", lon, west, east), ("lat", lat, south, north),
                                 ("height", height or "0", -500, 9000),
                                 ("heading", heading or "0", -360, 360)):
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (low <= value <= high):
            where = " (the municipality of Chongqing)" if name in ("lon", "lat") else ""
            raise InvalidParameter(f"{name}: expected a number in [{low}, {high}]{where}, "
                                   f"got {raw!r}")
        values[name] = value
    try:
        level = int(cim_level or 3)
    except ValueError:
        level = 0
    if level not in CIM_LEVELS:
        raise InvalidParameter(f"cim_level: expected 1-7 (CIM1 ground surface … CIM7 parts), "
                               f"got {cim_level!r}")
    building = None
    if building_id is not None:
        if not building_id.isdigit() or not 0 < int(building_id) < 2**63:
            raise InvalidParameter(f"building_id: expected the id of a building (a positive "
                                   f"integer, as the buildings layer lists), got "
                                   f"{building_id!r}")
        building = int(building_id)
    return Anchor(values["lon"], values["lat"], values["height"], values["heading"] % 360, level,
                  building)


def check_inside_municipality(lon: float, lat: float) -> None:
    """400 unless the anchor, corrected to WGS84 (datum=), still lies in the municipality's
    bounds."""
    west, south, east, north = MUNICIPALITY_BBOX
    if not (west <= lon <= east and south <= lat <= north):
        raise InvalidParameter(
            f"lon, lat: the anchor ({lon:.6f}, {lat:.6f}) lies outside the municipality of "
            f"Chongqing ({west}-{east} E, {south}-{north} N); check lon/lat (degrees, "
            "longitude first) and datum")


def store_model(source: Path, fmt: str, target_dir: Path, anchor: Anchor, datum: Datum
                ) -> dict:
    """Copy the model into its version folder; returns the layer's meta and bbox."""
    target = target_dir / f"model.{fmt}"
    shutil.copyfile(source, target)
    document = _document(target, fmt)
    lon, lat = point_to_wgs84(anchor.lon, anchor.lat, datum)
    meta = {
        "format": fmt, "bytes": target.stat().st_size,
        "anchor": {"lon": lon, "lat": lat, "height": anchor.height},
        "heading": anchor.heading, "cim_level": anchor.cim_level,
        "meshes": len(document.get("meshes") or []), "nodes": len(document.get("nodes") or []),
        "generator": (document.get("asset") or {}).get("generator"),
    }
    if anchor.building_id is not None:
        meta["building_id"] = anchor.building_id
    return {"path": target, "meta": meta, "bbox": [lon, lat, lon, lat]}


def _document(path: Path, fmt: str) -> dict:
    data = path.read_bytes()
    if fmt == "glb":
        length = struct.unpack("<I", data[12:16])[0]
        return check_gltf_json(data[20:20 + length], embedded_buffer=True)
    return json.loads(data.decode("utf-8"))
