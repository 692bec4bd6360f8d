"""Geometry for the sample hierarchy: points inside polygons and exact partitions of polygons.

A parent is split into children by a Voronoi diagram of seed points clipped to the parent,
relaxed a few times (Lloyd) so the cells look like real administrative units. Clipping every
cell to the same parent makes the children an exact partition: they share the Voronoi edges
vertex for vertex and the parent's own boundary.

All work is vectorised over every parent of a level at once (shapely 2 ufuncs).
"""

from __future__ import annotations

import numpy as np
import shapely
from pyproj import Transformer

# Degrees of longitude are shorter than degrees of latitude; Voronoi distances are measured with
# longitude scaled by cos(29.5°), the middle of Chongqing, so cells are not stretched north-south.
LON_SCALE = float(np.cos(np.radians(29.5)))
KM_PER_DEG_LAT = 110.6
KM_PER_DEG_LON = 111.32 * LON_SCALE

_EQUAL_AREA = Transformer.from_crs("EPSG:4326", "EPSG:6933", always_xy=True)


def area_km2(geoms: np.ndarray) -> np.ndarray:
    """Areas in km² in the EASE-Grid 2.0 equal-area projection (EPSG:6933)."""
    projected = shapely.transform(
        geoms, lambda xy: np.column_stack(_EQUAL_AREA.transform(xy[:, 0], xy[:, 1]))
    )
    return shapely.area(projected) / 1e6


def distance_km(x: np.ndarray, y: np.ndarray, x0: np.ndarray, y0: np.ndarray) -> np.ndarray:
    """Approximate ground distance between lon/lat points (good to ~1% over Chongqing)."""
    return np.hypot((x - x0) * KM_PER_DEG_LON, (y - y0) * KM_PER_DEG_LAT)


def points_inside(
    geoms: np.ndarray, counts: np.ndarray, rng: np.random.Generator, max_rounds: int = 60
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``counts[i]`` uniform random points inside each ``geoms[i]``, by rejection in its bbox.

    Returns (owner, x, y), sorted by owner. Geometries are prepared in place for speed.
    """
    shapely.prepare(geoms)
    bounds = shapely.bounds(geoms)
    width, height = bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]
    fill = shapely.area(geoms) / np.maximum(width * height, 1e-300)
    pending = np.asarray(counts, dtype=np.int64).copy()
    owners, xs, ys = [], [], []
    for _ in range(max_rounds):
        todo = np.flatnonzero(pending)
        if todo.size == 0:
            break
        # Draw enough candidates that most parents finish in one round.
        tries = np.ceil(pending[todo] / np.maximum(fill[todo], 0.01) * 1.3 + 2).astype(np.int64)
        owner = np.repeat(todo, tries)
        x = bounds[owner, 0] + rng.random(owner.size) * width[owner]
        y = bounds[owner, 1] + rng.random(owner.size) * height[owner]
        hit = shapely.contains_xy(geoms[owner], x, y)
        owner, x, y = owner[hit], x[hit], y[hit]
        keep = rank_within(owner) < pending[owner]
        owners.append(owner[keep])
        xs.append(x[keep])
        ys.append(y[keep])
        pending -= np.bincount(owner[keep], minlength=len(geoms))
    if pending.any():
        raise RuntimeError(f"could not place points in {np.count_nonzero(pending)} polygons")
    owner = np.concatenate(owners)
    order = np.argsort(owner, kind="stable")
    return owner[order], np.concatenate(xs)[order], np.concatenate(ys)[order]


def rank_within(groups: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements share its group (0, 1, 2, ...)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    lengths = np.diff(np.r_[starts, sorted_groups.size])
    ranks = np.empty(groups.size, dtype=np.int64)
    ranks[order] = np.arange(groups.size) - np.repeat(starts, lengths)
    return ranks


def _voronoi_cells(seeds: np.ndarray, owner: np.ndarray, envelopes: np.ndarray) -> np.ndarray:
    """One Voronoi cell per seed (in seed order) among the seeds of the same owner.

    ``owner`` must be sorted and every owner must have at least two seeds. Cells cover each
    owner's envelope.
    """
    groups, group_of_seed = np.unique(owner, return_inverse=True)
    scale = np.array([LON_SCALE, 1.0])
    multipoints = shapely.multipoints(shapely.points(seeds * scale), indices=group_of_seed)
    extents = shapely.transform(envelopes[groups], lambda xy: xy * scale)
    diagrams = shapely.voronoi_polygons(multipoints, extend_to=extents, ordered=True)
    cells, cell_group = shapely.get_parts(diagrams, return_index=True)
    if cells.size != seeds.shape[0] or not np.array_equal(cell_group, group_of_seed):
        raise RuntimeError("Voronoi diagram lost seeds (coincident points?)")
    return shapely.transform(cells, lambda xy: xy / scale)


def _polygonal(geoms: np.ndarray) -> np.ndarray:
    """Drop the points and lines an overlay may leave where a cell just touches its parent."""
    geoms = geoms.copy()
    for i in np.flatnonzero(shapely.get_type_id(geoms) == 7):  # GeometryCollection
        parts = shapely.get_parts(geoms[i])
        polygons = parts[np.isin(shapely.get_type_id(parts), (3, 6))]
        geoms[i] = shapely.multipolygons(shapely.get_parts(polygons))
    return geoms


def partition(
    parents: np.ndarray,
    owner: np.ndarray,
    seeds: np.ndarray,
    iterations: int = 3,
    relax: float = 0.7,
) -> tuple[np.ndarray, np.ndarray]:
    """Split each ``parents[k]`` into one child per seed with ``owner == k``.

    ``owner`` is sorted; every seed lies inside its parent. Each Lloyd iteration moves seeds
    ``relax`` of the way to their cell's centroid (partial moves keep some of the seed density
    gradient). Returns (children in seed order, final seeds), each child inside its parent.
    """
    counts = np.bincount(owner, minlength=len(parents))
    alone = counts[owner] == 1
    bounds = shapely.bounds(parents)
    margin = 0.1 * np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])[:, None]
    envelopes = shapely.box(*(bounds + np.hstack([-margin, -margin, margin, margin])).T)
    shapely.prepare(parents)
    seeds = seeds.copy()
    children = parents[owner].copy()
    for step in range(iterations + 1):
        cells = _voronoi_cells(seeds[~alone], owner[~alone], envelopes)
        children[~alone] = _polygonal(shapely.intersection(cells, parents[owner[~alone]]))
        if step == iterations:
            break
        centroids = shapely.get_coordinates(shapely.centroid(children))
        # A concave cell's centroid can fall outside it; its point on surface never does.
        outside = ~shapely.contains_xy(children, centroids[:, 0], centroids[:, 1])
        if outside.any():
            centroids[outside] = shapely.get_coordinates(
                shapely.point_on_surface(children[outside])
            )
        moved = seeds + relax * (centroids - seeds)
        inside = shapely.contains_xy(children, moved[:, 0], moved[:, 1])
        seeds[~alone] = np.where(inside[:, None], moved, centroids)[~alone]
    return children, seeds


def as_multipolygons(geoms: np.ndarray) -> np.ndarray:
    """Wrap Polygons as one-part MultiPolygons (the admin_units column type)."""
    parts, index = shapely.get_parts(geoms, return_index=True)
    return shapely.multipolygons(parts, indices=index)
