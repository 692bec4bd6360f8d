"""glTF oracles for the tests: the Khronos glTF validator and an independent GLB decoder.

The validator (npm gltf-validator in tests/js) as a Python function:

`validate(glb)` returns the validator's report (a dict: issues.numErrors, issues.messages
with code, message, severity 0 error / 1 warning / 2 info / 3 hint, pointer). One node
process validates a whole list with `validate_all`, which is what suites with many tiles want.

The validator (2.0.0-dev.3.10) does not know EXT_mesh_features and EXT_structural_metadata:
it reports them as UNSUPPORTED_EXTENSION infos (and checks the core glTF under them), and
the property table's buffer views as UNUSED_OBJECT infos; `problems(report, glb)` is what is
left once those are set aside, and a clean GLB has none.

`decode(glb)` reads a 3D Tiles GLB back without twin's code: pygltflib for the document,
accessors read by hand honouring byteOffset/byteStride, the node's translation applied, glTF's
Y-up turned back to ECEF Z-up and pyproj (EPSG:4978 -> EPSG:4979) for lon/lat/height; the
EXT_structural_metadata property table read column by column from its buffer views.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pygltflib
from pyproj import Transformer

JS = Path(__file__).parent / "js"
SCRIPT = JS / "gltf_validate.mjs"

# Issues the twin's GLBs may carry that are not faults: the two 3D Tiles extensions are
# outside this validator's knowledge.
ACCEPTED_INFOS = {"UNSUPPORTED_EXTENSION"}


def validate_all(assets: Sequence[bytes]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node, "node is needed for the glTF validator"
    assert (JS / "node_modules" / "gltf-validator").exists(), (
        "install the validator first: npm ci --prefix tests/js"
    )
    payload = b"".join(struct.pack("<I", len(a)) + bytes(a) for a in assets)
    done = subprocess.run(
        [node, str(SCRIPT)], input=payload, capture_output=True, check=True, timeout=600
    )
    reports = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines() if line]
    assert len(reports) == len(assets), done.stderr.decode("utf-8", "replace")
    return reports


def validate(glb: bytes) -> dict[str, Any]:
    """The validator's report on one GLB (or glTF JSON) asset."""
    return validate_all([glb])[0]


def messages(report: dict[str, Any], severity: int | None = None) -> list[dict[str, Any]]:
    """The report's messages, only those of `severity` when given."""
    found = report["issues"]["messages"]
    return [m for m in found if severity is None or m["severity"] == severity]


def metadata_views(glb: bytes) -> set[int]:
    """The buffer views that EXT_structural_metadata's property tables use."""
    length = struct.unpack_from("<I", glb, 12)[0]
    doc = json.loads(glb[20 : 20 + length])
    tables = doc.get("extensions", {}).get("EXT_structural_metadata", {}).get("propertyTables", [])
    return {
        view
        for table in tables
        for column in table["properties"].values()
        for key, view in column.items()
        if key in ("values", "arrayOffsets", "stringOffsets")
    }


def problems(report: dict[str, Any], glb: bytes | None = None) -> list[dict[str, Any]]:
    """Errors and warnings, and infos that are not accepted: what a clean GLB has none of.

    Accepted infos: UNSUPPORTED_EXTENSION for the two 3D Tiles extensions, and (given the
    GLB) UNUSED_OBJECT for the buffer views of the property table, which the validator
    cannot see being used.
    """
    tables = metadata_views(glb) if glb is not None else set()
    accepted = {f"/bufferViews/{v}" for v in tables}
    return [
        m
        for m in messages(report)
        if m["severity"] < 2
        or (
            m["severity"] == 2
            and not (m["code"] in ACCEPTED_INFOS and m["message"].endswith(_EXTENSIONS))
            and not (m["code"] == "UNUSED_OBJECT" and m.get("pointer") in accepted)
        )
    ]


_EXTENSIONS = ("'EXT_mesh_features'.", "'EXT_structural_metadata'.")


_COMPONENTS = {
    5120: np.int8,
    5121: np.uint8,
    5122: np.int16,
    5123: np.uint16,
    5125: np.uint32,
    5126: np.float32,
}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
_SCALARS = {
    "UINT8": np.uint8,
    "INT8": np.int8,
    "UINT16": np.uint16,
    "INT16": np.int16,
    "UINT32": np.uint32,
    "INT32": np.int32,
    "UINT64": np.uint64,
    "INT64": np.int64,
    "FLOAT32": np.float32,
    "FLOAT64": np.float64,
}
_TO_LONLAT = Transformer.from_crs("EPSG:4978", "EPSG:4979", always_xy=True)


