"""tiles/glb.py: GLB content for 3D Tiles, checked by decoding it without twin's code.

Oracles: pygltflib + hand-read accessors (byteStride honoured) and trimesh for the geometry,
pyproj for ECEF -> lon/lat/h and for local east/north metres, the Khronos glTF validator
(0 errors; the only infos accepted are the two 3D Tiles extensions it does not know and the
property table's buffer views it therefore sees as unused).
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pygltflib
import pytest
import shapely
import trimesh
from pyproj import Geod, Transformer

from tests.gltf_validator import decode, problems, read_accessor, validate_all
from tiles import glb as glbmod
from tiles.meshes import Mesh, merge, polygon_surfaces
from tiles.roofs import blocks, roofed

GEOD = Geod(ellps="WGS84")
TO_LONLAT = Transformer.from_crs("EPSG:4978", "EPSG:4979", always_xy=True)
LON0, LAT0 = 106.55, 29.56  # Chongqing


def rectangle(lon: float, lat: float, w_m: float, d_m: float, turn_deg: float = 0.0) -> np.ndarray:
    """A closed rectangle of w x d metres centred at lon/lat, turned counter-clockwise."""
    a = np.radians(turn_deg)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]]) * [w_m / 2, d_m / 2]
    rot = corners @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    # Offsets through pyproj's geodesic (the code under test uses its own local frame).
    az = np.degrees(np.arctan2(rot[:, 0], rot[:, 1]))
    dist = np.hypot(rot[:, 0], rot[:, 1])
    lons, lats, _ = GEOD.fwd(np.full(5, lon), np.full(5, lat), az, dist)
    return np.column_stack((lons, lats))


def courtyard() -> list[np.ndarray]:
    """A 40 x 30 m footprint with a 10 x 8 m courtyard, exterior clockwise, hole open."""
    outer = rectangle(LON0 + 0.003, LAT0, 40, 30)[::-1]
    hole = rectangle(LON0 + 0.003, LAT0, 10, 8)[:-1]
    return [outer, hole]


def l_shape() -> list[np.ndarray]:
    """An L of 30 x 24 m, arms 10 m wide, no closing vertex."""
    pts = [(0, 0), (30, 0), (30, 10), (10, 10), (10, 24), (0, 24)]
    lon, lat, _ = GEOD.fwd(
        np.full(6, LON0 - 0.002),
        np.full(6, LAT0 + 0.001),
        [np.degrees(np.arctan2(x, y)) for x, y in pts],
        [np.hypot(x, y) for x, y in pts],
    )
    return [np.column_stack((lon, lat))]


FOOTPRINTS = [[rectangle(LON0, LAT0, 20, 12, 25)], courtyard(), l_shape()]
BOTTOM = np.array([250.0, 262.5, 301.0])
TOP = np.array([280.0, 300.0, 310.0])
NAMES = ["解放碑大厦", None, 'Tower "A" / 塔']


def table(n: int = 3, names: list | None = None) -> glbmod.FeatureTable:
    names = names if names is not None else NAMES
    return glbmod.FeatureTable(
        "building",
        [
            glbmod.Property("id", "INT64", [10_000_000_001 + i for i in range(n)]),
            glbmod.Property("name", "STRING", names[:n]),
            glbmod.Property("height_m", "FLOAT32", [30.0, 37.5, None][:n]),
            glbmod.Property("height_exact", "FLOAT64", [30.123456789, None, 9.0][:n]),
            glbmod.Property("floors", "UINT16", [10, None, 3][:n]),
            glbmod.Property("cim_level", "UINT8", [2, 3, 6][:n]),
            glbmod.Property("code", "UINT32", [500103, 500104, 4294967294][:n]),
        ],
    )


def metres(lonlat: np.ndarray, lon: float, lat: float) -> np.ndarray:
    """East/north metres of points from (lon, lat) by pyproj's geodesic."""
    az, _, dist = GEOD.inv(np.full(len(lonlat), lon), np.full(len(lonlat), lat), *lonlat.T)
    a = np.radians(az)
    return np.column_stack((dist * np.sin(a), dist * np.cos(a)))


