"""CIM4-6 models as 3D Tiles content: where a model layer stands and the GLB a tile serves.

A model layer (kind '3d': an uploaded glTF/GLB or one of the sample's models) keeps its own
local coordinates: glTF metres, +Y up. Its ``meta`` places it: ``anchor`` {lon, lat, height}
(height in metres above the WGS84 ellipsoid) is the model's origin and ``heading`` turns it
clockwise from north. 3D Tiles first turns glTF's Y-up content to Z-up ((x, y, z) ->
(x, -z, y)), then applies the tile's transform; ``model_transform`` is that transform: the
local east/north/up frame at the anchor, turned by the heading. So glTF +X points east, -Z
north and +Y up when the heading is 0; at heading 90, +X points south.

Library only (no HTTP): twin/api/routes/tiles3d.py and tiles/tileset3d.py serve these.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import trimesh
from pyproj import Transformer

from twin.core.errors import InvalidParameter
from twin.core.layer import Layer
from twin.core.local_files import local_path

_TO_ECEF = Transformer.from_crs("EPSG:4979", "EPSG:4978", always_xy=True)
_TO_GEODETIC = Transformer.from_crs("EPSG:4978", "EPSG:4979", always_xy=True)
GLB_MAGIC = b"glTF"
JSON_CHUNK = 0x4E4F534A
BIN_CHUNK = 0x004E4942
ARRAY_BUFFER = 34962
FLOAT = 5126
FEATURE_ID = "_FEATURE_ID_0"
MESH_FEATURES = "EXT_mesh_features"
STRUCTURAL_METADATA = "EXT_structural_metadata"
CLASS_NAME = "building"
# The properties a model's one feature carries, in this order (the lead's building tiles
# carry the same names).
PROPERTIES = ("id", "name", "height", "floors", "cim_level", "district_code", "street_code")
# Bounds of a model's region: vertices are exact, this covers float32 rounding of the
# positions and the curvature between them.
REGION_MARGIN_M = 1.0


# --- placing ---------------------------------------------------------------------------------

def _anchor(meta: dict) -> tuple[float, float, float, float]:
    anchor = meta.get("anchor") or {}
    try:
        return (float(anchor["lon"]), float(anchor["lat"]), float(anchor.get("height") or 0.0),
                float(meta.get("heading") or 0.0))
    except (KeyError, TypeError, ValueError):
        raise InvalidParameter("the model layer has no anchor {lon, lat, height}") from None


def enu_axes(lon: float, lat: float) -> np.ndarray:
    """The unit vectors east, north and up (rows) at a geodetic point, in ECEF."""
    lam, phi = math.radians(lon), math.radians(lat)
    return np.array([
        [-math.sin(lam), math.cos(lam), 0.0],
        [-math.sin(phi) * math.cos(lam), -math.sin(phi) * math.sin(lam), math.cos(phi)],
        [math.cos(phi) * math.cos(lam), math.cos(phi) * math.sin(lam), math.sin(phi)],
    ])


def transform_matrix(meta: dict) -> np.ndarray:
    """The 4x4 matrix (row-major numpy) from the tile's Z-up frame to ECEF."""
    lon, lat, height, heading = _anchor(meta)
    east, north, up = enu_axes(lon, lat)
    h = math.radians(heading)
    # Turned clockwise (seen from above) by the heading: local +Y points to azimuth h, local
    # +X to azimuth h + 90°.
    x_axis = math.cos(h) * east - math.sin(h) * north
    y_axis = math.sin(h) * east + math.cos(h) * north
    origin = np.array(_TO_ECEF.transform(lon, lat, height))
    matrix = np.identity(4)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2], matrix[:3, 3] = x_axis, y_axis, up, origin
    return matrix


def model_transform(meta: dict) -> list[float]:
    """16 floats, column-major (3D Tiles' ``tile.transform``): the model's frame in ECEF."""
    return [float(v) for v in transform_matrix(meta).T.ravel()]


def gltf_to_ecef(meta: dict, points: np.ndarray) -> np.ndarray:
    """glTF (Y-up) model coordinates (N, 3) to ECEF, as a 3D Tiles client places them."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    z_up = np.column_stack([points[:, 0], -points[:, 2], points[:, 1], np.ones(len(points))])
    return (transform_matrix(meta) @ z_up.T).T[:, :3]


def ecef_to_geodetic(points: np.ndarray) -> np.ndarray:
    """ECEF (N, 3) to lon°, lat°, ellipsoidal height m."""
    lon, lat, h = _TO_GEODETIC.transform(points[:, 0], points[:, 1], points[:, 2])
    return np.column_stack([lon, lat, h])


# --- the model file ----------------------------------------------------------------------------

def _path(layer: Layer) -> Path:
    if layer.kind != "3d" or not layer.file_path:
        raise InvalidParameter(f"layer '{layer.id}' is not a 3D model layer")
    return local_path(layer)  # an upload's is fetched on first use


def model_vertices(layer: Layer) -> np.ndarray:
    """Every vertex of the model's scene (node transforms applied), glTF coordinates."""
    path = _path(layer)
    return _vertices(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=32)
