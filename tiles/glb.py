"""Binary glTF 2.0 (GLB) content for 3D Tiles 1.1: a `Mesh` and its features' property table.

The GLB holds one node, one mesh and one triangle primitive:
- POSITION float32, relative to the centre of the vertices' bounds in ECEF (EPSG:4978, from
  EPSG:4979 lon/lat/ellipsoidal height through pyproj); the node's translation is that centre
  (relative-to-centre keeps float32 at millimetres). glTF is Y-up and 3D Tiles turns glTF's +Y
  into +Z, so ECEF (x, y, z) is written as glTF (x, z, -y), the translation likewise.
- NORMAL float32, flat: each vertex takes the normal of its faces (producers do not share a
  vertex between faces that are not coplanar); a vertex of no face with area gets the
  ellipsoid's up direction.
- _FEATURE_ID_0 float32 (glTF allows UNSIGNED_INT only for indices; float is exact up to 2^24
  and every client reads it) with EXT_mesh_features pointing at property table 0.
- COLOR_0 normalized uint8 RGBA when the mesh has colours; one PBR material (metallic 0).
- EXT_structural_metadata: schema "twin", one class, one property table (values and string
  offsets in their own buffer views, 8-byte aligned as the extension requires).

NULL values are written as each property's `noData`: "" for strings, the type's maximum for
unsigned integers, its minimum for INT64 and the lowest finite value for floats (NaN too).

Everything is laid out with numpy and json directly: a tile of 1,000 blocks takes a few
milliseconds, where building it through pygltflib's object model takes far longer.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pyproj

from tiles.meshes import Mesh

PROPERTY_TYPES = ("STRING", "UINT8", "UINT16", "UINT32", "INT64", "FLOAT32", "FLOAT64")

_DTYPES: dict[str, Any] = {
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "INT64": np.int64,
    "FLOAT32": np.float32,
    "FLOAT64": np.float64,
}
_NO_DATA: dict[str, Any] = {
    "STRING": "",
    "UINT8": 255,
    "UINT16": 65535,
    "UINT32": 4294967295,
    "INT64": -9223372036854775808,
    "FLOAT32": float(np.finfo(np.float32).min),
    "FLOAT64": float(np.finfo(np.float64).min),
}
_IDENTIFIER = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

NEUTRAL_COLOUR = [0.86, 0.85, 0.82, 1.0]  # light warm grey, linear RGBA

_GLB_MAGIC = 0x46546C67  # "glTF"
_CHUNK_JSON = 0x4E4F534A
_CHUNK_BIN = 0x004E4942
_FLOAT = 5126
_UNSIGNED_BYTE = 5121
_UNSIGNED_SHORT = 5123
_UNSIGNED_INT = 5125
_ARRAY_BUFFER = 34962
_ELEMENT_ARRAY_BUFFER = 34963


@dataclass
class Property:
    """One column of the property table: `values` has one entry per feature (None = no data)."""

    name: str
    type: str
    values: Sequence[Any]


@dataclass
class FeatureTable:
    """The features' properties; row i belongs to the vertices whose feature is i."""

    class_name: str
    properties: list[Property] = field(default_factory=list)


@lru_cache(maxsize=1)
def _to_ecef() -> pyproj.Transformer:
    return pyproj.Transformer.from_crs("EPSG:4979", "EPSG:4978", always_xy=True)


def ecef(positions: np.ndarray) -> np.ndarray:
    """(V, 3) lon deg, lat deg, ellipsoidal height m -> (V, 3) ECEF metres."""
    x, y, z = _to_ecef().transform(positions[:, 0], positions[:, 1], positions[:, 2])
    return np.column_stack((x, y, z))


