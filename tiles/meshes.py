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

import mapbox_earcut
import numpy as np

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