def _vertices(path: Path, modified_ns: int) -> np.ndarray:
    scene = trimesh.load(str(path), force="scene")
    assert isinstance(scene, trimesh.Scene)
    parts = []
    for node in scene.graph.nodes_geometry:
        matrix, name = scene.graph[node]
        geometry = scene.geometry[name]
        vertices = getattr(geometry, "vertices", None)
        if vertices is not None and len(vertices):
            parts.append(trimesh.transform_points(np.asarray(vertices), matrix))
    if not parts:
        return np.zeros((1, 3))
    return np.concatenate(parts)


def model_region(layer: Layer) -> list[float]:
    """[west, south, east, north] in radians and [min, max] height in metres that hold every
    vertex of the model as placed (REGION_MARGIN_M of margin)."""
    path = _path(layer)
    lon, lat, height, heading = _anchor(layer.meta)
    return list(_region(path, path.stat().st_mtime_ns, lon, lat, height, heading))


@lru_cache(maxsize=64)
def _region(path: Path, modified_ns: int, lon: float, lat: float, height: float,
            heading: float) -> tuple[float, ...]:
    meta = {"anchor": {"lon": lon, "lat": lat, "height": height}, "heading": heading}
    vertices = _vertices(path, modified_ns)
    hull = trimesh.convex.hull_points(vertices) if len(vertices) > 64 else vertices
    geodetic = ecef_to_geodetic(gltf_to_ecef(meta, np.asarray(hull)))
    lons, lats, heights = geodetic[:, 0], geodetic[:, 1], geodetic[:, 2]
    mid_lat = math.radians(float(lats.mean()))
    lat_margin = REGION_MARGIN_M / 6_356_752.0
    lon_margin = REGION_MARGIN_M / (6_378_137.0 * max(math.cos(mid_lat), 1e-6))
    return (math.radians(float(lons.min())) - lon_margin,
            math.radians(float(lats.min())) - lat_margin,
            math.radians(float(lons.max())) + lon_margin,
            math.radians(float(lats.max())) + lat_margin,
            float(heights.min()) - REGION_MARGIN_M, float(heights.max()) + REGION_MARGIN_M)


# --- GLB content ----------------------------------------------------------------------------

def read_gltf(path: Path) -> tuple[dict, bytes]:
    """The glTF JSON and its one binary buffer: a GLB's BIN chunk, or a .gltf's embedded
    (data: URI) buffers joined into one."""
    data = path.read_bytes()
    if data[:4] == GLB_MAGIC:
        json_length, json_type = struct.unpack("<II", data[12:20])
        if json_type != JSON_CHUNK:
            raise InvalidParameter(f"{path.name}: the first GLB chunk is not JSON")
        document = json.loads(data[20:20 + json_length].decode("utf-8").rstrip(" \x00"))
        rest = 20 + json_length
        binary = b""
        if rest + 8 <= len(data):
            bin_length, bin_type = struct.unpack("<II", data[rest:rest + 8])
            if bin_type == BIN_CHUNK:
                binary = data[rest + 8:rest + 8 + bin_length]
        return document, binary
    document = json.loads(data.decode("utf-8"))
    return _embed_buffers(document)


def _embed_buffers(document: dict) -> tuple[dict, bytes]:
    """A .gltf's data-URI buffers as one GLB BIN buffer (buffer views rebased)."""
    blob = bytearray()
    starts = []
    for buffer in document.get("buffers") or []:
        _pad(blob, 8)
        starts.append(len(blob))
        uri = str(buffer.get("uri") or "")
        if not uri.startswith("data:") or "," not in uri:
            raise InvalidParameter("a .gltf model's buffers must be embedded (data: URIs)")
        header, payload = uri.split(",", 1)
        raw = base64.b64decode(payload) if header.endswith(";base64") else payload.encode()
        blob += raw[:int(buffer.get("byteLength", len(raw)))]
    for view in document.get("bufferViews") or []:
        view["byteOffset"] = int(view.get("byteOffset", 0)) + starts[int(view.get("buffer", 0))]
        view["buffer"] = 0
    for image in document.get("images") or []:
        uri = str(image.get("uri") or "")
        if uri.startswith("data:") and "," in uri:
            header, payload = uri.split(",", 1)
            raw = base64.b64decode(payload) if header.endswith(";base64") else payload.encode()
            _pad(blob, 8)
            document.setdefault("bufferViews", []).append(
                {"buffer": 0, "byteOffset": len(blob), "byteLength": len(raw)})
            blob += raw
            image.pop("uri")
            image["bufferView"] = len(document["bufferViews"]) - 1
            image["mimeType"] = header[5:].split(";")[0] or "image/png"
    document["buffers"] = [{"byteLength": len(blob)}] if blob else []
    return document, bytes(blob)