@dataclass
class Decoded:
    """A GLB's first primitive and property table, as the client sees them."""

    gltf: pygltflib.GLTF2
    ecef: np.ndarray  # (V, 3) float64 ECEF metres (translation applied, Z up)
    lonlat_h: np.ndarray  # (V, 3) lon deg, lat deg, ellipsoidal height m
    normals: np.ndarray | None  # (V, 3) in ECEF axes
    triangles: np.ndarray  # (T, 3)
    feature: np.ndarray | None  # (V,) _FEATURE_ID_0
    colors: np.ndarray | None  # (V, 4) as stored
    table: dict[str, list[Any]]  # property table columns (noData left as stored)
    schema: dict[str, Any]  # the class's property definitions


def read_accessor(gltf: pygltflib.GLTF2, blob: bytes, index: int) -> np.ndarray:
    """An accessor's elements (count, width), honouring byteOffset and byteStride."""
    acc = gltf.accessors[index]
    view = gltf.bufferViews[acc.bufferView]
    dtype = np.dtype(_COMPONENTS[acc.componentType])
    width = _WIDTH[acc.type]
    element = dtype.itemsize * width
    stride = view.byteStride or element
    start = (view.byteOffset or 0) + (acc.byteOffset or 0)
    assert start + stride * (acc.count - 1) + element <= (view.byteOffset or 0) + view.byteLength
    raw = np.frombuffer(blob, np.uint8, count=stride * (acc.count - 1) + element, offset=start)
    rows = np.lib.stride_tricks.as_strided(raw, (acc.count, element), (stride, 1))
    return np.ascontiguousarray(rows).view(dtype).reshape(acc.count, width)


def _view_bytes(gltf: pygltflib.GLTF2, blob: bytes, index: int) -> bytes:
    view = gltf.bufferViews[index]
    return blob[(view.byteOffset or 0) : (view.byteOffset or 0) + view.byteLength]


def _property_table(gltf: pygltflib.GLTF2, blob: bytes) -> tuple[dict, dict]:
    ext = (gltf.extensions or {}).get("EXT_structural_metadata")
    if not ext:
        return {}, {}
    table = ext["propertyTables"][0]
    schema = ext["schema"]["classes"][table["class"]]["properties"]
    count = table["count"]
    columns: dict[str, list[Any]] = {}
    for name, column in table["properties"].items():
        definition = schema[name]
        values = _view_bytes(gltf, blob, column["values"])
        if definition["type"] == "STRING":
            offset_type = _SCALARS[column.get("stringOffsetType", "UINT32")]
            offsets = np.frombuffer(
                _view_bytes(gltf, blob, column["stringOffsets"]), offset_type, count + 1
            )
            columns[name] = [
                values[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(count)
            ]
        else:
            assert definition["type"] == "SCALAR"
            columns[name] = np.frombuffer(
                values, _SCALARS[definition["componentType"]], count
            ).tolist()
    return columns, schema


def decode(glb: bytes) -> Decoded:
    """The GLB's single mesh primitive in ECEF and lon/lat/h, and its property table."""
    gltf = pygltflib.GLTF2.load_from_bytes(glb)
    blob = gltf.binary_blob() or b""
    table, schema = _property_table(gltf, blob)
    empty = np.zeros((0, 3))
    if not gltf.meshes:
        return Decoded(gltf, empty, empty, None, np.zeros((0, 3), int), None, None, table, schema)
    assert len(gltf.meshes) == 1 and len(gltf.meshes[0].primitives) == 1
    prim = gltf.meshes[0].primitives[0]
    node = next(n for n in gltf.nodes if n.mesh == 0)
    assert node.matrix is None and node.rotation is None and node.scale is None
    translation = np.array(node.translation or [0.0, 0.0, 0.0])
    attrs = prim.attributes
    y_up = read_accessor(gltf, blob, attrs.POSITION).astype(np.float64) + translation
    # 3D Tiles turns glTF's +Y up into +Z: glTF (x, y, z) is ECEF (x, -z, y).
    ecef = np.column_stack((y_up[:, 0], -y_up[:, 2], y_up[:, 1]))
    lon, lat, h = _TO_LONLAT.transform(ecef[:, 0], ecef[:, 1], ecef[:, 2])
    normals = None
    if attrs.NORMAL is not None:
        n = read_accessor(gltf, blob, attrs.NORMAL).astype(np.float64)
        normals = np.column_stack((n[:, 0], -n[:, 2], n[:, 1]))
    extra = vars(attrs).get("_FEATURE_ID_0")
    feature = None
    if extra is not None:
        feature = read_accessor(gltf, blob, extra)[:, 0]
    colors = read_accessor(gltf, blob, attrs.COLOR_0) if attrs.COLOR_0 is not None else None
    triangles = read_accessor(gltf, blob, prim.indices).reshape(-1, 3).astype(np.int64)
    return Decoded(
        gltf,
        ecef,
        np.column_stack((lon, lat, h)),
        normals,
        triangles,
        feature,
        colors,
        table,
        schema,
    )
