"""Triangle meshes on the globe: what the 3D Tiles content of buildings is made of.

A `Mesh` holds vertices as longitude, latitude (degrees) and height (metres above the WGS84
ellipsoid), triangles counter-clockwise seen from outside, and for each vertex the row of its
feature in the tile's property table. Producers (`tiles/roofs.py`, `polygon_surfaces` here)
never share a vertex between faces that are not coplanar, so `tiles/glb.py` can give every
vertex the flat normal of its face.

Shapes are built in a local metric frame per building: an equirectangular projection about a
point with the ellipsoid's radii of curvature there (east metres = dlon * N cos(lat0),
north metres = dlat * M). At building scale (< 1 km) it is within millimetres of a true
tangent plane, and it inverts exactly, so vertices taken from the input keep their input
coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mapbox_earcut
import numpy as np
import shapely

_A = 6378137.0  # WGS84 semi-major axis (m)
_E2 = 6.69437999014e-3  # WGS84 first eccentricity squared


@dataclass
class Mesh:
    """Triangles on the globe.

    positions: (V, 3) float64 longitude deg, latitude deg, height m above the WGS84 ellipsoid.
    triangles: (T, 3) uint32 vertex indices, counter-clockwise seen from outside.
    feature: (V,) uint32 row of the vertex's feature in the property table.
    colors: (V, 4) uint8 RGBA per vertex, or None for the material's colour.
    """

    positions: np.ndarray
    triangles: np.ndarray
    feature: np.ndarray
    colors: np.ndarray | None = None

    @classmethod
    def empty(cls) -> Mesh:
        return cls(
            np.zeros((0, 3), np.float64), np.zeros((0, 3), np.uint32), np.zeros(0, np.uint32)
        )


def merge(meshes: Sequence[Mesh]) -> Mesh:
    """One mesh holding all of `meshes` (feature rows kept as they are).

    Colours survive only if every mesh has them; a mix drops them (the material colour then).
    """
    meshes = [m for m in meshes if len(m.positions)]
    if not meshes:
        return Mesh.empty()
    if len(meshes) == 1:
        return meshes[0]
    offsets = np.cumsum([0] + [len(m.positions) for m in meshes[:-1]]).astype(np.uint32)
    triangles = np.concatenate(
        [m.triangles.astype(np.uint32) + off for m, off in zip(meshes, offsets, strict=True)]
    )
    colors = None
    if all(m.colors is not None for m in meshes):
        colors = np.concatenate([m.colors for m in meshes if m.colors is not None])
    return Mesh(
        np.concatenate([m.positions for m in meshes]),
        triangles.reshape(-1, 3),
        np.concatenate([m.feature for m in meshes]).astype(np.uint32),
        colors,
    )


def footprint_rings(polygons: Sequence[Any] | np.ndarray) -> list[list[np.ndarray]]:
    """Shapely polygons as the ring lists `tiles.roofs` takes ((k, 2) lon/lat each, exterior
    first), all at once: ~6x faster than reading each polygon's rings in Python.

    A MultiPolygon gives its largest part; None or an empty geometry gives no rings (the
    footprint is then left out of the mesh).
    """
    geoms = np.asarray(polygons, dtype=object).copy()
    multi = np.flatnonzero(shapely.get_type_id(geoms) == 6)
    for k in multi:
        parts = shapely.get_parts(geoms[k])
        geoms[k] = parts[int(np.argmax(shapely.area(parts)))] if len(parts) else None
    out: list[list[np.ndarray]] = [[] for _ in range(len(geoms))]
    rings, owner = shapely.get_rings(geoms, return_index=True)
    if not len(rings):
        return out
    coords, ring = shapely.get_coordinates(rings, return_index=True)
    cuts = np.flatnonzero(np.diff(ring)) + 1
    for k, part in zip(owner.tolist(), np.split(coords, cuts), strict=True):
        out[k].append(part)
    return out


def metres_per_degree(lat0: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(east, north) metres per degree of longitude and latitude at latitude `lat0`."""
    phi = np.radians(lat0)
    w = 1.0 - _E2 * np.sin(phi) ** 2
    n = _A / np.sqrt(w)  # prime vertical radius of curvature
    m = _A * (1.0 - _E2) / w**1.5  # meridional radius of curvature
    return np.radians(1.0) * n * np.cos(phi), np.radians(1.0) * m


