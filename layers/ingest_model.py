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

from layers.crs import Datum, point_to_wgs84
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


def parse_anchor(lon: str | None, lat: str | None, height: str | None, heading: str | None,
                 cim_level: str | None) -> Anchor:
    """The form fields of a 3D upload; lon and lat are required."""
    if lon is None or lat is None:
        raise InvalidParameter("lon, lat: a 3D model needs its anchor point (lon=, lat= in "
                               "degrees; datum= if they come from a commercial map)")
    values = {}
    for name, raw, low, high in (("lon", lon, -180, 180), ("lat", lat, -90, 90),
                                 ("height", height or "0", -500, 9000),
                                 ("heading", heading or "0", -360, 360)):
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (low <= value <= high):
            raise InvalidParameter(f"{name}: expected a number in [{low}, {high}], got {raw!r}")
        values[name] = value
    try:
        level = int(cim_level or 3)
    except ValueError:
        level = 0
    if level not in CIM_LEVELS:
        raise InvalidParameter(f"cim_level: expected 1-7 (CIM1 ground surface … CIM7 parts), "
                               f"got {cim_level!r}")
    return Anchor(values["lon"], values["lat"], values["height"], values["heading"] % 360, level)


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
    return {"path": target, "meta": meta, "bbox": [lon, lat, lon, lat]}


def _document(path: Path, fmt: str) -> dict:
    data = path.read_bytes()
    if fmt == "glb":
        length = struct.unpack("<I", data[12:16])[0]
        return check_gltf_json(data[20:20 + length], embedded_buffer=True)
    return json.loads(data.decode("utf-8"))
