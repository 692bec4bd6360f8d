"""Buildings as solids from footprints: LOD1 blocks and LOD2 roof forms (CIM2 and CIM3).

A footprint is a list of rings (k, 2) lon/lat: the exterior first, then holes (courtyards), in
any orientation, a closing vertex allowed. Walls stand from `bottom` to the roof; the roof is
flat (a block), a gable or a hip over the footprint's oriented minimum rectangle, clipped to
the footprint. There is no floor: a building sits in the terrain, and no one looks at it
from below. Every vertex's feature is the index of its footprint in the input.

The LOD2 roof is the lower envelope of up to four planes over the rectangle (the roof is
concave: where planes meet, the lower one wins), so one height function h(x, y) gives both the
roof surface and the top of the walls, and the wall tops meet the roof's eaves exactly:
- gable: two planes rising from the long sides to a ridge along the long axis at `top`;
- hip: the gable's two planes plus one at each short end with the same pitch; the ridge is
  shorter by the width (a square gives a pyramid).
The pitch is 30 degrees, its rise capped at half of the building's height so the walls keep
at least half of it. Work happens in a local metric frame per building (tiles/meshes.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely

from tiles.meshes import Mesh, from_local, merge, to_local, triangulate

ROOF_TYPES = ("flat", "gable", "hip")

PITCH_DEG = 30.0
MAX_RISE_SHARE = 0.5  # the roof takes at most this share of the building's height
MIN_HEIGHT_M = 0.1  # a building lower than this (or with top below bottom) is given this height
_DUPLICATE_M = 1e-4  # consecutive vertices closer than this are one vertex
_MIN_AREA_M2 = 1e-4  # rings with less area than this are dropped

_QUAD = np.array([[0, 1, 2], [0, 2, 3]], np.uint32)


@dataclass
class _Rings:
    """Cleaned footprints, all rings one after another.

    Exteriors are counter-clockwise and holes clockwise (seen from above), so walls built
    along each ring's direction face outwards. Footprints without a usable exterior are gone.
    """

    lonlat: np.ndarray  # (n, 2) input coordinates of the kept vertices
    xy: np.ndarray  # (n, 2) east/north metres about the footprint's origin
    owner: np.ndarray  # (n,) footprint index of each vertex
    next: np.ndarray  # (n,) index of the next vertex in the same ring (cyclic)
    ring_start: np.ndarray  # (r,)
    ring_end: np.ndarray  # (r,)
    ring_owner: np.ndarray  # (r,)
    origin: np.ndarray  # (F, 2) lon/lat origin of each input footprint's frame
    kept: np.ndarray  # (k,) indices of the footprints that have a usable exterior


def _prepare(footprints: Sequence[Sequence[np.ndarray]]) -> _Rings:
    rings: list[np.ndarray] = []
    ring_owner_l: list[int] = []
    ring_exterior_l: list[bool] = []
    for i, fp in enumerate(footprints):
        for j, ring in enumerate(fp):
            arr = np.asarray(ring, np.float64)
            rings.append(arr[:, :2] if arr.ndim == 2 else arr.reshape(-1, 2))
            ring_owner_l.append(i)
            ring_exterior_l.append(j == 0)
    n_fp = len(footprints)
    if not rings:
        return _empty_rings(n_fp)
    sizes = np.array([len(r) for r in rings], np.int64)
    lonlat = np.concatenate(rings)
    ring_owner = np.array(ring_owner_l, np.int64)
    ring_exterior = np.array(ring_exterior_l, bool)
    ring_v = np.repeat(np.arange(len(rings)), sizes)
    owner = ring_owner[ring_v]

    # The frame's origin: the mean of the exterior's vertices.
    ext_v = ring_exterior[ring_v]
    counts = np.bincount(owner[ext_v], minlength=n_fp).astype(np.float64)
    counts[counts == 0] = 1.0
    origin = np.column_stack(
        (
            np.bincount(owner[ext_v], lonlat[ext_v, 0], minlength=n_fp) / counts,
            np.bincount(owner[ext_v], lonlat[ext_v, 1], minlength=n_fp) / counts,
        )
    )
    xy = to_local(lonlat[:, 0], lonlat[:, 1], origin[owner, 0], origin[owner, 1])

    # Drop the closing vertex and repeated vertices: a vertex equal to the next one goes.
    start = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    end = start + sizes
    nxt = np.arange(len(xy)) + 1
    nxt[end[sizes > 0] - 1] = start[sizes > 0]
    keep = np.max(np.abs(xy - xy[nxt]), axis=1) > _DUPLICATE_M
    lonlat, xy, owner, ring_v = lonlat[keep], xy[keep], owner[keep], ring_v[keep]
    sizes = np.bincount(ring_v, minlength=len(rings))

    # Signed area of each ring (shoelace), then which rings and footprints survive.
    start = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    end = start + sizes
    nxt = np.arange(len(xy)) + 1
    nxt[end[sizes > 0] - 1] = start[sizes > 0]
    cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1] if len(xy) else np.zeros(0)
    area = np.bincount(ring_v, cross, minlength=len(rings)) / 2.0
    ring_ok = (sizes >= 3) & (np.abs(area) > _MIN_AREA_M2)
    fp_ok = np.zeros(n_fp, bool)
    fp_ok[ring_owner[ring_exterior & ring_ok]] = True
    ring_ok &= fp_ok[ring_owner]
    vert_ok = ring_ok[ring_v]
    lonlat, xy, owner, ring_v = lonlat[vert_ok], xy[vert_ok], owner[vert_ok], ring_v[vert_ok]
    sizes = np.where(ring_ok, sizes, 0)

    # Exteriors counter-clockwise, holes clockwise: reverse the others in place.
    start = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    end = start + sizes
    flip = np.where(ring_exterior, area < 0, area > 0)[ring_v]
    idx = np.arange(len(xy))
    order = np.where(flip, start[ring_v] + end[ring_v] - 1 - idx, idx)
    lonlat, xy = lonlat[order], xy[order]
    nxt = idx + 1
    nxt[end[ring_ok] - 1] = start[ring_ok]
    return _Rings(
        lonlat=lonlat,
        xy=xy,
        owner=owner,
        next=nxt,
        ring_start=start[ring_ok],
        ring_end=end[ring_ok],
        ring_owner=ring_owner[ring_ok],
        origin=origin,
        kept=np.flatnonzero(fp_ok),
    )


def _empty_rings(n_fp: int) -> _Rings:
    z = np.zeros(0, np.int64)
    return _Rings(np.zeros((0, 2)), np.zeros((0, 2)), z, z, z, z, z, np.zeros((n_fp, 2)), z)


def _heights(bottom: np.ndarray, top: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    bottom = np.broadcast_to(np.asarray(bottom, np.float64), (n,))
    top = np.broadcast_to(np.asarray(top, np.float64), (n,))
    return bottom, np.maximum(top, bottom + MIN_HEIGHT_M)


def _flat_walls(r: _Rings, bottom: np.ndarray, top: np.ndarray) -> Mesh:
    """One quad per ring edge from bottom to top (the walls of a block)."""
    n = len(r.xy)
    a, b = r.lonlat, r.lonlat[r.next]
    bot, tp = bottom[r.owner], top[r.owner]
    pos = np.empty((n, 4, 3))
    pos[:, 0, :2], pos[:, 0, 2] = a, bot
    pos[:, 1, :2], pos[:, 1, 2] = b, bot
    pos[:, 2, :2], pos[:, 2, 2] = b, tp
    pos[:, 3, :2], pos[:, 3, 2] = a, tp
    tri = (np.arange(n, dtype=np.uint32)[:, None, None] * 4 + _QUAD[None]).reshape(-1, 3)
    return Mesh(pos.reshape(-1, 3), tri, np.repeat(r.owner, 4).astype(np.uint32))


def _flat_roofs(r: _Rings, which: np.ndarray, top: np.ndarray) -> Mesh:
    """Each footprint in `which` triangulated at its top height."""
    ring_first = np.searchsorted(r.ring_owner, which, side="left")
    ring_last = np.searchsorted(r.ring_owner, which, side="right")
    tris: list[np.ndarray] = []
    for f0, f1 in zip(ring_first, ring_last, strict=True):
        s, e = r.ring_start[f0], r.ring_end[f1 - 1]
        tri = triangulate(r.xy[s:e], r.ring_end[f0:f1] - s)
        tris.append(tri.astype(np.int64) + s)
    if not tris:
        return Mesh.empty()
    tri = np.concatenate(tris)
    used = np.zeros(len(r.xy), bool)
    used[tri.ravel()] = True
    remap = np.cumsum(used) - 1
    pos = np.column_stack((r.lonlat[used], top[r.owner[used]]))
    return Mesh(pos, remap[tri].astype(np.uint32), r.owner[used].astype(np.uint32))


def blocks(footprints: Sequence[Sequence[np.ndarray]], bottom: np.ndarray, top: np.ndarray) -> Mesh:
    """LOD1 blocks: walls from `bottom` to `top` (m, ellipsoidal) and a flat roof at `top`.

    No floor (a block sits in the terrain). Feature of each vertex = its footprint's index.
    Footprints without an exterior of 3 distinct vertices and some area are left out; a `top`
    not above `bottom` is raised to `bottom` + MIN_HEIGHT_M.
    """
    r = _prepare(footprints)
    bottom, top = _heights(bottom, top, len(footprints))
    if not len(r.kept):
        return Mesh.empty()
    return merge([_flat_walls(r, bottom, top), _flat_roofs(r, r.kept, top)])


# ---------------------------------------------------------------- LOD2 roofs


def _roof_planes(
    rect: np.ndarray, kind: str, bottom: float, top: float
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The roof's planes h = c0 + c1 x + c2 y (4, 3) and the region under each (polygons).

    rect: (4, 2) corners of the oriented minimum rectangle in the local frame.
    """
    c = rect.mean(axis=0)
    e0, e1 = rect[1] - rect[0], rect[2] - rect[1]
    long_, short = (e0, e1) if np.hypot(*e0) >= np.hypot(*e1) else (e1, e0)
    a, b = np.hypot(*long_) / 2.0, np.hypot(*short) / 2.0
    u = long_ / (2.0 * a)
    v = np.array([-u[1], u[0]])
    rise = min(b * math.tan(math.radians(PITCH_DEG)), MAX_RISE_SHARE * (top - bottom))
    s = rise / b
    cu, cv = float(c @ u), float(c @ v)
    plus_v = [top + s * cv, -s * v[0], -s * v[1]]
    minus_v = [top - s * cv, s * v[0], s * v[1]]
    # Region corners reach a metre past the rectangle so they cover the footprint for sure;
    # the footprint's intersection with them is what is drawn.
    m = 1.0
    A, B = a + m, b + m

    def pts(*uv: tuple[float, float]) -> np.ndarray:
        q = np.array(uv, np.float64)
        return c + q[:, :1] * u + q[:, 1:] * v

    if kind == "gable":
        planes = np.array([plus_v, minus_v, plus_v, minus_v])
        regions = [pts((-A, 0), (A, 0), (A, B), (-A, B)), pts((-A, -B), (A, -B), (A, 0), (-A, 0))]
        return planes, regions
    r = a - b  # half the ridge's length
    plus_u = [top + s * r + s * cu, -s * u[0], -s * u[1]]
    minus_u = [top + s * r - s * cu, s * u[0], s * u[1]]
    planes = np.array([plus_v, minus_v, plus_u, minus_u])
    regions = [
        pts((-r, 0), (r, 0), (A, B), (-A, B)),
        pts((-A, -B), (A, -B), (r, 0), (-r, 0)),
        pts((r, 0), (A, -B), (A, B)),
        pts((-r, 0), (-A, B), (-A, -B)),
    ]
    return planes, regions