class _Buffer:
    """The BIN chunk, built as a list of parts, each view starting 8-byte aligned."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.length = 0
        self.views: list[dict[str, Any]] = []

    def view(self, data: bytes, target: int | None = None) -> int:
        pad = (-self.length) % 8
        if pad:
            self.parts.append(b"\0" * pad)
            self.length += pad
        view: dict[str, Any] = {"buffer": 0, "byteOffset": self.length, "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        self.parts.append(data)
        self.length += len(data)
        self.views.append(view)
        return len(self.views) - 1

    def tobytes(self) -> bytes:
        pad = (-self.length) % 8
        return b"".join(self.parts) + b"\0" * pad


def _flat_normals(rel: np.ndarray, triangles: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per-vertex normals in glTF axes: the area-weighted sum of the vertex's face normals,
    normalised; the ellipsoid's up direction where that sum vanishes (no face with area)."""
    a, b, c = rel[triangles[:, 0]], rel[triangles[:, 1]], rel[triangles[:, 2]]
    face = np.cross(b - a, c - a)
    idx = triangles.ravel()
    n = len(rel)
    normals = np.column_stack(
        [np.bincount(idx, np.repeat(face[:, k], 3), minlength=n) for k in range(3)]
    )
    length = np.sqrt(np.einsum("ij,ij->i", normals, normals))
    bad = length < 1e-12
    if bad.any():
        lon, lat = np.radians(positions[bad, 0]), np.radians(positions[bad, 1])
        # ECEF up (cos lat cos lon, cos lat sin lon, sin lat) in glTF axes (x, z, -y).
        normals[bad] = np.column_stack(
            (np.cos(lat) * np.cos(lon), np.sin(lat), -np.cos(lat) * np.sin(lon))
        )
        length[bad] = 1.0
    return normals / length[:, None]