def to_local(
    lon: np.ndarray, lat: np.ndarray, lon0: np.ndarray | float, lat0: np.ndarray | float
) -> np.ndarray:
    """(n, 2) east/north metres of lon/lat about (lon0, lat0) (scalars or per point)."""
    kx, ky = metres_per_degree(lat0)
    return np.column_stack(((lon - lon0) * kx, (lat - lat0) * ky))


def from_local(
    xy: np.ndarray, lon0: np.ndarray | float, lat0: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `to_local`: (lon, lat) degrees."""
    kx, ky = metres_per_degree(lat0)
    return lon0 + xy[:, 0] / kx, lat0 + xy[:, 1] / ky


def triangulate(xy: np.ndarray, ring_ends: Sequence[int] | np.ndarray) -> np.ndarray:
    """(T, 3) uint32 ear-clipped triangles of a 2D polygon, counter-clockwise.

    xy: (n, 2) rings one after another (exterior first, then holes), no closing vertex;
    ring_ends: the index one past each ring's last vertex.
    """
    if len(xy) < 3:
        return np.zeros((0, 3), np.uint32)
    tri = mapbox_earcut.triangulate_float64(
        np.ascontiguousarray(xy, np.float64), np.asarray(ring_ends, np.uint32)
    ).reshape(-1, 3)
    if len(tri):
        a, b, c = xy[tri[:, 0]], xy[tri[:, 1]], xy[tri[:, 2]]
        cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (
            c[:, 0] - a[:, 0]
        )
        flip = cross < 0
        tri[flip] = tri[flip][:, ::-1]
    return tri.astype(np.uint32)


@dataclass
class Rings:
    """Polygons in a plane as rings one after another: each polygon's exterior, then its holes.

    Exteriors run counter-clockwise and holes clockwise, without a closing vertex, repeated
    vertices or rings of no area. `source` maps each vertex back to the input of `clean_rings`.
    """

    xy: np.ndarray  # (n, 2)
    source: np.ndarray  # (n,) index of the vertex in the input
    next: np.ndarray  # (n,) the next vertex of the same ring (cyclic)
    ring_start: np.ndarray  # (r,)
    ring_end: np.ndarray  # (r,)
    ring_polygon: np.ndarray  # (r,) non-decreasing
    polygon_ok: np.ndarray  # (p,) the polygon kept a usable exterior


def _ring_bounds(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start, end and each vertex's cyclic successor of rings of `sizes` laid end to end."""
    end = np.cumsum(sizes)
    start = end - sizes
    nxt = np.arange(int(end[-1]) if len(end) else 0) + 1
    full = sizes > 0
    nxt[end[full] - 1] = start[full]
    return start, end, nxt


def clean_rings(
    xy: np.ndarray,
    ring_sizes: np.ndarray,
    ring_polygon: np.ndarray,
    ring_exterior: np.ndarray,
    n_polygons: int,
    tolerance: float = 1e-4,
    min_area: float = 1e-4,
) -> Rings:
    """Rings of planar polygons made usable, all at once (no loop per polygon).

    xy: (n, 2) metric coordinates of rings laid end to end, `ring_sizes` long each, ring i of
    polygon `ring_polygon[i]` (non-decreasing), its exterior where `ring_exterior`. Drops
    closing and repeated vertices (closer than `tolerance`), rings with fewer than 3 vertices
    or less area than `min_area`, and polygons whose exterior went; orients what is left.
    """
    ring_sizes = np.asarray(ring_sizes, np.int64)
    ring_polygon = np.asarray(ring_polygon, np.int64)
    ring_exterior = np.asarray(ring_exterior, bool)
    n_rings = len(ring_sizes)
    ring_v = np.repeat(np.arange(n_rings), ring_sizes)
    source = np.arange(len(xy))
    _, _, nxt = _ring_bounds(ring_sizes)
    keep = np.max(np.abs(xy - xy[nxt]), axis=1) > tolerance if len(xy) else np.zeros(0, bool)
    xy, ring_v, source = xy[keep], ring_v[keep], source[keep]
    sizes = np.bincount(ring_v, minlength=n_rings)
    start, end, nxt = _ring_bounds(sizes)
    cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1] if len(xy) else np.zeros(0)
    area = np.bincount(ring_v, cross, minlength=n_rings) / 2.0
    ring_ok = (sizes >= 3) & (np.abs(area) > min_area)
    polygon_ok = np.zeros(n_polygons, bool)
    polygon_ok[ring_polygon[ring_exterior & ring_ok]] = True
    ring_ok &= polygon_ok[ring_polygon]
    vert_ok = ring_ok[ring_v]
    xy, ring_v, source = xy[vert_ok], ring_v[vert_ok], source[vert_ok]
    sizes = np.where(ring_ok, sizes, 0)
    start, end, _ = _ring_bounds(sizes)
    # Exteriors counter-clockwise, holes clockwise: reverse the others in place.
    flip = np.where(ring_exterior, area < 0, area > 0)[ring_v]
    idx = np.arange(len(xy))
    order = np.where(flip, start[ring_v] + end[ring_v] - 1 - idx, idx)
    sizes = sizes[ring_ok]
    start, end, nxt = _ring_bounds(sizes)
    return Rings(
        xy=xy[order],
        source=source[order],
        next=nxt,
        ring_start=start,
        ring_end=end,
        ring_polygon=ring_polygon[ring_ok],
        polygon_ok=polygon_ok,
    )