@pytest.fixture(scope="module")
def lod1() -> tuple[Mesh, bytes]:
    mesh = blocks(FOOTPRINTS, BOTTOM, TOP)
    return mesh, glbmod.glb(mesh, table())


@pytest.fixture(scope="module")
def lod2() -> tuple[Mesh, bytes]:
    kinds = ["gable"] * 3 + ["hip"] * 3
    mesh = roofed(FOOTPRINTS * 2, np.r_[BOTTOM, BOTTOM], np.r_[TOP, TOP], kinds)
    rows = glbmod.FeatureTable("building", [glbmod.Property("id", "INT64", list(range(6)))])
    return mesh, glbmod.glb(mesh, rows)


def test_corners_and_heights_round_trip(lod1: tuple[Mesh, bytes]) -> None:
    _, data = lod1
    d = decode(data)
    assert d.feature is not None
    for row, rings in enumerate(FOOTPRINTS):
        mine = d.lonlat_h[d.feature == row]
        for ring in rings:
            for lon, lat in ring:
                gap = np.hypot(*metres(mine[:, :2], lon, lat).T)
                # float32 relative to the tile's centre: sub-millimetre at building scale.
                assert gap.min() < 0.005, (row, gap.min())
        # Exactly two heights per block: its bottom and its top.
        assert np.allclose(np.unique(np.round(mine[:, 2], 2)), [BOTTOM[row], TOP[row]], atol=0.01)
        # Nothing outside the footprint's own extent.
        everything = np.concatenate(rings)
        assert mine[:, 0].min() >= everything[:, 0].min() - 1e-7
        assert mine[:, 0].max() <= everything[:, 0].max() + 1e-7
        assert mine[:, 1].min() >= everything[:, 1].min() - 1e-7
        assert mine[:, 1].max() <= everything[:, 1].max() + 1e-7


def test_properties_round_trip_with_no_data(lod1: tuple[Mesh, bytes]) -> None:
    d = decode(lod1[1])
    assert d.table["id"] == [10_000_000_001, 10_000_000_002, 10_000_000_003]
    assert d.table["name"] == ["解放碑大厦", "", 'Tower "A" / 塔']
    assert d.schema["name"]["noData"] == ""
    assert d.table["height_m"][:2] == [30.0, 37.5]
    assert d.table["height_m"][2] == d.schema["height_m"]["noData"] == np.finfo(np.float32).min
    assert d.table["height_exact"][0] == 30.123456789
    assert d.table["height_exact"][1] == d.schema["height_exact"]["noData"]
    assert d.table["floors"] == [10, 65535, 3] and d.schema["floors"]["noData"] == 65535
    assert d.table["cim_level"] == [2, 3, 6] and "noData" not in d.schema["cim_level"]
    assert d.table["code"] == [500103, 500104, 4294967294]
    assert d.schema["id"] == {"type": "SCALAR", "componentType": "INT64"}
    ext = d.gltf.extensions["EXT_structural_metadata"]
    assert ext["schema"]["id"] == "twin"
    assert ext["propertyTables"][0]["count"] == 3
    mesh_ext = d.gltf.meshes[0].primitives[0].extensions["EXT_mesh_features"]
    assert mesh_ext == {"featureIds": [{"featureCount": 3, "attribute": 0, "propertyTable": 0}]}
    assert set(d.gltf.extensionsUsed) == {"EXT_mesh_features", "EXT_structural_metadata"}


def test_feature_ids_belong_to_their_footprints(lod1: tuple[Mesh, bytes]) -> None:
    d = decode(lod1[1])
    assert d.feature is not None and set(np.unique(d.feature)) == {0.0, 1.0, 2.0}
    for tri in d.triangles:  # a triangle never mixes features
        assert len(set(d.feature[tri])) == 1
    for row, rings in enumerate(FOOTPRINTS):
        mine = d.lonlat_h[d.feature == row]
        centre = np.concatenate(rings).mean(axis=0)
        assert np.all(np.hypot(*metres(mine[:, :2], *centre).T) < 30)