def _envelope(planes: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """min over each point's planes: planes (n, 4, 3), xy (n, 2) -> (n,)."""
    return np.min(
        planes[:, :, 0] + planes[:, :, 1] * xy[:, None, 0] + planes[:, :, 2] * xy[:, None, 1],
        axis=1,
    )


_PAIRS = np.array(list(itertools.combinations(range(4), 2)))


def _roof_walls(r: _Rings, bottom: np.ndarray, planes: np.ndarray) -> Mesh:
    """Walls whose top follows the roof: each edge split where the lowest plane changes."""
    p0, p1 = r.xy, r.xy[r.next]
    pl = planes[r.owner]  # (n, 4, 3)
    f0 = pl[:, :, 0] + pl[:, :, 1] * p0[:, None, 0] + pl[:, :, 2] * p0[:, None, 1]
    f1 = pl[:, :, 0] + pl[:, :, 1] * p1[:, None, 0] + pl[:, :, 2] * p1[:, None, 1]
    d0 = f0[:, _PAIRS[:, 0]] - f0[:, _PAIRS[:, 1]]
    d1 = f1[:, _PAIRS[:, 0]] - f1[:, _PAIRS[:, 1]]
    denom = d0 - d1
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(np.abs(denom) > 1e-12, d0 / denom, np.nan)
    inside = (t > 1e-9) & (t < 1.0 - 1e-9)
    t = np.where(inside, t, np.nan)
    # A crossing counts only where the two planes are the lowest there (on the roof).
    ft = f0[:, None, :] + t[:, :, None] * (f1 - f0)[:, None, :]  # (n, 6, 4)
    on_roof = np.take_along_axis(ft, _PAIRS[None, :, :1].repeat(len(t), 0), axis=2)[:, :, 0]
    on_roof = on_roof <= np.min(ft, axis=2) + 1e-6
    t = np.where(inside & on_roof, t, 1.0)
    grid = np.concatenate((np.zeros((len(t), 1)), np.sort(t, axis=1), np.ones((len(t), 1))), 1)
    ta, tb = grid[:, :-1], grid[:, 1:]
    # Split points closer than a millimetre to an end or to each other are one point.
    seg = (tb - ta) * np.hypot(*(p1 - p0).T)[:, None] > 1e-3
    edge = np.nonzero(seg)[0]
    ta, tb = ta[seg], tb[seg]
    qa = p0[edge] + ta[:, None] * (p1 - p0)[edge]
    qb = p0[edge] + tb[:, None] * (p1 - p0)[edge]
    owner = r.owner[edge]
    ha, hb = _envelope(planes[owner], qa), _envelope(planes[owner], qb)
    bot = bottom[owner]
    k = len(edge)
    xy = np.stack((qa, qb, qb, qa), axis=1).reshape(-1, 2)
    h = np.stack((bot, bot, hb, ha), axis=1).reshape(-1)
    own4 = np.repeat(owner, 4)
    lon, lat = from_local(xy, r.origin[own4, 0], r.origin[own4, 1])
    tri = (np.arange(k, dtype=np.uint32)[:, None, None] * 4 + _QUAD[None]).reshape(-1, 3)
    return Mesh(np.column_stack((lon, lat, h)), tri, own4.astype(np.uint32))


def _polygon_parts(geom: shapely.Geometry) -> list[shapely.Polygon]:
    return [g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon) and g.area > 0]