def _property_values(prop: Property) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The class property definition and the arrays of one property table column."""
    if prop.type not in PROPERTY_TYPES:
        raise ValueError(f"property {prop.name!r}: type {prop.type!r} not in {PROPERTY_TYPES}")
    if not _IDENTIFIER.match(prop.name):
        raise ValueError(f"property name {prop.name!r} is not an identifier")
    no_data = _NO_DATA[prop.type]
    if prop.type == "STRING":
        missing = any(v is None for v in prop.values)
        encoded = [b"" if v is None else str(v).encode("utf-8") for v in prop.values]
        offsets = np.zeros(len(encoded) + 1, np.uint64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        if offsets[-1] > np.iinfo(np.uint32).max:
            raise ValueError(f"property {prop.name!r}: strings exceed 4 GiB")
        definition: dict[str, Any] = {"type": "STRING"}
        if missing:
            definition["noData"] = no_data
        # glTF forbids an empty bufferView: all-empty strings keep one byte no offset reaches.
        arrays: dict[str, np.ndarray] = {
            "values": np.frombuffer(b"".join(encoded) or b"\0", np.uint8),
            "stringOffsets": offsets.astype(np.uint32),
        }
        return definition, arrays
    dtype = np.dtype(_DTYPES[prop.type])
    definition = {"type": "SCALAR", "componentType": prop.type}
    if dtype.kind == "f":
        values = np.asarray([np.nan if v is None else v for v in prop.values], np.float64)
        missing_mask = np.isnan(values)
        if dtype == np.float32:
            finite = values[~missing_mask]
            if np.any(np.abs(finite) > np.finfo(np.float32).max):
                raise ValueError(f"property {prop.name!r}: value outside FLOAT32")
    else:
        missing_mask = np.array([v is None for v in prop.values], bool)
        try:
            raw = np.array([0 if v is None else v for v in prop.values])
        except OverflowError as exc:
            raise ValueError(f"property {prop.name!r}: value outside {prop.type}") from exc
        if raw.dtype.kind == "f" and np.all(np.isfinite(raw)) and np.all(raw == np.round(raw)):
            raw = raw.astype(np.int64)
        if raw.dtype.kind not in "iub":
            raise ValueError(f"property {prop.name!r}: {prop.type} needs integers")
        info = np.iinfo(dtype)
        present = raw[~missing_mask]
        upper = info.max - 1 if missing_mask.any() else info.max  # max is the no-data value
        lower = info.min + 1 if missing_mask.any() and dtype.kind == "i" else info.min
        if len(present) and (present.min() < lower or present.max() > upper):
            raise ValueError(f"property {prop.name!r}: value outside {prop.type}")
        values = raw
    if missing_mask.any():
        definition["noData"] = no_data
        values = np.where(missing_mask, no_data, values)
    return definition, {"values": np.asarray(values).astype(dtype)}


def _metadata(table: FeatureTable, buf: _Buffer) -> tuple[dict[str, Any], int]:
    if not _IDENTIFIER.match(table.class_name):
        raise ValueError(f"class name {table.class_name!r} is not an identifier")
    if not table.properties:
        raise ValueError("a feature table needs at least one property")
    count = len(table.properties[0].values)
    if count == 0:
        raise ValueError("a feature table needs at least one row")
    class_properties: dict[str, Any] = {}
    table_properties: dict[str, Any] = {}
    for prop in table.properties:
        if len(prop.values) != count:
            raise ValueError(f"property {prop.name!r} has {len(prop.values)} values, not {count}")
        if prop.name in class_properties:
            raise ValueError(f"property {prop.name!r} twice")
        definition, arrays = _property_values(prop)
        class_properties[prop.name] = definition
        column: dict[str, Any] = {"values": buf.view(arrays["values"].tobytes())}
        if "stringOffsets" in arrays:
            column["stringOffsets"] = buf.view(arrays["stringOffsets"].tobytes())
            column["stringOffsetType"] = "UINT32"
        table_properties[prop.name] = column
    extension = {
        "schema": {"id": "twin", "classes": {table.class_name: {"properties": class_properties}}},
        "propertyTables": [
            {"class": table.class_name, "count": count, "properties": table_properties}
        ],
    }
    return extension, count


def glb(mesh: Mesh, table: FeatureTable, *, double_sided: bool = False) -> bytes:
    """The mesh and its property table as a GLB 2.0 for a 3D Tiles 1.1 tile.

    `double_sided` draws back faces too (for surfaces of unknown orientation, such as
    uploaded ones); the producers here wind every face outwards, so the default culls them.
    Raises ValueError for a malformed table or feature rows beyond it.
    """
    buf = _Buffer()
    accessors: list[dict[str, Any]] = []
    doc: dict[str, Any] = {
        "asset": {"version": "2.0", "generator": "twin tiles/glb.py"},
        "extensionsUsed": ["EXT_mesh_features", "EXT_structural_metadata"],
        "scene": 0,
    }
    triangles = np.asarray(mesh.triangles, np.uint32).reshape(-1, 3)
    # Triangles that repeat a vertex have no area and no face (the validator reports them).
    t0, t1, t2 = triangles.T
    triangles = triangles[(t0 != t1) & (t1 != t2) & (t2 != t0)]
    positions = np.asarray(mesh.positions, np.float64)
    n = len(positions)

    metadata, count = _metadata(table, buf)
    doc["extensions"] = {"EXT_structural_metadata": metadata}
    if not len(triangles):
        doc["scenes"] = [{}]  # no geometry: a scene without nodes
        return _pack(doc, accessors, buf)
    if triangles.max() >= n:
        raise ValueError("a triangle refers to a vertex beyond the positions")
    feature = np.asarray(mesh.feature, np.uint32)
    if len(feature) != n:
        raise ValueError("one feature row per vertex")
    if count > 1 << 24:
        raise ValueError("feature ids are float32: at most 16,777,216 rows per table")
    if feature.max() >= count:
        raise ValueError(f"feature row {int(feature.max())} beyond the table's {count} rows")

    xyz = ecef(positions)
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    centre = (lo + hi) / 2.0
    rel = xyz - centre
    # ECEF (x, y, z) -> glTF Y-up (x, z, -y); 3D Tiles turns it back on loading.
    rel = np.column_stack((rel[:, 0], rel[:, 2], -rel[:, 1]))
    normals = _flat_normals(rel, triangles, positions).astype(np.float32)
    pos32 = rel.astype(np.float32)

    def accessor(data: np.ndarray, component: int, kind: str, target: int, **extra: Any) -> int:
        view = buf.view(np.ascontiguousarray(data).tobytes(), target)
        accessors.append(
            {"bufferView": view, "componentType": component, "count": len(data), "type": kind}
            | extra
        )
        return len(accessors) - 1

    attributes = {
        "POSITION": accessor(
            pos32,
            _FLOAT,
            "VEC3",
            _ARRAY_BUFFER,
            min=[float(v) for v in pos32.min(axis=0)],
            max=[float(v) for v in pos32.max(axis=0)],
        ),
        "NORMAL": accessor(normals, _FLOAT, "VEC3", _ARRAY_BUFFER),
        "_FEATURE_ID_0": accessor(feature.astype(np.float32), _FLOAT, "SCALAR", _ARRAY_BUFFER),
    }
    material: dict[str, Any] = {
        "pbrMetallicRoughness": {
            "baseColorFactor": NEUTRAL_COLOUR,
            "metallicFactor": 0.0,
            "roughnessFactor": 0.9,
        }
    }
    if double_sided:
        material["doubleSided"] = True
    if mesh.colors is not None:
        colors = np.asarray(mesh.colors, np.uint8).reshape(n, 4)
        attributes["COLOR_0"] = accessor(
            colors, _UNSIGNED_BYTE, "VEC4", _ARRAY_BUFFER, normalized=True
        )
        material["pbrMetallicRoughness"]["baseColorFactor"] = [1.0, 1.0, 1.0, 1.0]
        if colors[:, 3].min() < 255:
            material["alphaMode"] = "BLEND"
    if n < 65536:
        index_data, index_type = triangles.astype(np.uint16).ravel(), _UNSIGNED_SHORT
    else:
        index_data, index_type = triangles.ravel(), _UNSIGNED_INT
    indices = accessor(index_data, index_type, "SCALAR", _ELEMENT_ARRAY_BUFFER)
    feature_count = int(np.count_nonzero(np.bincount(feature[triangles.ravel()])))
    doc["scenes"] = [{"nodes": [0]}]
    doc["nodes"] = [
        {"mesh": 0, "translation": [float(centre[0]), float(centre[2]), float(-centre[1])]}
    ]
    doc["materials"] = [material]
    doc["meshes"] = [
        {
            "primitives": [
                {
                    "attributes": attributes,
                    "indices": indices,
                    "material": 0,
                    "mode": 4,
                    "extensions": {
                        "EXT_mesh_features": {
                            "featureIds": [
                                {"featureCount": feature_count, "attribute": 0, "propertyTable": 0}
                            ]
                        }
                    },
                }
            ]
        }
    ]
    return _pack(doc, accessors, buf)


def _dumps(value: Any) -> str:
    """Compact JSON of the document, floats written exactly (shortest round-trip repr).

    Not `json.dumps`: its float formatting is module state a library can replace process-wide
    (cjio's reader does: 6 decimals), which would break accessor min/max; the GLB's JSON is
    small, so writing it here costs nothing measurable.
    """
    if isinstance(value, dict):
        return "{" + ",".join(f"{_string(k)}:{_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    if isinstance(value, str):
        return _string(value)
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return int.__repr__(int(value))
    if isinstance(value, float | np.floating):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("glTF JSON has no NaN or infinity")
        return float.__repr__(number)
    if value is None:
        return "null"
    raise TypeError(f"not JSON: {type(value).__name__}")


def _string(text: str) -> str:
    return json.encoder.encode_basestring(text)


def _pack(doc: dict[str, Any], accessors: list[dict[str, Any]], buf: _Buffer) -> bytes:
    binary = buf.tobytes()
    if accessors:
        doc["accessors"] = accessors
    if buf.views:
        doc["bufferViews"] = buf.views
        doc["buffers"] = [{"byteLength": len(binary)}]
    text = _dumps(doc).encode("utf-8")
    # Pad the JSON with spaces so the BIN chunk's data starts 8-byte aligned in the file
    # (12-byte header + 8-byte chunk header + JSON + 8-byte chunk header): typed arrays of
    # 8-byte values (INT64, FLOAT64 columns) can then view the file's bytes directly.
    text += b" " * ((4 - len(text)) % 8)
    chunks = struct.pack("<II", len(text), _CHUNK_JSON) + text
    if binary:
        chunks += struct.pack("<II", len(binary), _CHUNK_BIN) + binary
    return struct.pack("<III", _GLB_MAGIC, 2, 12 + len(chunks)) + chunks