def test_layout_alignment_and_padding(lod1: tuple[Mesh, bytes]) -> None:
    data = lod1[1]
    magic, version, length = struct.unpack_from("<III", data)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    json_len, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A and json_len % 4 == 0
    text = data[20 : 20 + json_len]
    assert text == text.rstrip() + b" " * (len(text) - len(text.rstrip()))
    doc = json.loads(text)
    bin_start = 20 + json_len
    bin_len, bin_type = struct.unpack_from("<II", data, bin_start)
    assert bin_type == 0x004E4942 and bin_len % 4 == 0 and (bin_start + 8) % 8 == 0
    assert bin_start + 8 + bin_len == len(data)
    assert doc["buffers"] == [{"byteLength": bin_len}]
    for view in doc["bufferViews"]:
        assert view["byteOffset"] % 8 == 0
        assert view["byteOffset"] + view["byteLength"] <= bin_len
    end = max(v["byteOffset"] + v["byteLength"] for v in doc["bufferViews"])
    assert data[bin_start + 8 + end :] == b"\0" * (bin_len - end)
    prim = doc["meshes"][0]["primitives"][0]
    assert doc["accessors"][prim["indices"]]["componentType"] == 5123  # UNSIGNED_SHORT
    pos = doc["accessors"][prim["attributes"]["POSITION"]]
    assert "min" in pos and "max" in pos
    material = doc["materials"][prim["material"]]["pbrMetallicRoughness"]
    assert material["metallicFactor"] == 0.0 and min(material["baseColorFactor"][:3]) > 0.7


def test_centre_translation_is_the_bounds_centre(lod1: tuple[Mesh, bytes]) -> None:
    d = decode(lod1[1])
    node = d.gltf.nodes[0]
    t = np.array(node.translation)
    centre_ecef = np.array([t[0], -t[2], t[1]])
    lo, hi = d.ecef.min(axis=0), d.ecef.max(axis=0)
    assert np.allclose(centre_ecef, (lo + hi) / 2, atol=0.01)
    assert 6.3e6 < np.linalg.norm(centre_ecef) < 6.4e6


def test_trimesh_reads_the_same_geometry(lod1: tuple[Mesh, bytes]) -> None:
    data = lod1[1]
    d = decode(data)
    scene = trimesh.load(io.BytesIO(data), file_type="glb", process=False)
    geometry = scene.to_geometry() if hasattr(scene, "to_geometry") else scene.dump(True)
    y_up = np.asarray(geometry.vertices)
    ecef = np.column_stack((y_up[:, 0], -y_up[:, 2], y_up[:, 1]))
    assert len(ecef) == len(d.ecef)
    assert np.allclose(np.sort(ecef, axis=0), np.sort(d.ecef, axis=0), atol=1e-3)
    assert len(geometry.faces) == len(d.triangles)


def test_flat_normals_face_outwards(lod1: tuple[Mesh, bytes]) -> None:
    d = decode(lod1[1])
    assert d.normals is not None
    assert np.allclose(np.linalg.norm(d.normals, axis=1), 1.0, atol=1e-5)
    a, b, c = (d.ecef[d.triangles[:, k]] for k in range(3))
    winding = np.cross(b - a, c - a)
    winding /= np.linalg.norm(winding, axis=1)[:, None]
    # Each triangle's vertices carry its own face's normal (flat shading) ...
    for k in range(3):
        assert np.all(np.einsum("ij,ij->i", winding, d.normals[d.triangles[:, k]]) > 0.999)
    # ... and counter-clockwise from outside: roofs point up, walls away from the building.
    lon, lat = np.radians(d.lonlat_h[:, 0]), np.radians(d.lonlat_h[:, 1])
    up = np.column_stack((np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)))
    along_up = np.einsum("ij,ij->i", d.normals, up)
    assert np.all((along_up > 0.999) | (np.abs(along_up) < 1e-3))  # roofs and walls only
    # A wall's outside: a step along its normal from a triangle's middle leaves the footprint,
    # a step against it enters the footprint (courtyard walls face into the courtyard).
    assert d.feature is not None
    walls = np.abs(along_up[d.triangles[:, 0]]) < 1e-3
    middle = (a + b + c)[walls] / 3
    normal = d.normals[d.triangles[walls, 0]]
    row = d.feature[d.triangles[walls, 0]].astype(int)
    footprints = np.array([shapely.Polygon(r[0], r[1:]) for r in FOOTPRINTS])[row]
    for sign, inside in ((1.0, False), (-1.0, True)):
        step = middle + sign * 0.2 * normal
        lon, lat, _ = TO_LONLAT.transform(*step.T)
        assert np.all(shapely.contains_xy(footprints, lon, lat) == inside)