def _distinct(ring: np.ndarray) -> np.ndarray:
    """The ring without vertices that repeat the next one (closer than _DUPLICATE_M)."""
    return ring[np.max(np.abs(ring - np.roll(ring, -1, axis=0)), axis=1) > _DUPLICATE_M]


def _sloped_roof(
    r: _Rings, f: int, ring_first: int, ring_last: int, kind: str, bottom: float, top: float
) -> tuple[np.ndarray, Mesh] | None:
    """Planes and roof surface of footprint `f`, or None when it has no rectangle to span."""
    rings = [r.xy[r.ring_start[i] : r.ring_end[i]] for i in range(ring_first, ring_last)]
    footprint = shapely.Polygon(rings[0], rings[1:])
    if not footprint.is_valid:
        footprint = shapely.make_valid(footprint)
    rect = shapely.oriented_envelope(footprint)
    if not isinstance(rect, shapely.Polygon) or rect.area <= _MIN_AREA_M2:
        return None
    corners = np.asarray(rect.exterior.coords)[:4]
    planes, regions = _roof_planes(corners, kind, bottom, top)
    clipped = shapely.intersection(np.array([shapely.Polygon(q) for q in regions]), footprint)
    xys: list[np.ndarray] = []
    tris: list[np.ndarray] = []
    count = 0
    for part in (p for geom in clipped for p in _polygon_parts(geom)):
        # Clipping leaves near-duplicate vertices where the footprint meets a region's corner.
        ring_xy = [_distinct(np.asarray(part.exterior.coords)[:-1])] + [
            _distinct(np.asarray(i.coords)[:-1]) for i in part.interiors
        ]
        if len(ring_xy[0]) < 3:
            continue
        ring_xy = [ring_xy[0]] + [x for x in ring_xy[1:] if len(x) >= 3]
        pts = np.concatenate(ring_xy)
        tri = triangulate(pts, np.cumsum([len(x) for x in ring_xy]))
        if not len(tri):
            continue
        xys.append(pts)
        tris.append(tri + np.uint32(count))
        count += len(pts)
    if not xys:
        return None
    xy = np.concatenate(xys)
    h = _envelope(np.broadcast_to(planes, (len(xy), 4, 3)), xy)
    lon, lat = from_local(xy, r.origin[f, 0], r.origin[f, 1])
    roof = Mesh(
        np.column_stack((lon, lat, h)),
        np.concatenate(tris),
        np.full(len(xy), f, np.uint32),
    )
    return planes, roof