def convex_rings(rings: Rings) -> np.ndarray:
    """(r,) whether each ring is convex (no vertex turns against the ring's direction;
    collinear vertices are fine). Rings come from `clean_rings`, so exteriors turn left."""
    r = rings
    if not len(r.ring_start):
        return np.zeros(0, bool)
    prev = np.empty_like(r.next)
    prev[r.next] = np.arange(len(r.next))
    d0 = r.xy - r.xy[prev]
    d1 = r.xy[r.next] - r.xy
    turn = d0[:, 0] * d1[:, 1] - d0[:, 1] * d1[:, 0]
    scale = np.maximum.reduceat(np.abs(turn), r.ring_start)
    return np.minimum.reduceat(turn, r.ring_start) >= -1e-9 * scale


def triangulate_rings(rings: Rings, polygons: np.ndarray | None = None) -> np.ndarray:
    """(T, 3) int64 triangles (indices into rings.xy), counter-clockwise, of `polygons`.

    A convex polygon without holes (most footprints and clipped roof planes) is fanned, all
    of them at once; the others go through earcut one by one.
    """
    r = rings
    if polygons is None:
        ring_sel = np.ones(len(r.ring_start), bool)
    else:
        wanted = np.zeros(len(r.polygon_ok), bool)
        wanted[polygons] = True
        ring_sel = wanted[r.ring_polygon]
    if not ring_sel.any():
        return np.zeros((0, 3), np.int64)
    n_rings_of = np.bincount(r.ring_polygon, minlength=len(r.polygon_ok))
    sizes = r.ring_end - r.ring_start
    ring_v = np.repeat(np.arange(len(sizes)), sizes)
    convex = convex_rings(r)
    fan_ring = ring_sel & convex & (n_rings_of[r.ring_polygon] == 1)
    v = np.arange(len(r.xy))
    rs = r.ring_start[ring_v]
    fan_v = fan_ring[ring_v] & (v > rs) & (v < r.ring_end[ring_v] - 1)
    fans = np.column_stack((rs[fan_v], v[fan_v], v[fan_v] + 1))
    parts = [fans]
    ear_rings = np.flatnonzero(ring_sel & ~fan_ring)
    if len(ear_rings):
        poly = r.ring_polygon[ear_rings]
        cut = np.flatnonzero(np.diff(poly)) + 1
        for group in np.split(ear_rings, cut):
            s, e = r.ring_start[group[0]], r.ring_end[group[-1]]
            tri = triangulate(r.xy[s:e], r.ring_end[group] - s)
            parts.append(tri.astype(np.int64) + s)
    tri = np.concatenate(parts)
    a, b, c = r.xy[tri[:, 0]], r.xy[tri[:, 1]], r.xy[tri[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    flip = cross < 0
    tri[flip] = tri[flip][:, ::-1]
    return tri


def _clean_ring(ring: np.ndarray) -> np.ndarray:
    """The ring without its closing vertex and without repeated consecutive vertices."""
    if len(ring) == 0:
        return ring
    keep = np.any(ring != np.roll(ring, -1, axis=0), axis=1)
    return ring[keep]


def polygon_surfaces(polygons: Sequence[Sequence[np.ndarray]], feature: np.ndarray) -> Mesh:
    """Triangles of planar 3D polygons, each in its own plane (as CityJSON LOD2 surfaces come).

    polygons: each a list of rings (k, 3) lon, lat, h; exterior first, then holes; the exterior
    counter-clockwise seen from outside (CityJSON's rule: its normal by the right-hand rule
    points out of the solid). A closing vertex is allowed.
    feature: (len(polygons),) the property-table row of each polygon.

    Each polygon gets its own vertices (flat shading). Polygons with fewer than 3 distinct
    vertices or no area are skipped.
    """
    feature = np.asarray(feature, np.uint32)
    if len(feature) != len(polygons):
        raise ValueError("one feature row per polygon")
    positions: list[np.ndarray] = []
    triangles: list[np.ndarray] = []
    features: list[np.ndarray] = []
    count = 0
    for rings_in, row in zip(polygons, feature, strict=True):
        rings = [_clean_ring(np.asarray(r, np.float64)[:, :3]) for r in rings_in]
        if not rings or len(rings[0]) < 3:
            continue
        rings = [rings[0]] + [r for r in rings[1:] if len(r) >= 3]
        pts = np.concatenate(rings)
        lon0, lat0 = float(pts[:, 0].mean()), float(pts[:, 1].mean())
        h0 = float(pts[:, 2].mean())
        local = np.column_stack((to_local(pts[:, 0], pts[:, 1], lon0, lat0), pts[:, 2] - h0))
        # Newell's normal of the exterior ring: robust for non-convex and nearly planar rings.
        ext = local[: len(rings[0])]
        nxt = np.roll(ext, -1, axis=0)
        normal = np.array(
            [
                np.sum((ext[:, 1] - nxt[:, 1]) * (ext[:, 2] + nxt[:, 2])),
                np.sum((ext[:, 2] - nxt[:, 2]) * (ext[:, 0] + nxt[:, 0])),
                np.sum((ext[:, 0] - nxt[:, 0]) * (ext[:, 1] + nxt[:, 1])),
            ]
        )
        length = np.linalg.norm(normal)
        if length < 1e-12:
            continue
        normal /= length
        # A basis (e1, e2) of the plane with e1 x e2 = normal: the exterior is then
        # counter-clockwise in (e1, e2), and so are the triangles `triangulate` returns.
        helper = np.array([0.0, 0.0, 1.0]) if abs(normal[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
        e1 = np.cross(helper, normal)
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(normal, e1)
        uv = np.column_stack((local @ e1, local @ e2))
        ends = np.cumsum([len(r) for r in rings])
        tri = triangulate(uv, ends)
        if not len(tri):
            continue
        positions.append(pts)
        triangles.append(tri + np.uint32(count))
        features.append(np.full(len(pts), row, np.uint32))
        count += len(pts)
    if not positions:
        return Mesh.empty()
    return Mesh(np.concatenate(positions), np.concatenate(triangles), np.concatenate(features))