def test_every_glb_passes_the_khronos_validator(
    lod1: tuple[Mesh, bytes], lod2: tuple[Mesh, bytes]
) -> None:
    coloured = blocks(FOOTPRINTS, BOTTOM, TOP)
    coloured.colors = np.tile(
        np.array([[200, 40, 40, 255]], np.uint8), (len(coloured.positions), 1)
    )
    see_through = blocks(FOOTPRINTS, BOTTOM, TOP)
    see_through.colors = np.tile(
        np.array([[0, 90, 200, 128]], np.uint8), (len(see_through.positions), 1)
    )
    cube = polygon_surfaces(_cube(), np.zeros(6, np.uint32))
    big = _many_blocks(4000)
    assets = [
        lod1[1],
        lod2[1],
        glbmod.glb(coloured, table()),
        glbmod.glb(see_through, table()),
        glbmod.glb(
            cube,
            glbmod.FeatureTable("model", [glbmod.Property("id", "INT64", [7])]),
            double_sided=True,
        ),
        glbmod.glb(
            big, glbmod.FeatureTable("b", [glbmod.Property("id", "UINT32", list(range(4000)))])
        ),
        glbmod.glb(Mesh.empty(), table()),
    ]
    for data, report in zip(assets, validate_all(assets), strict=True):
        errors = [m for m in report["issues"]["messages"] if m["severity"] == 0]
        assert errors == [], (assets.index(data), errors)
        assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]
        assert problems(report, data) == []


def test_big_meshes_use_32_bit_indices() -> None:
    big = _many_blocks(4000)
    assert len(big.positions) > 65535
    d = decode(
        glbmod.glb(
            big, glbmod.FeatureTable("b", [glbmod.Property("id", "UINT32", list(range(4000)))])
        )
    )
    prim = d.gltf.meshes[0].primitives[0]
    assert d.gltf.accessors[prim.indices].componentType == 5125
    assert d.triangles.max() == len(big.positions) - 1
    assert np.array_equal(np.sort(np.unique(d.feature)), np.arange(4000))


def test_colours_round_trip() -> None:
    mesh = blocks(FOOTPRINTS, BOTTOM, TOP)
    mesh.colors = np.tile(np.array([[10, 20, 30, 200]], np.uint8), (len(mesh.positions), 1))
    d = decode(glbmod.glb(mesh, table()))
    assert d.colors is not None and np.all(d.colors == [10, 20, 30, 200])
    prim = d.gltf.meshes[0].primitives[0]
    assert d.gltf.accessors[prim.attributes.COLOR_0].normalized is True
    assert d.gltf.materials[0].alphaMode == "BLEND"
    assert not d.gltf.materials[0].doubleSided
    both = decode(glbmod.glb(mesh, table(), double_sided=True))
    assert both.gltf.materials[0].doubleSided is True


def test_strided_accessors_are_read_as_such() -> None:
    """The decoder honours byteStride (our writer packs tightly; other producers interleave)."""
    gltf = pygltflib.GLTF2()
    inter = np.array([[1, 2, 3, 9], [4, 5, 6, 9]], np.float32)
    gltf.bufferViews.append(
        pygltflib.BufferView(buffer=0, byteOffset=0, byteLength=32, byteStride=16)
    )
    gltf.accessors.append(
        pygltflib.Accessor(bufferView=0, componentType=5126, count=2, type="VEC3")
    )
    assert np.array_equal(read_accessor(gltf, inter.tobytes(), 0), inter[:, :3])