def roofed(
    footprints: Sequence[Sequence[np.ndarray]],
    bottom: np.ndarray,
    top: np.ndarray,
    roof_types: Sequence[str],
) -> Mesh:
    """LOD2 buildings: flat roofs as `blocks`, gable and hip roofs with the ridge at `top`.

    Gable and hip roofs span the footprint's oriented minimum rectangle (ridge along its long
    axis), clipped to the footprint, so every roof vertex lies within the footprint; the walls
    rise to the roof's underside (a gable end is a wall with a triangle on top). A footprint
    whose rectangle is degenerate gets a flat roof; unknown roof types raise ValueError.
    """
    if len(roof_types) != len(footprints):
        raise ValueError("one roof type per footprint")
    unknown = set(roof_types) - set(ROOF_TYPES)
    if unknown:
        raise ValueError(f"unknown roof types {sorted(unknown)}; known: {ROOF_TYPES}")
    r = _prepare(footprints)
    bottom, top = _heights(bottom, top, len(footprints))
    if not len(r.kept):
        return Mesh.empty()
    planes = np.zeros((len(footprints), 4, 3))
    planes[:, :, 0] = top[:, None]
    sloped = [f for f in r.kept if roof_types[f] != "flat"]
    ring_first = np.searchsorted(r.ring_owner, sloped, side="left")
    ring_last = np.searchsorted(r.ring_owner, sloped, side="right")
    roofs: list[Mesh] = []
    flat = set(int(f) for f in r.kept) - set(int(f) for f in sloped)
    for f, f0, f1 in zip(sloped, ring_first, ring_last, strict=True):
        built = _sloped_roof(r, f, f0, f1, roof_types[f], bottom[f], top[f])
        if built is None:
            flat.add(int(f))
            continue
        planes[f], roof = built
        roofs.append(roof)
    flat_ids = np.array(sorted(flat), np.int64)
    if len(flat_ids):
        roofs.append(_flat_roofs(r, flat_ids, top))
    return merge([_roof_walls(r, bottom, planes), *roofs])
