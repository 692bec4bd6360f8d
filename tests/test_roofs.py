"""tiles/roofs.py and tiles/meshes.py: LOD1 blocks, LOD2 roofs and planar surfaces.

Oracles: pyproj (a topocentric east/north/up frame through PROJ's cart + topocentric, and
Geod for areas and distances), shapely for "inside the footprint", trimesh for watertightness
and volume; closure is checked by welding vertices and pairing directed edges.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import trimesh
from pyproj import Geod, Transformer

from tests.gltf_validator import problems, validate
from tiles.glb import FeatureTable, Property, glb
from tiles.meshes import Mesh, footprint_rings, polygon_surfaces
from tiles.roofs import MAX_RISE_SHARE, PITCH_DEG, ROOF_TYPES, blocks, roofed

GEOD = Geod(ellps="WGS84")
LON0, LAT0 = 106.55, 29.56


def enu(positions: np.ndarray, lon0: float = LON0, lat0: float = LAT0) -> np.ndarray:
    """East/north/up metres about (lon0, lat0, 0) on the ellipsoid, by PROJ."""
    t = Transformer.from_pipeline(
        "+proj=pipeline +step +proj=unitconvert +xy_in=deg +xy_out=rad +step +proj=cart "
        f"+ellps=WGS84 +step +proj=topocentric +ellps=WGS84 +lon_0={lon0} +lat_0={lat0} +h_0=0"
    )
    return np.column_stack(t.transform(*positions.T))


def place(points_m: list[tuple[float, float]], lon: float, lat: float) -> np.ndarray:
    """lon/lat of east/north metre offsets from (lon, lat), along geodesics."""
    pts = np.asarray(points_m, np.float64)
    az = np.degrees(np.arctan2(pts[:, 0], pts[:, 1]))
    lons, lats, _ = GEOD.fwd(np.full(len(pts), lon), np.full(len(pts), lat), az, np.hypot(*pts.T))
    return np.column_stack((lons, lats))


def rect(w: float, d: float, lon: float = LON0, lat: float = LAT0, turn: float = 0.0) -> np.ndarray:
    a = math.radians(turn)
    c, s = math.cos(a), math.sin(a)
    corners = [(-w / 2, -d / 2), (w / 2, -d / 2), (w / 2, d / 2), (-w / 2, d / 2), (-w / 2, -d / 2)]
    return place([(x * c - y * s, x * s + y * c) for x, y in corners], lon, lat)


RECT = [rect(20, 12, turn=30)]  # 20 x 12 m, long axis 30 degrees north of east
COURTYARD = [
    rect(40, 30, LON0 + 0.002)[::-1],  # clockwise on purpose
    rect(10, 8, LON0 + 0.002)[:-1],  # no closing vertex
]
L_SHAPE = [place([(0, 0), (30, 0), (30, 10), (10, 10), (10, 24), (0, 24)], LON0, LAT0 + 0.002)]
SQUARE = [rect(16, 16, LON0 - 0.002)]
SHAPES = [RECT, COURTYARD, L_SHAPE, SQUARE]


def polygon(rings: list[np.ndarray]) -> shapely.Polygon:
    return shapely.Polygon(rings[0], rings[1:])


def area_m2(rings: list[np.ndarray]) -> float:
    return abs(GEOD.geometry_area_perimeter(polygon(rings))[0])


def open_edges(mesh: Mesh, lon0: float = LON0, lat0: float = LAT0) -> np.ndarray:
    """Directed edges (as welded vertex pairs) without their reverse: a closed surface has
    none; a building without a floor only those round its bottom. Returns (k, 2, 3) ENU
    about (lon0, lat0)."""
    xyz = enu(mesh.positions, lon0, lat0)
    key = np.round(xyz * 1000).astype(np.int64)  # weld at a millimetre
    _, ids = np.unique(key, axis=0, return_inverse=True)
    ids = ids.ravel()
    tri = ids[mesh.triangles]
    # Slivers narrower than the weld (clipping near a corner) collapse: leave them out.
    tri = tri[(tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 2] != tri[:, 0])]
    edges = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    forward = {tuple(e) for e in edges.tolist()}
    assert len(forward) == len(edges), "an edge is used twice in the same direction"
    lonely = np.array([e for e in edges.tolist() if (e[1], e[0]) not in forward])
    first = {i: k for k, i in enumerate(ids.tolist())}
    if not len(lonely):
        return np.zeros((0, 2, 3))
    return np.stack(
        [xyz[[first[a] for a in lonely[:, 0]]], xyz[[first[b] for b in lonely[:, 1]]]], 1
    )


def signed_volume(mesh: Mesh, base_h: float) -> float:
    """Volume enclosed by the mesh and its missing floor at height `base_h`.

    Divergence theorem with the origin on the floor's plane: the floor adds nothing.
    """
    xyz = enu(mesh.positions)
    xyz[:, 2] -= base_h
    a, b, c = (xyz[mesh.triangles[:, k]] for k in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_blocks_are_closed_but_for_the_bottom_and_hold_area_times_height(shape: int) -> None:
    rings = SHAPES[shape]
    mesh = blocks([rings], np.array([300.0]), np.array([325.0]))
    assert mesh.triangles.dtype == np.uint32 and mesh.feature.dtype == np.uint32
    assert np.all(mesh.feature == 0)
    lonely = open_edges(mesh)
    # What stays open is the bottom ring: one edge per footprint edge, all at the bottom.
    assert len(lonely) == sum(len(np.unique(np.round(r, 12), axis=0)) for r in rings)
    up = enu(np.array([[rings[0][0][0], rings[0][0][1], 300.0]]))[0, 2]
    assert np.allclose(lonely[:, :, 2], up, atol=0.01)
    volume = signed_volume(mesh, up)
    assert volume == pytest.approx(area_m2(rings) * 25.0, rel=2e-3)


@pytest.mark.parametrize("kind", ["gable", "hip"])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_roofed_is_closed_and_stays_inside_its_footprint(kind: str, shape: int) -> None:
    rings = SHAPES[shape]
    mesh = roofed([rings], np.array([300.0]), np.array([320.0]), [kind])
    inside = polygon(rings).buffer(1e-8)  # ~1 mm
    assert np.all(shapely.contains_xy(inside, mesh.positions[:, 0], mesh.positions[:, 1]))
    assert mesh.positions[:, 2].max() <= 320.0 + 1e-6
    assert mesh.positions[:, 2].min() == pytest.approx(300.0, abs=1e-6)
    if kind == "gable" or shape != 2:  # a hip's short ridge may miss the L's arms
        assert mesh.positions[:, 2].max() == pytest.approx(320.0, abs=1e-6)
    lonely = open_edges(mesh)
    up = enu(np.array([[*rings[0][0], 300.0]]))[0, 2]
    assert np.allclose(lonely[:, :, 2], up, atol=0.01), "open only round the bottom"
    # No roof below the eaves' plausible range: at most half the height is roof.
    assert mesh.positions[:, 2][mesh.positions[:, 2] > 300.0 + 1e-6].min() >= 310.0 - 1e-6


def _planes(mesh: Mesh) -> dict[tuple, list[int]]:
    """Triangles grouped by plane (ENU unit normal and offset, rounded)."""
    xyz = enu(mesh.positions)
    a, b, c = (xyz[mesh.triangles[:, k]] for k in range(3))
    n = np.cross(b - a, c - a)
    n /= np.linalg.norm(n, axis=1)[:, None]
    offset = np.einsum("ij,ij->i", n, a)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(*np.round(n, 3).T, np.round(offset, 1), strict=True)):
        groups.setdefault(tuple(float(k) for k in key), []).append(i)
    return groups


def _pitch(normal_up: float) -> float:
    return math.degrees(math.acos(normal_up))


def test_gable_on_a_rectangle_has_two_slopes_and_two_triangular_gable_ends() -> None:
    mesh = roofed([RECT], np.array([300.0]), np.array([320.0]), ["gable"])
    groups = _planes(mesh)
    sloped = [k for k in groups if 0.1 < k[2] < 0.999]
    walls = [k for k in groups if abs(k[2]) < 1e-3]
    assert len(groups) == len(sloped) + len(walls)  # nothing else (no floor)
    assert len(sloped) == 2 and len(walls) == 4
    for k in sloped:
        assert _pitch(k[2]) == pytest.approx(PITCH_DEG, abs=0.1)
    # The ridge runs along the long axis (30 degrees north of east): slopes face across it.
    across = np.array([-math.sin(math.radians(30)), math.cos(math.radians(30))])
    for k in sloped:
        horizontal = np.array(k[:2]) / np.hypot(k[0], k[1])
        assert abs(horizontal @ across) == pytest.approx(1.0, abs=1e-3)
    eave = 320.0 - 6.0 * math.tan(math.radians(PITCH_DEG))
    ends = 0
    for k in walls:
        idx = np.unique(mesh.triangles[groups[k]].ravel())
        h = mesh.positions[idx, 2]
        above = np.unique(np.round(mesh.positions[idx][h > eave + 0.01], 9), axis=0)
        if len(above):  # a gable end: one apex above the eaves, at the ridge
            ends += 1
            assert len(above) == 1
            assert above[0, 2] == pytest.approx(320.0, abs=1e-6)
        else:  # a long wall: straight up to the eaves
            assert h.max() == pytest.approx(eave, abs=1e-4)
    assert ends == 2
    heights = mesh.positions[:, 2]
    assert heights.max() == pytest.approx(320.0, abs=1e-6)
    assert np.unique(np.round(heights, 3)).tolist() == [300.0, round(eave, 3), 320.0]


def test_hip_on_a_rectangle_has_four_slopes_and_a_shorter_ridge() -> None:
    mesh = roofed([RECT], np.array([300.0]), np.array([320.0]), ["hip"])
    groups = _planes(mesh)
    sloped = [k for k in groups if 0.1 < k[2] < 0.999]
    walls = [k for k in groups if abs(k[2]) < 1e-3]
    assert len(sloped) == 4 and len(walls) == 4 and len(groups) == 8
    for k in sloped:
        assert _pitch(k[2]) == pytest.approx(PITCH_DEG, abs=0.1)
    ridge = np.unique(np.round(mesh.positions[mesh.positions[:, 2] > 319.999], 9), axis=0)
    assert len(ridge) == 2
    _, _, length = GEOD.inv(ridge[0, 0], ridge[0, 1], ridge[1, 0], ridge[1, 1])
    assert length == pytest.approx(20.0 - 12.0, abs=0.01)
    # Every wall is straight up to the eaves (no gable ends).
    eave = 320.0 - 6.0 * math.tan(math.radians(PITCH_DEG))
    assert np.unique(np.round(mesh.positions[:, 2], 3)).tolist() == [300.0, round(eave, 3), 320.0]
    volume = signed_volume(mesh, enu(np.array([[*RECT[0][0], 300.0]]))[0, 2])
    rise = 320.0 - eave
    expected = 20 * 12 * (20.0 - rise) + rise * 12 * (3 * 20 - 12) / 6
    assert volume == pytest.approx(expected, rel=2e-3)


def test_hip_on_a_square_is_a_pyramid() -> None:
    mesh = roofed([SQUARE], np.array([300.0]), np.array([320.0]), ["hip"])
    apex = np.unique(np.round(mesh.positions[mesh.positions[:, 2] > 319.999], 9), axis=0)
    assert len(apex) == 1
    centre = np.asarray(shapely.centroid(polygon(SQUARE)).coords)[0]
    assert np.allclose(apex[0, :2], centre, atol=1e-8)
    assert len([k for k in _planes(mesh) if 0.1 < k[2] < 0.999]) == 4


def test_gable_volume_and_the_rise_cap() -> None:
    base = enu(np.array([[*RECT[0][0], 300.0]]))[0, 2]
    mesh = roofed([RECT], np.array([300.0]), np.array([320.0]), ["gable"])
    rise = 6.0 * math.tan(math.radians(PITCH_DEG))
    assert signed_volume(mesh, base) == pytest.approx(20 * 12 * (20 - rise / 2), rel=2e-3)
    # A low, wide shed: the pitch would take 3.46 m of 5 m; the cap leaves the walls half.
    shed = roofed([RECT], np.array([300.0]), np.array([305.0]), ["gable"])
    heights = np.unique(np.round(shed.positions[:, 2], 4)).tolist()
    assert heights == [300.0, 305.0 - MAX_RISE_SHARE * 5.0, 305.0]


def test_flat_roofed_is_the_block() -> None:
    a = roofed(SHAPES, np.full(4, 300.0), np.full(4, 330.0), ["flat"] * 4)
    b = blocks(SHAPES, np.full(4, 300.0), np.full(4, 330.0))
    assert len(a.triangles) == len(b.triangles)
    assert np.allclose(np.sort(a.positions, axis=0), np.sort(b.positions, axis=0))
    assert a.positions[:, 2].max() == 330.0


def test_feature_is_the_footprint_index_and_bad_footprints_are_left_out() -> None:
    collinear = [np.array([[LON0, LAT0], [LON0 + 1e-4, LAT0], [LON0 + 2e-4, LAT0]])]
    footprints = [RECT, collinear, [], [np.zeros((0, 2))], COURTYARD, [RECT[0][:2]]]
    kinds = ["hip", "gable", "flat", "hip", "gable", "flat"]
    for mesh in (
        blocks(footprints, np.full(6, 300.0), np.full(6, 310.0)),
        roofed(footprints, np.full(6, 300.0), np.full(6, 310.0), kinds),
    ):
        assert set(np.unique(mesh.feature).tolist()) == {0, 4}
        for row, rings in ((0, RECT), (4, COURTYARD)):
            mine = mesh.positions[mesh.feature == row]
            inside = polygon(rings).buffer(1e-8)
            assert np.all(shapely.contains_xy(inside, mine[:, 0], mine[:, 1]))


def test_orientation_closing_vertex_and_repeats_do_not_matter() -> None:
    ring = RECT[0]
    variants = [
        [ring],
        [ring[::-1]],
        [ring[:-1]],
        [np.insert(ring, 2, ring[2], axis=0)],  # a repeated vertex
    ]
    for kind in ROOF_TYPES:
        meshes = [roofed([v], np.array([300.0]), np.array([318.0]), [kind]) for v in variants]
        ref = _rows(meshes[0].positions)
        for m in meshes[1:]:
            assert len(m.triangles) == len(meshes[0].triangles)
            assert np.allclose(_rows(m.positions), ref, rtol=0, atol=1e-9)
            assert np.isclose(signed_volume(m, 0.0), signed_volume(meshes[0], 0.0), rtol=1e-6)


def _rows(positions: np.ndarray) -> np.ndarray:
    """Distinct positions (to a millimetre) in a fixed order."""
    keys = np.round(positions * [1e8, 1e8, 1e3]).astype(np.int64)
    _, first = np.unique(keys, axis=0, return_index=True)
    return positions[np.sort(first)][np.lexsort(keys[np.sort(first)].T[::-1])]


def test_input_corners_are_kept_exactly() -> None:
    mesh = blocks([COURTYARD], np.array([300.0]), np.array([310.0]))
    for ring in COURTYARD:
        for corner in ring:
            assert np.any(np.all(mesh.positions[:, :2] == corner, axis=1))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown roof"):
        roofed([RECT], np.array([0.0]), np.array([10.0]), ["mansard"])
    with pytest.raises(ValueError, match="one roof type"):
        roofed([RECT, RECT], np.zeros(2), np.full(2, 10.0), ["flat"])
    # A top not above the bottom gets a token height instead of a flat sheet of triangles.
    mesh = blocks([RECT], np.array([300.0]), np.array([290.0]))
    assert mesh.positions[:, 2].max() == pytest.approx(300.1)
    assert len(blocks([], np.zeros(0), np.zeros(0)).triangles) == 0
    assert len(roofed([], np.zeros(0), np.zeros(0), []).triangles) == 0


def _box_faces(w: float, d: float, h: float, base: float) -> list[list[np.ndarray]]:
    """A w x d x h box as CityJSON surfaces: counter-clockwise seen from outside."""
    corner = place([(0, 0), (w, 0), (w, d), (0, d)], LON0 + 0.004, LAT0)
    lo = [np.r_[c, base] for c in corner]
    hi = [np.r_[c, base + h] for c in corner]
    faces = [
        [np.array([lo[0], lo[3], lo[2], lo[1]])],  # floor, facing down
        [np.array([hi[0], hi[1], hi[2], hi[3], hi[0]])],  # roof (with a closing vertex)
    ]
    for i in range(4):
        j = (i + 1) % 4
        faces.append([np.array([lo[i], lo[j], hi[j], hi[i]])])
    return faces


def test_polygon_surfaces_make_a_watertight_outward_solid() -> None:
    faces = _box_faces(12.0, 8.0, 9.0, 250.0)
    mesh = polygon_surfaces(faces, np.full(len(faces), 3, np.uint32))
    assert np.all(mesh.feature == 3)
    assert len(mesh.positions) == 4 * 6  # no vertex shared between faces
    solid = trimesh.Trimesh(enu(mesh.positions), mesh.triangles.astype(np.int64), process=True)
    assert solid.is_watertight and solid.is_winding_consistent
    assert solid.volume == pytest.approx(12 * 8 * 9, rel=2e-3)  # positive: faces point out


def test_polygon_surfaces_keep_holes_and_skip_degenerate_polygons() -> None:
    wall = place([(0, 0), (10, 0)], LON0, LAT0 - 0.003)
    window = place([(3, 0), (7, 0)], LON0, LAT0 - 0.003)
    outer = np.array([[*wall[0], 100], [*wall[1], 100], [*wall[1], 106], [*wall[0], 106]])
    hole = np.array([[*window[0], 102], [*window[0], 104], [*window[1], 104], [*window[1], 102]])
    line = np.array([[*wall[0], 100], [*wall[1], 100], [*wall[1], 100]])
    mesh = polygon_surfaces([[outer, hole], [line]], np.array([0, 1]))
    assert set(mesh.feature.tolist()) == {0}
    xyz = enu(mesh.positions)
    a, b, c = (xyz[mesh.triangles[:, k]] for k in range(3))
    n = np.cross(b - a, c - a)
    assert np.linalg.norm(n, axis=1).sum() / 2 == pytest.approx(10 * 6 - 4 * 2, rel=1e-3)
    # Counter-clockwise seen from the south (outside): normals point south.
    assert np.all(n[:, 1] < 0)
    with pytest.raises(ValueError, match="one feature"):
        polygon_surfaces([[outer]], np.array([0, 1]))


def test_footprint_rings_reads_shapely_polygons() -> None:
    courtyard = polygon(COURTYARD)
    multi = shapely.MultiPolygon([polygon(SQUARE), polygon(L_SHAPE)])
    got = footprint_rings([polygon(RECT), None, shapely.Polygon(), courtyard, multi])
    assert [len(r) for r in got] == [1, 0, 0, 2, 1]
    assert np.array_equal(got[0][0], np.asarray(polygon(RECT).exterior.coords))
    assert np.array_equal(got[3][1], np.asarray(courtyard.interiors[0].coords))
    assert np.array_equal(got[4][0], np.asarray(polygon(L_SHAPE).exterior.coords))  # larger
    mesh = blocks(got, np.full(5, 300.0), np.full(5, 310.0))
    assert set(np.unique(mesh.feature).tolist()) == {0, 3, 4}


def _varied_footprints(n: int, seed: int) -> list[shapely.Polygon]:
    """Valid footprints of many kinds: star polygons, unions of boxes (L, T, U shapes),
    turned rectangles with a courtyard, rounded (buffered) outlines; metres near LON0/LAT0."""
    rng = np.random.default_rng(seed)
    k = 1e-5  # ~1 m in degrees
    shapes: list[shapely.Polygon] = []
    while len(shapes) < n:
        x0, y0 = LON0 + rng.random() * 0.01, LAT0 + rng.random() * 0.01
        kind = len(shapes) % 4
        if kind == 0:
            a = np.sort(rng.random(int(rng.integers(5, 14)))) * 2 * np.pi
            r = 5 + rng.random(len(a)) * 15
            g = shapely.Polygon(np.column_stack((x0 + r * np.cos(a) * k, y0 + r * np.sin(a) * k)))
        elif kind == 1:
            boxes = rng.random((3, 4)) * [20, 20, 15, 15] + [0, 0, 5, 5]
            g = shapely.union_all(
                [
                    shapely.box(x0 + x * k, y0 + y * k, x0 + (x + w) * k, y0 + (y + h) * k)
                    for x, y, w, h in boxes
                ]
            )
        elif kind == 2:
            ring = shapely.box(0, 0, 30, 20).difference(shapely.box(10, 5, 18, 12))
            turned = shapely.affinity.rotate(ring, rng.random() * 180, origin=(0, 0))
            g = shapely.affinity.translate(
                shapely.affinity.scale(turned, k, k, origin=(0, 0)), x0, y0
            )
        else:
            line = np.column_stack((x0 + rng.random(3) * 30 * k, y0 + rng.random(3) * 30 * k))
            g = shapely.LineString(line).buffer(4 * k, quad_segs=3)
        if isinstance(g, shapely.Polygon) and g.is_valid and g.area > 0:
            shapes.append(g)
    return shapes


def test_roofs_on_varied_footprints_stay_inside_closed_and_valid() -> None:
    shapes = _varied_footprints(80, seed=7)
    n = len(shapes)
    bottom = 200 + np.arange(n) % 7
    top = bottom + 6 + (np.arange(n) * 7) % 30
    kinds = [ROOF_TYPES[i % 3] for i in range(n)]
    mesh = roofed(footprint_rings(shapes), bottom, top, kinds)
    assert set(np.unique(mesh.feature).tolist()) == set(range(n))
    for j, shape in enumerate(shapes):
        sel = np.flatnonzero(mesh.feature == j)
        pts = mesh.positions[sel]
        inside = shape.buffer(1e-8)
        assert np.all(shapely.contains_xy(inside, pts[:, 0], pts[:, 1])), j
        assert pts[:, 2].max() <= top[j] + 1e-6 and pts[:, 2].min() >= bottom[j] - 1e-6
        remap = np.full(len(mesh.positions), -1)
        remap[sel] = np.arange(len(sel))
        own = mesh.triangles[np.isin(mesh.triangles[:, 0], sel)]
        lon0, lat0 = pts[0, :2]
        lonely = open_edges(Mesh(pts, remap[own], mesh.feature[sel]), lon0, lat0)
        floor = enu(np.array([[lon0, lat0, bottom[j]]]), lon0, lat0)[0, 2]
        assert np.allclose(lonely[:, :, 2], floor, atol=0.01), (j, kinds[j])
    data = glb(mesh, FeatureTable("building", [Property("id", "UINT32", list(range(n)))]))
    report = validate(data)
    assert report["issues"]["numErrors"] == 0 and problems(report, data) == []