def test_bad_tables_are_refused() -> None:
    mesh = blocks(FOOTPRINTS, BOTTOM, TOP)
    with pytest.raises(ValueError, match="beyond"):
        glbmod.glb(mesh, glbmod.FeatureTable("b", [glbmod.Property("id", "INT64", [1, 2])]))
    with pytest.raises(ValueError, match="values"):
        glbmod.glb(
            mesh,
            glbmod.FeatureTable(
                "b",
                [glbmod.Property("id", "INT64", [1, 2, 3]), glbmod.Property("n", "STRING", ["a"])],
            ),
        )
    with pytest.raises(ValueError, match="identifier"):
        glbmod.glb(mesh, glbmod.FeatureTable("b", [glbmod.Property("my id", "INT64", [1, 2, 3])]))
    with pytest.raises(ValueError, match="outside UINT8"):
        glbmod.glb(mesh, glbmod.FeatureTable("b", [glbmod.Property("f", "UINT8", [1, 2, 256])]))
    with pytest.raises(ValueError, match="outside UINT8"):  # 255 is the no-data value then
        glbmod.glb(mesh, glbmod.FeatureTable("b", [glbmod.Property("f", "UINT8", [1, None, 255])]))
    with pytest.raises(ValueError, match="integers"):
        glbmod.glb(mesh, glbmod.FeatureTable("b", [glbmod.Property("f", "INT64", [1, 2.5, 3])]))
    with pytest.raises(ValueError, match="type"):
        glbmod.glb(mesh, glbmod.FeatureTable("b", [glbmod.Property("f", "BOOLEAN", [1, 0, 1])]))


def test_merge_keeps_features_and_offsets() -> None:
    a = blocks(FOOTPRINTS[:1], BOTTOM[:1], TOP[:1])
    b = blocks(FOOTPRINTS[1:2], BOTTOM[1:2], TOP[1:2])
    b.feature = np.full(len(b.positions), 1, np.uint32)
    both = merge([a, b])
    assert len(both.positions) == len(a.positions) + len(b.positions)
    assert np.array_equal(both.triangles[len(a.triangles) :], b.triangles + len(a.positions))
    assert set(both.feature.tolist()) == {0, 1}
    assert both.colors is None


def _cube() -> list[list[np.ndarray]]:
    """The six faces of a 10 m cube as CityJSON gives them: counter-clockwise from outside."""
    e = 10.0 / 96_900  # ~10 m of longitude at 29.56 N
    n = 10.0 / 110_800
    x0, y0, z0 = LON0, LAT0, 200.0
    v = {
        (i, j, k): (x0 + i * e, y0 + j * n, z0 + k * 10.0)
        for i in (0, 1)
        for j in (0, 1)
        for k in (0, 1)
    }
    faces = [
        [(0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 0)],  # bottom, facing down
        [(0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1)],  # top
        [(0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1)],  # south
        [(1, 0, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1)],  # east
        [(1, 1, 0), (0, 1, 0), (0, 1, 1), (1, 1, 1)],  # north
        [(0, 1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 1)],  # west
    ]
    return [[np.array([v[c] for c in f] + [v[f[0]]])] for f in faces]


def _many_blocks(n: int) -> Mesh:
    rng = np.random.default_rng(5)
    fps = [
        [
            rectangle(
                LON0 + rng.random() * 0.05, LAT0 + rng.random() * 0.05, 20, 12, rng.random() * 90
            )
        ]
        for _ in range(n)
    ]
    return blocks(fps, np.full(n, 240.0), np.full(n, 270.0))


def test_the_validator_catches_a_broken_glb(lod1: tuple[Mesh, bytes]) -> None:
    """The oracle itself: a GLB whose POSITION max lies is reported as an error."""
    data = lod1[1]
    json_len = struct.unpack_from("<I", data, 12)[0]
    doc = json.loads(data[20 : 20 + json_len])
    doc["accessors"][0]["max"][0] += 1.0
    text = json.dumps(doc).encode()
    text += b" " * ((-len(text)) % 4)
    rest = data[20 + json_len :]
    chunks = struct.pack("<II", len(text), 0x4E4F534A) + text + rest
    broken = struct.pack("<III", 0x46546C67, 2, 12 + len(chunks)) + chunks
    report = validate_all([broken])[0]
    codes = {m["code"] for m in report["issues"]["messages"] if m["severity"] == 0}
    assert codes == {"ACCESSOR_MAX_MISMATCH"}
