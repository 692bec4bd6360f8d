"""Reading a 3D Tiles 1.1 tileset as a client does, for the tests: walk, decode, check.

Independent of tiles/: subtrees are decoded from the spec's layout (tests/test_implicit.py),
GLBs with pygltflib (honouring byteStride), ECEF to lon/lat/height with pyproj.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import httpx
import numpy as np
import pygltflib
import rasterio
from pyproj import Transformer
from scipy.interpolate import RegularGridInterpolator
from sqlalchemy import Engine, text

from tests.test_implicit import decode_subtree, tiles_of_subtree
from tiles.implicit import TileId

TO_GEODETIC = Transformer.from_crs("EPSG:4978", "EPSG:4979", always_xy=True)
COMPONENTS = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16,
              5125: np.uint32, 5126: np.float32}
WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


@dataclass
class Glb:
    gltf: pygltflib.GLTF2
    binary: bytes
    lon: np.ndarray  # degrees, per vertex
    lat: np.ndarray
    height: np.ndarray
    feature: np.ndarray  # per vertex
    properties: dict[str, list] = field(default_factory=dict)

    def feature_ids(self) -> np.ndarray:
        return np.asarray(self.properties["id"])


def read_accessor(gltf: pygltflib.GLTF2, binary: bytes, index: int) -> np.ndarray:
    accessor = gltf.accessors[index]
    view = gltf.bufferViews[accessor.bufferView]
    dtype = np.dtype(COMPONENTS[accessor.componentType])
    width = WIDTH[accessor.type]
    start = (view.byteOffset or 0) + (accessor.byteOffset or 0)
    stride = view.byteStride or dtype.itemsize * width
    rows = [np.frombuffer(binary, dtype, width, start + k * stride)
            for k in range(accessor.count)]
    return np.array(rows).reshape(accessor.count, width)


def _strings(binary: bytes, gltf_json: dict, prop: dict, count: int) -> list[str]:
    views = gltf_json["bufferViews"]
    values, offsets = views[prop["values"]], views[prop["stringOffsets"]]
    offset_type = {"UINT32": "<I", "UINT64": "<Q", "UINT16": "<H", "UINT8": "<B"}[
        prop.get("stringOffsetType", "UINT32")]
    size = struct.calcsize(offset_type)
    base = offsets.get("byteOffset", 0)
    bounds = [struct.unpack_from(offset_type, binary, base + k * size)[0]
              for k in range(count + 1)]
    start = values.get("byteOffset", 0)
    return [binary[start + bounds[k]:start + bounds[k + 1]].decode()
            for k in range(count)]


NUMERIC = {"UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "INT64": np.int64, "FLOAT32": np.float32, "FLOAT64": np.float64}


def decode_glb(data: bytes) -> Glb:
    assert data[:4] == b"glTF", "not a GLB"
    gltf = pygltflib.GLTF2.load_from_bytes(data)
    binary = gltf.binary_blob()
    lon, lat, height, feature = [], [], [], []
    for node in gltf.nodes:
        if node.mesh is None:
            continue
        translation = np.array(node.translation or [0, 0, 0], dtype=np.float64)
        for primitive in gltf.meshes[node.mesh].primitives:
            local = read_accessor(gltf, binary, primitive.attributes.POSITION).astype(np.float64)
            gx, gy, gz = (local + translation).T
            # glTF is Y-up; 3D Tiles turns it to Z-up: ECEF = (x, -z, y).
            x, y, z = TO_GEODETIC.transform(gx, -gz, gy)
            lon.append(x)
            lat.append(y)
            height.append(z)
            ids = getattr(primitive.attributes, "_FEATURE_ID_0", None)
            feature.append(read_accessor(gltf, binary, ids)[:, 0] if ids is not None
                           else np.zeros(len(x)))
    out = Glb(gltf, binary, np.concatenate(lon), np.concatenate(lat),
              np.concatenate(height), np.concatenate(feature).astype(np.int64))
    metadata = (gltf.extensions or {}).get("EXT_structural_metadata")
    if metadata:
        gltf_json = gltf.to_dict()
        table = metadata["propertyTables"][0]
        schema = metadata["schema"]["classes"][table["class"]]["properties"]
        views = gltf_json["bufferViews"]
        for name, prop in table["properties"].items():
            kind = schema[name]
            if kind["type"] == "STRING":
                out.properties[name] = _strings(binary, gltf_json, prop, table["count"])
            else:
                view = views[prop["values"]]
                out.properties[name] = np.frombuffer(
                    binary, NUMERIC[kind["componentType"]], table["count"],
                    view.get("byteOffset", 0)).tolist()
    return out


@dataclass
class Walk:
    tileset: dict
    subtrees: dict[TileId, bytes]
    content: dict[TileId, bytes]
    etags: dict[str, str]
    # Tiles a subtree says are unavailable although their parent is (should answer 404).
    missing: list[TileId]

    @property
    def region(self) -> list[float]:
        return self.implicit_root["boundingVolume"]["region"]

    @property
    def implicit_root(self) -> dict:
        return next(t for t in self.tileset["root"]["children"] if "implicitTiling" in t)

    def tile_region(self, tile: TileId) -> tuple[float, float, float, float, float, float]:
        w, s, e, n, low, high = self.region
        dx, dy = (e - w) / 2**tile.level, (n - s) / 2**tile.level
        return (w + tile.x * dx, s + tile.y * dy, w + (tile.x + 1) * dx,
                s + (tile.y + 1) * dy, low, high)


def walk(client: httpx.Client, base: str, query: str = "", headers: dict | None = None
         ) -> Walk:
    """Every subtree and every available content tile of the tileset at ``base``."""
    response = client.get(f"{base}/tileset.json{query}", headers=headers)
    assert response.status_code == 200, response.text
    tileset = response.json()
    etags = {"tileset": response.headers["etag"]}
    implicit_root = next((t for t in tileset["root"]["children"] if "implicitTiling" in t),
                         None)
    out = Walk(tileset, {}, {}, etags, [])
    if implicit_root is None:
        return out
    scheme = implicit_root["implicitTiling"]
    levels, subtree_levels = scheme["availableLevels"], scheme["subtreeLevels"]
    pending = [TileId(0, 0, 0)]
    while pending:
        root = pending.pop()
        url = scheme["subtrees"]["uri"].format(level=root.level, x=root.x, y=root.y)
        response = client.get(f"{base}/{url.removeprefix('./')}", headers=headers)
        assert response.status_code == 200, (url, response.text)
        out.subtrees[root] = response.content
        out.etags[url] = response.headers["etag"]
        tiles = tiles_of_subtree(root)
        decoded = decode_subtree(response.content, len(tiles), 4**subtree_levels)
        for k, tile in enumerate(tiles):
            if tile.level >= levels:
                assert not decoded["tiles"][k]
                continue
            if decoded["content"][k]:
                uri = implicit_root["content"]["uri"].format(level=tile.level, x=tile.x,
                                                             y=tile.y)
                got = client.get(f"{base}/{uri.removeprefix('./')}", headers=headers)
                assert got.status_code == 200, (uri, got.text)
                assert got.headers["content-type"] == "model/gltf-binary"
                out.content[tile] = got.content
                out.etags[uri] = got.headers["etag"]
            elif tile.level > root.level and decoded["tiles"][tiles.index(tile.parent())]:
                out.missing.append(tile)
        for index in np.flatnonzero(decoded["children"]):
            x = y = 0
            for bit in range(subtree_levels):
                x |= ((int(index) >> (2 * bit)) & 1) << bit
                y |= ((int(index) >> (2 * bit + 1)) & 1) << bit
            pending.append(TileId(root.level + subtree_levels,
                                  (root.x << subtree_levels) + x,
                                  (root.y << subtree_levels) + y))
    return out


def dem_ground(engine: Engine, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The terrain under the points as the quantized-mesh terrain draws it: linear between
    the DEM's pixel centres (scipy over rasterio's read), the central DEM before the
    municipality's."""
    with engine.connect() as conn:
        paths = dict(conn.execute(text(
            "SELECT id, file_path FROM layers WHERE id IN ('terrain', 'terrain_central')")).all())
    out = np.full(lon.shape, np.nan)
    for layer_id in ("terrain_central", "terrain"):
        with rasterio.open(paths[layer_id]) as src:
            heights = src.read(1, masked=True).astype(np.float64).filled(np.nan)
            t = src.transform
        lons = t.c + (np.arange(heights.shape[1]) + 0.5) * t.a
        lats = t.f + (np.arange(heights.shape[0]) + 0.5) * t.e
        surface = RegularGridInterpolator((lats[::-1], lons), heights[::-1], bounds_error=False)
        values = surface(np.column_stack([lat, lon]))
        out = np.where(np.isnan(out), values, out)
    return out