def _pad(blob: bytearray, alignment: int) -> None:
    blob += b"\x00" * (-len(blob) % alignment)


def _view(document: dict, blob: bytearray, payload: bytes, target: int | None = None) -> int:
    _pad(blob, 8)
    view: dict = {"buffer": 0, "byteOffset": len(blob), "byteLength": len(payload)}
    if target is not None:
        view["target"] = target
    document.setdefault("bufferViews", []).append(view)
    blob += payload
    return len(document["bufferViews"]) - 1


def _property(name: str, value: object) -> tuple[dict, bytes, bytes | None] | None:
    """A property's class definition, values and (strings) offsets; None for no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if -2**31 <= value < 2**31:
            return {"type": "SCALAR", "componentType": "INT32"}, struct.pack("<i", value), None
        return {"type": "SCALAR", "componentType": "INT64"}, struct.pack("<q", value), None
    if isinstance(value, (float, np.floating)):
        return {"type": "SCALAR", "componentType": "FLOAT64"}, struct.pack("<d", value), None
    raw = str(value).encode("utf-8")
    return {"type": "STRING"}, raw, struct.pack("<II", 0, len(raw))


def with_feature(document: dict, binary: bytes, row: dict) -> tuple[dict, bytes]:
    """One feature over the whole model: ``_FEATURE_ID_0`` (0) on every primitive,
    EXT_mesh_features pointing at a one-row property table of ``row``."""
    blob = bytearray(binary)
    accessors = document.setdefault("accessors", [])
    by_count: dict[int, int] = {}
    for mesh in document.get("meshes") or []:
        for primitive in mesh.get("primitives") or []:
            attributes = primitive.setdefault("attributes", {})
            if "POSITION" not in attributes:
                continue
            count = int(accessors[attributes["POSITION"]]["count"])
            if count not in by_count:
                view = _view(document, blob, bytes(4 * count), ARRAY_BUFFER)
                accessors.append({"bufferView": view, "componentType": FLOAT, "count": count,
                                  "type": "SCALAR", "min": [0.0], "max": [0.0]})
                by_count[count] = len(accessors) - 1
            attributes[FEATURE_ID] = by_count[count]
            extensions = primitive.setdefault("extensions", {})
            extensions[MESH_FEATURES] = {"featureIds": [
                {"featureCount": 1, "attribute": 0, "propertyTable": 0}]}
    properties, columns = {}, {}
    for name in PROPERTIES:
        made = _property(name, row.get(name))
        if made is None:
            continue
        definition, values, offsets = made
        properties[name] = definition
        column: dict[str, int | str] = {"values": _view(document, blob, values)}
        if offsets is not None:
            column["stringOffsets"] = _view(document, blob, offsets)
            column["stringOffsetType"] = "UINT32"
        columns[name] = column
    document.setdefault("extensions", {})[STRUCTURAL_METADATA] = {
        "schema": {"id": "twin_models", "classes": {CLASS_NAME: {"properties": properties}}},
        "propertyTables": [{"class": CLASS_NAME, "count": 1, "properties": columns}],
    }
    used = document.setdefault("extensionsUsed", [])
    for extension in (MESH_FEATURES, STRUCTURAL_METADATA):
        if extension not in used:
            used.append(extension)
    _pad(blob, 8)
    document["buffers"] = [{"byteLength": len(blob)}]
    for view in document.get("bufferViews") or []:
        view["buffer"] = 0
    return document, bytes(blob)


def to_glb(document: dict, binary: bytes) -> bytes:
    raw = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 4)
    binary = binary + b"\x00" * (-len(binary) % 4)
    chunks = struct.pack("<II", len(raw), JSON_CHUNK) + raw
    if binary:
        chunks += struct.pack("<II", len(binary), BIN_CHUNK) + binary
    return struct.pack("<4sII", GLB_MAGIC, 2, 12 + len(chunks)) + chunks


def model_content(layer: Layer, row: dict) -> bytes:
    """The model as 3D Tiles content: GLB with one feature whose metadata is ``row``."""
    document, binary = read_gltf(_path(layer))
    if document.get("buffers") and not binary and document["buffers"][0].get("uri"):
        document, binary = _embed_buffers(document)
    document, binary = with_feature(document, binary, row)
    return to_glb(document, binary)
