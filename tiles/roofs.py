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
at least half of it. The ridge lies at `top` wherever the footprint reaches it (always for a
gable; a hip's shorter ridge can miss the arms of an L, whose roof then stays lower).
Work happens in a local metric frame per building (tiles/meshes.py).

Convex footprints without holes (the sample's rectangles, most real ones) take a numpy path
for everything, all buildings at once; others are clipped by shapely, also vectorised. A
self-intersecting footprint keeps its walls as drawn and gets the roof of its `make_valid`
form; one whose rings enclose no area (a bow tie) is left out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely

from tiles.meshes import (
    Mesh,
    Rings,
    clean_rings,
    convex_rings,
    from_local,
    merge,
    to_local,
    triangulate_rings,
)

ROOF_TYPES = ("flat", "gable", "hip")

PITCH_DEG = 30.0
MAX_RISE_SHARE = 0.5  # the roof takes at most this share of the building's height
MIN_HEIGHT_M = 0.1  # a building lower than this (or with top below bottom) is given this height
_DUPLICATE_M = 1e-4  # consecutive vertices closer than this are one vertex
_MIN_AREA_M2 = 1e-4  # rings with less area than this are dropped
_REGION_MARGIN_M = 1.0  # roof regions reach this far past the rectangle, to cover the footprint

_QUAD = np.array([[0, 1, 2], [0, 2, 3]], np.uint32)


@dataclass
class _Footprints:
    """Cleaned footprints in their local frames (see `clean_rings`: exteriors counter-
    clockwise, holes clockwise, so a wall built along a ring's direction faces outwards)."""

    rings: Rings  # xy in metres about each footprint's origin; ring_polygon = footprint
    lonlat: np.ndarray  # (n, 2) input coordinates of the kept vertices
    owner: np.ndarray  # (n,) footprint index of each vertex
    origin: np.ndarray  # (F, 2) lon/lat origin of each footprint's frame

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.rings.polygon_ok)


def _prepare(footprints: Sequence[Sequence[np.ndarray]]) -> _Footprints:
    arrays: list[np.ndarray] = []
    ring_owner_l: list[int] = []
    ring_exterior_l: list[bool] = []
    for i, fp in enumerate(footprints):
        for j, ring in enumerate(fp):
            arr = np.asarray(ring, np.float64)
            arrays.append(arr[:, :2] if arr.ndim == 2 else arr.reshape(-1, 2))
            ring_owner_l.append(i)
            ring_exterior_l.append(j == 0)
    n_fp = len(footprints)
    sizes = np.array([len(a) for a in arrays], np.int64)
    lonlat = np.concatenate(arrays) if arrays else np.zeros((0, 2))
    ring_owner = np.array(ring_owner_l, np.int64)
    ring_exterior = np.array(ring_exterior_l, bool)
    ring_v = np.repeat(np.arange(len(arrays)), sizes)
    owner = ring_owner[ring_v]
    # Each footprint's frame is centred on its rings' bounding box (which neither a closing
    # vertex, nor a repeated one, nor the orientation changes): reduce from each exterior to
    # the next footprint's.
    origin = np.zeros((n_fp, 2))
    exteriors = np.flatnonzero(ring_exterior & (sizes > 0))
    if len(exteriors):
        starts = (np.cumsum(sizes) - sizes)[exteriors]
        lo = np.minimum.reduceat(lonlat, starts)
        hi = np.maximum.reduceat(lonlat, starts)
        origin[ring_owner[exteriors]] = (lo + hi) / 2.0
    xy = to_local(lonlat[:, 0], lonlat[:, 1], origin[owner, 0], origin[owner, 1])
    rings = clean_rings(
        xy, sizes, ring_owner, ring_exterior, n_fp, tolerance=_DUPLICATE_M, min_area=_MIN_AREA_M2
    )
    return _Footprints(rings, lonlat[rings.source], owner[rings.source], origin)


def _heights(bottom: np.ndarray, top: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    bottom = np.broadcast_to(np.asarray(bottom, np.float64), (n,))
    top = np.broadcast_to(np.asarray(top, np.float64), (n,))
    return bottom, np.maximum(top, bottom + MIN_HEIGHT_M)


def _flat_walls(fp: _Footprints, bottom: np.ndarray, top: np.ndarray) -> Mesh:
    """One quad per ring edge from bottom to top (the walls of a block)."""
    n = len(fp.lonlat)
    a, b = fp.lonlat, fp.lonlat[fp.rings.next]
    bot, tp = bottom[fp.owner], top[fp.owner]
    pos = np.empty((n, 4, 3))
    pos[:, 0, :2], pos[:, 0, 2] = a, bot
    pos[:, 1, :2], pos[:, 1, 2] = b, bot
    pos[:, 2, :2], pos[:, 2, 2] = b, tp
    pos[:, 3, :2], pos[:, 3, 2] = a, tp
    tri = (np.arange(n, dtype=np.uint32)[:, None, None] * 4 + _QUAD[None]).reshape(-1, 3)
    return Mesh(pos.reshape(-1, 3), tri, np.repeat(fp.owner, 4).astype(np.uint32))


def _flat_roofs(fp: _Footprints, which: np.ndarray, top: np.ndarray) -> Mesh:
    """The footprints `which` triangulated at their top height."""
    tri = triangulate_rings(fp.rings, which)
    if not len(tri):
        return Mesh.empty()
    used = np.zeros(len(fp.lonlat), bool)
    used[tri.ravel()] = True
    remap = np.cumsum(used) - 1
    pos = np.column_stack((fp.lonlat[used], top[fp.owner[used]]))
    return Mesh(pos, remap[tri].astype(np.uint32), fp.owner[used].astype(np.uint32))


def blocks(footprints: Sequence[Sequence[np.ndarray]], bottom: np.ndarray, top: np.ndarray) -> Mesh:
    """LOD1 blocks: walls from `bottom` to `top` (m, ellipsoidal) and a flat roof at `top`.

    No floor (a block sits in the terrain). Feature of each vertex = its footprint's index.
    Footprints without an exterior of 3 distinct vertices and some area are left out; a `top`
    not above `bottom` is raised to `bottom` + MIN_HEIGHT_M.
    """
    fp = _prepare(footprints)
    bottom, top = _heights(bottom, top, len(footprints))
    if not len(fp.kept):
        return Mesh.empty()
    return merge([_flat_walls(fp, bottom, top), _flat_roofs(fp, fp.kept, top)])


# ---------------------------------------------------------------- LOD2 roofs

# The regions under the roof planes in the rectangle's (u along, v across) frame, as
# (u = ca * A + cr * R, v = cb * B) with A, B the rectangle's half sides plus the margin and
# R half the ridge's length (A for a gable): planes +v and -v (the long sides), then the hip
# ends +u and -u.
_REGIONS = [
    np.array([[0, -1, 0], [0, 1, 0], [1, 0, 1], [-1, 0, 1]], np.float64),
    np.array([[-1, 0, -1], [1, 0, -1], [0, 1, 0], [0, -1, 0]], np.float64),
    np.array([[0, 1, 0], [1, 0, -1], [1, 0, 1]], np.float64),
    np.array([[0, -1, 0], [-1, 0, 1], [-1, 0, -1]], np.float64),
]


def _roof_planes(
    corners: np.ndarray, hip: np.ndarray, bottom: np.ndarray, top: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Planes h = c0 + c1 x + c2 y of each roof (B, 4, 3) and the regions under them.

    corners: (B, 4, 2) oriented minimum rectangles in the buildings' local frames.
    Returns planes, region coordinates (m, 2) and the region of each coordinate (building *
    4 + plane); a gable has regions 0 and 1 only (its planes 2 and 3 repeat 0 and 1).
    """
    c = corners.mean(axis=1)
    e0, e1 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 1]
    l0, l1 = np.hypot(e0[:, 0], e0[:, 1]), np.hypot(e1[:, 0], e1[:, 1])
    first_long = l0 >= l1
    long_ = np.where(first_long[:, None], e0, e1)
    a = np.where(first_long, l0, l1) / 2.0
    b = np.where(first_long, l1, l0) / 2.0
    u = long_ / (2.0 * a[:, None])
    v = np.column_stack((-u[:, 1], u[:, 0]))
    rise = np.minimum(b * math.tan(math.radians(PITCH_DEG)), MAX_RISE_SHARE * (top - bottom))
    s = rise / b
    cu, cv = np.sum(c * u, axis=1), np.sum(c * v, axis=1)
    r = np.where(hip, a - b, a)
    planes = np.empty((len(c), 4, 3))
    planes[:, 0] = np.column_stack((top + s * cv, -s[:, None] * v))
    planes[:, 1] = np.column_stack((top - s * cv, s[:, None] * v))
    planes[:, 2] = np.column_stack((top + s * r + s * cu, -s[:, None] * u))
    planes[:, 3] = np.column_stack((top + s * r - s * cu, s[:, None] * u))
    planes[~hip, 2:] = planes[~hip, :2]
    big_a = a + _REGION_MARGIN_M
    big_b = b + _REGION_MARGIN_M
    r_region = np.where(hip, r, big_a)
    coords: list[np.ndarray] = []
    region: list[np.ndarray] = []
    n = len(c)
    for k, template in enumerate(_REGIONS):
        which = np.arange(n) if k < 2 else np.flatnonzero(hip)
        cu_ = template[:, 0] * big_a[which, None] + template[:, 1] * r_region[which, None]
        cv_ = template[:, 2] * big_b[which, None]
        xy = c[which, None, :] + cu_[..., None] * u[which, None] + cv_[..., None] * v[which, None]
        coords.append(xy.reshape(-1, 2))
        region.append(np.repeat(which * 4 + k, len(template)))
    return planes, np.concatenate(coords), np.concatenate(region)


def _envelope(planes: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """The roof height: min over each point's planes; planes (n, 4, 3), xy (n, 2) -> (n,)."""
    return np.min(
        planes[:, :, 0] + planes[:, :, 1] * xy[:, None, 0] + planes[:, :, 2] * xy[:, None, 1],
        axis=1,
    )


_PAIRS = np.array(list(itertools.combinations(range(4), 2)))


def _roof_walls(fp: _Footprints, bottom: np.ndarray, planes: np.ndarray) -> Mesh:
    """Walls whose top follows the roof: each edge split where the lowest plane changes."""
    p0, p1 = fp.rings.xy, fp.rings.xy[fp.rings.next]
    pl = planes[fp.owner]  # (n, 4, 3)
    f0 = pl[:, :, 0] + pl[:, :, 1] * p0[:, None, 0] + pl[:, :, 2] * p0[:, None, 1]
    f1 = pl[:, :, 0] + pl[:, :, 1] * p1[:, None, 0] + pl[:, :, 2] * p1[:, None, 1]
    d0 = f0[:, _PAIRS[:, 0]] - f0[:, _PAIRS[:, 1]]
    d1 = f1[:, _PAIRS[:, 0]] - f1[:, _PAIRS[:, 1]]
    denom = d0 - d1
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(np.abs(denom) > 1e-12, d0 / denom, np.nan)
    inside = (t > 0.0) & (t < 1.0)
    # A crossing counts only where its two planes are the lowest (on the roof).
    ft = f0[:, None, :] + np.nan_to_num(t)[:, :, None] * (f1 - f0)[:, None, :]  # (n, 6, 4)
    pair_value = np.take_along_axis(ft, np.broadcast_to(_PAIRS[None, :, :1], (len(t), 6, 1)), 2)
    on_roof = pair_value[:, :, 0] <= np.min(ft, axis=2) + 1e-6
    t = np.where(inside & on_roof, t, 1.0)
    grid = np.concatenate((np.zeros((len(t), 1)), np.sort(t, axis=1), np.ones((len(t), 1))), 1)
    ta, tb = grid[:, :-1], grid[:, 1:]
    # Split points as close to an end or to each other as vertices `clean_rings` merges are
    # one point (the roof's clipped rings merge them the same way).
    extent = np.max(np.abs(p1 - p0), axis=1)
    seg = (tb - ta) * extent[:, None] > _DUPLICATE_M
    # A dropped sliver joins the next piece: each piece starts where the previous kept one ends.
    edge, piece = np.nonzero(seg)
    tb = tb[edge, piece]
    first = np.r_[True, edge[1:] != edge[:-1]]
    ta = np.where(first, 0.0, np.r_[0.0, tb[:-1]])
    last = np.r_[edge[1:] != edge[:-1], True]
    tb = np.where(last, 1.0, tb)
    qa = p0[edge] + ta[:, None] * (p1 - p0)[edge]
    qb = p0[edge] + tb[:, None] * (p1 - p0)[edge]
    owner = fp.owner[edge]
    ha, hb = _envelope(planes[owner], qa), _envelope(planes[owner], qb)
    bot = bottom[owner]
    k = len(edge)
    xy = np.stack((qa, qb, qb, qa), axis=1).reshape(-1, 2)
    h = np.stack((bot, bot, hb, ha), axis=1).reshape(-1)
    own4 = np.repeat(owner, 4)
    lon, lat = from_local(xy, fp.origin[own4, 0], fp.origin[own4, 1])
    # Footprint corners keep their input coordinates exactly.
    at_a = np.stack((ta == 0.0, tb == 1.0, tb == 1.0, ta == 0.0), axis=1).reshape(-1)
    corner = np.stack((edge, fp.rings.next[edge], fp.rings.next[edge], edge), axis=1).reshape(-1)
    lon = np.where(at_a, fp.lonlat[corner, 0], lon)
    lat = np.where(at_a, fp.lonlat[corner, 1], lat)
    tri = (np.arange(k, dtype=np.uint32)[:, None, None] * 4 + _QUAD[None]).reshape(-1, 3)
    return Mesh(np.column_stack((lon, lat, h)), tri, own4.astype(np.uint32))


def _padded(r: Rings, rings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vertices of `rings` as (m, k, 2), short rings padded with their first vertex."""
    sizes = r.ring_end[rings] - r.ring_start[rings]
    k = int(sizes.max()) if len(sizes) else 0
    slot = np.arange(k)
    index = r.ring_start[rings, None] + np.where(slot < sizes[:, None], slot, 0)
    return r.xy[index], sizes


def _min_rectangles(polys: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(m, 4, 2) minimum-area rectangles of convex polygons (m, k, 2), counter-clockwise.

    The rotating-calipers fact: the minimum rectangle of a convex polygon has a side along
    one of its edges, so each edge direction is tried.
    """
    if not len(polys):
        return np.zeros((0, 4, 2))
    k = polys.shape[1]
    nxt = np.where(np.arange(k)[None, :] + 1 < sizes[:, None], np.arange(k)[None, :] + 1, 0)
    edge = np.take_along_axis(polys, nxt[..., None], axis=1) - polys  # (m, k, 2)
    length = np.hypot(edge[..., 0], edge[..., 1])
    valid = (np.arange(k)[None, :] < sizes[:, None]) & (length > 0)
    d = edge / np.where(length > 0, length, 1.0)[..., None]
    q = np.stack((-d[..., 1], d[..., 0]), axis=-1)
    s = np.einsum("mej,mvj->mev", d, polys)  # (m, edge, vertex)
    t = np.einsum("mej,mvj->mev", q, polys)
    s0, s1, t0, t1 = s.min(2), s.max(2), t.min(2), t.max(2)
    area = np.where(valid, (s1 - s0) * (t1 - t0), np.inf)
    best = np.argmin(area, axis=1)
    rows = np.arange(len(polys))
    d, q = d[rows, best], q[rows, best]
    s0, s1, t0, t1 = s0[rows, best], s1[rows, best], t0[rows, best], t1[rows, best]
    corners = [
        s_[:, None] * d + t_[:, None] * q for s_, t_ in ((s0, t0), (s1, t0), (s1, t1), (s0, t1))
    ]
    return np.stack(corners, axis=1)


def _clip_convex(
    polys: np.ndarray, sizes: np.ndarray, halfplanes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Convex polygons (m, k, 2) clipped to {g <= 0} for each g = c0 + c1 x + c2 y of
    `halfplanes` (m, h, 3) (Sutherland-Hodgman, exact for convex polygons); padded output."""
    for j in range(halfplanes.shape[1]):
        m, k = polys.shape[:2]
        g = halfplanes[:, j]
        d = g[:, None, 0] + g[:, None, 1] * polys[..., 0] + g[:, None, 2] * polys[..., 1]
        slot = np.arange(k)[None, :]
        real = slot < sizes[:, None]
        nxt = np.where(slot + 1 < sizes[:, None], slot + 1, 0)
        p1 = np.take_along_axis(polys, nxt[..., None], axis=1)
        d1 = np.take_along_axis(d, nxt, axis=1)
        inside = real & (d <= 1e-9)
        crossing = real & (((d < -1e-9) & (d1 > 1e-9)) | ((d > 1e-9) & (d1 < -1e-9)))
        with np.errstate(divide="ignore", invalid="ignore"):
            tcut = np.where(crossing, d / (d - d1), 0.0)
        cut = polys + tcut[..., None] * (p1 - polys)
        out = np.stack((polys, cut), axis=2).reshape(m, 2 * k, 2)
        emit = np.stack((inside, crossing), axis=2).reshape(m, 2 * k)
        order = np.argsort(~emit, axis=1, kind="stable")
        sizes = emit.sum(axis=1)
        width = max(int(sizes.max()) if m else 0, 1)
        order = order[:, :width]
        polys = np.take_along_axis(out, order[..., None], axis=1)
        # Pad with each polygon's first vertex, as the other helpers expect.
        pad = np.arange(width)[None, :] >= sizes[:, None]
        polys = np.where(pad[..., None], polys[:, :1], polys)
    return polys, sizes


def _sloped_roofs(
    fp: _Footprints, sloped: np.ndarray, hip: np.ndarray, bottom: np.ndarray, top: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Mesh]:
    """Roof surfaces of the footprints `sloped` (hip where `hip`, else gable), all at once.

    Convex footprints without holes (nearly all) are clipped with numpy; the others with
    shapely. Returns the footprints that got a roof, their planes (k, 4, 3) and the surfaces.
    """
    r = fp.rings
    n_rings = np.bincount(r.ring_polygon, minlength=len(r.polygon_ok))
    first_ring = np.searchsorted(r.ring_polygon, sloped)
    simple = (n_rings[sloped] == 1) & convex_rings(r)[first_ring]

    corners = np.zeros((len(sloped), 4, 2))
    polys, sizes = _padded(r, first_ring[simple])
    corners[simple] = _min_rectangles(polys, sizes)
    polygons = None
    if (~simple).any():
        other = sloped[~simple]
        ring_sel = np.isin(r.ring_polygon, other)
        starts, ends = r.ring_start[ring_sel], r.ring_end[ring_sel]
        lens = ends - starts
        vert = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        lines = shapely.linearrings(r.xy[vert], indices=np.repeat(np.arange(len(lens)), lens))
        polygons = shapely.polygons(lines, indices=np.searchsorted(other, r.ring_polygon[ring_sel]))
        invalid = ~shapely.is_valid(polygons)
        if invalid.any():
            polygons[invalid] = shapely.make_valid(polygons[invalid])
        rect = shapely.oriented_envelope(polygons)
        rect_ok = (shapely.get_type_id(rect) == 3) & (shapely.area(rect) > _MIN_AREA_M2)
        other_corners = np.zeros((len(other), 4, 2))
        if rect_ok.any():
            other_corners[rect_ok] = shapely.get_coordinates(rect[rect_ok]).reshape(-1, 5, 2)[:, :4]
        corners[~simple] = other_corners
        ok = np.ones(len(sloped), bool)
        ok[~simple] = rect_ok
        polygons = polygons[rect_ok]
        sloped, hip, corners, simple = sloped[ok], hip[ok], corners[ok], simple[ok]
    planes, region_xy, region_id = _roof_planes(corners, hip, bottom[sloped], top[sloped])

    # Pieces of roof: (coordinates, ring sizes, piece of each ring, exterior?, building of
    # each piece as an index into `sloped`).
    coords: list[np.ndarray] = []
    ring_sizes: list[np.ndarray] = []
    ring_piece: list[np.ndarray] = []
    exterior: list[np.ndarray] = []
    piece_building: list[np.ndarray] = []

    # Convex footprints: region k is where plane k is the lowest, {f_k - f_j <= 0 for j != k}.
    simple_ids = np.flatnonzero(simple)
    pair_b = np.concatenate([simple_ids, simple_ids] + [simple_ids[hip[simple_ids]]] * 2)
    pair_k = np.concatenate(
        [np.full(len(simple_ids), k) for k in (0, 1)]
        + [np.full(int(hip[simple_ids].sum()), k) for k in (2, 3)]
    )
    if len(pair_b):
        others = np.array([[j for j in range(4) if j != k] for k in range(4)])
        halfplanes = planes[pair_b, pair_k][:, None, :] - planes[pair_b[:, None], others[pair_k]]
        where = np.searchsorted(simple_ids, pair_b)
        clipped, counts = _clip_convex(polys[where], sizes[where], halfplanes)
        slot = np.arange(clipped.shape[1])[None, :] < counts[:, None]
        coords.append(clipped[slot])
        ring_sizes.append(counts)
        ring_piece.append(np.arange(len(counts)))
        exterior.append(np.ones(len(counts), bool))
        piece_building.append(pair_b)

    if polygons is not None and len(polygons):
        # The others: shapely intersects the footprint with the region polygons.
        cut = np.flatnonzero(np.diff(region_id)) + 1
        region_of = region_id[np.r_[0, cut]]
        region_len = np.diff(np.r_[0, cut, len(region_id)])
        complex_ids = np.flatnonzero(~simple)
        chosen = np.isin(region_of // 4, complex_ids)
        keep_v = np.repeat(chosen, region_len)
        region_of, region_len = region_of[chosen], region_len[chosen]
        regions = shapely.polygons(
            shapely.linearrings(
                region_xy[keep_v], indices=np.repeat(np.arange(len(region_of)), region_len)
            )
        )
        footprint_of = np.searchsorted(complex_ids, region_of // 4)
        parts, part_region = shapely.get_parts(
            shapely.intersection(regions, polygons[footprint_of]), return_index=True
        )
        keep = (shapely.get_type_id(parts) == 3) & (shapely.area(parts) > _MIN_AREA_M2)
        parts, part_region = parts[keep], part_region[keep]
        if len(parts):
            ring_geoms, ring_part = shapely.get_rings(parts, return_index=True)
            xy, coord_ring = shapely.get_coordinates(ring_geoms, return_index=True)
            lens = np.bincount(coord_ring, minlength=len(ring_geoms))
            open_ = np.ones(len(xy), bool)
            open_[np.cumsum(lens) - 1] = False  # the closing vertex
            base = sum(len(c) for c in ring_sizes)
            coords.append(xy[open_])
            ring_sizes.append(lens - 1)
            ring_piece.append(ring_part + base)
            exterior.append(np.r_[True, ring_part[1:] != ring_part[:-1]])
            piece_building.append(region_of[part_region] // 4)

    if not coords:
        return sloped, planes, Mesh.empty()
    piece_of_building = np.concatenate(piece_building)
    pieces = clean_rings(
        np.concatenate(coords),
        np.concatenate(ring_sizes),
        np.concatenate(ring_piece),
        np.concatenate(exterior),
        len(piece_of_building),
        _DUPLICATE_M,
        _MIN_AREA_M2,
    )
    tri = triangulate_rings(pieces)
    piece_sizes = pieces.ring_end - pieces.ring_start
    vertex_building = np.repeat(piece_of_building[pieces.ring_polygon], piece_sizes)
    h = _envelope(planes[vertex_building], pieces.xy)
    owner = sloped[vertex_building]
    lon, lat = from_local(pieces.xy, fp.origin[owner, 0], fp.origin[owner, 1])
    roof = Mesh(np.column_stack((lon, lat, h)), tri.astype(np.uint32), owner.astype(np.uint32))
    return sloped, planes, roof


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
    fp = _prepare(footprints)
    bottom, top = _heights(bottom, top, len(footprints))
    kept = fp.kept
    if not len(kept):
        return Mesh.empty()
    kinds = np.asarray(roof_types, dtype=object)[kept]
    planes = np.zeros((len(footprints), 4, 3))
    planes[:, :, 0] = top[:, None]
    meshes: list[Mesh] = []
    sloped = kept[kinds != "flat"]
    done = np.zeros(0, np.int64)
    if len(sloped):
        hip = kinds[kinds != "flat"] == "hip"
        done, sloped_planes, roof = _sloped_roofs(fp, sloped, hip, bottom, top)
        planes[done] = sloped_planes
        meshes.append(roof)
    flat = np.setdiff1d(kept, done)
    if len(flat):
        meshes.append(_flat_roofs(fp, flat, top))
    return merge([_roof_walls(fp, bottom, planes), *meshes])
