"""quantized-mesh-1.0 terrain of DEM layers, for CesiumJS's ``CesiumTerrainProvider``.

Layout: Cesium's geographic tiling (EPSG:4326; level 0 is two tiles of 180 x 180 degrees,
each level halves them), rows counted from the south (TMS). A tile is *available* (listed in
``layer.json`` and answered) on levels 0..maxzoom of each DEM of the layer's stack
(tiles/dem.py) where it meets that DEM's bounds, and both level-0 tiles always are: Cesium
asks for them first. A DEM's maxzoom is the first level whose tiles span at most
``PIXELS_AT_MAXZOOM`` of its pixels (a 65-sample tile then has two samples per pixel);
Cesium upsamples the deepest available tile for every closer view.

Surface: the stack read as one continuous surface, the finest DEM with data first: bilinear
between the pixel centres of a DEM (equal to the DEM at every pixel centre), nodata centres
dropped from the weights (the remaining weights renormalised), points in a DEM's outer half
pixel clamped onto its edge centres; 0 m where no DEM has data (as terrain-RGB draws it).

Mesh: the surface sampled on a grid and triangulated by Delatin (pydelatin) to a max error E
at every sample, E per level a 64th of the tile's ground resolution r(z) (a 65-sample tile's
spacing at the equator, pi*a / 64 / 2^z; Cesium estimates a heightmap tile's geometric error
at about r(z)/4), at least ``MIN_ERROR_M``: about 4.9 km at level 0, 9.6 m at level 9,
1.2 m at level 12. Delatin triangulates the heights plus the ellipsoid's fall below the
tile's tangent plane, so the straight triangles Cesium draws in ECEF keep E too.

* Where a tile spans at most ``MAX_GRID`` pixel centres of the finest DEM meeting it (from
  level 7 for the sample's 0.02-degree municipality DEM, level 10 for its 0.002-degree
  central one), the samples are those pixel centres inside the tile: every pixel centre is
  a sample, so the mesh is within E of the DEM at every one of them. Strips less than a
  pixel wide (holding no pixel centre) join the mesh's border to the tile's edges, whose
  vertices sit at the same places on the edge with the surface's height there.
* Coarser tiles sample a regular (N+1) x (N+1) grid from edge to edge (grid point i at
  u = round(i * 32767 / N), exactly a quantized position), N a power of two between
  ``MIN_GRID`` and ``MAX_GRID``: two samples per pixel of the finest DEM meeting the tile,
  and cells small enough that their chords follow the ellipsoid within E.

Each tile states E and its grid in the ``Twin-Max-Error`` and ``Twin-Grid`` headers
(``Twin-Grid-Posts``: the DEM whose pixel centres were the samples).

Encoding: quantized-mesh-encoder's writers for the vertex, index (high-water mark) and edge
sections and its octvertexnormals extension, with the header and quantization done here in
float64 (the library's ``encode`` casts positions to float32, ~1 m at these longitudes, and
truncates instead of rounding), vertices ordered by first use as the high-water-mark code
requires, triangles counter-clockwise seen from above.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from threading import Lock
from weakref import WeakKeyDictionary

import anyio.to_thread
import numpy as np
from pydelatin import Delatin
from quantized_mesh_encoder.bounding_sphere import bounding_sphere
from quantized_mesh_encoder.encode import write_edge_indices, write_indices, write_vertices
from quantized_mesh_encoder.extensions import ExtensionId

from tiles.dem import DemArray, read_dem, surface_heights, visible_stack
from tiles.service import TileAnswer, TileService
from tiles.validators import cache_control, etag_of, headers_of, not_modified
from twin.core.errors import NotFound
from twin.core.layer import Layer, LayerRegistry
from twin.core.principal import Scope

MEDIA_TYPE = "application/vnd.quantized-mesh"
FORMAT = "quantized-mesh-1.0"
EXTENSIONS = ("octvertexnormals",)
QUANT = 32767
WGS84_A, WGS84_B = 6378137.0, 6356752.3142451793
WGS84_E2 = 1.0 - (WGS84_B / WGS84_A) ** 2
PIXELS_AT_MAXZOOM = 32
MIN_GRID, MAX_GRID = 16, 128
MIN_ERROR_M = 0.25
MAX_LEVEL = 24
GZIP_LEVEL = 6
# Made tiles (plain and gzipped) by key: a command hall asks for the same few hundred tiles.
CACHE_TILES = 2048


# --- layout -----------------------------------------------------------------------------

def tile_degrees(z: int) -> float:
    return 180.0 / 2**z


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a tile in degrees; y counted from the south."""
    size = tile_degrees(z)
    return -180.0 + x * size, -90.0 + y * size, -180.0 + (x + 1) * size, -90.0 + (y + 1) * size


def ground_resolution_m(z: int) -> float:
    """r(z): the spacing of a 65-sample tile at the equator on level z."""
    return math.pi * WGS84_A / 64 / 2**z


def max_error_m(z: int) -> float:
    """E(z): the triangulation's max error on level z (see the module docstring)."""
    return max(MIN_ERROR_M, ground_resolution_m(z) / 64)


def dem_maxzoom(pixel_deg: float) -> int:
    """The first level whose tiles span at most ``PIXELS_AT_MAXZOOM`` pixels."""
    z = math.ceil(math.log2(180.0 / (PIXELS_AT_MAXZOOM * pixel_deg)) - 1e-9)
    return min(MAX_LEVEL, max(0, z))


def _tile_range(z: int, bounds: Sequence[float]) -> tuple[int, int, int, int]:
    """(startX, startY, endX, endY) of the tiles meeting ``bounds`` (edges not included)."""
    size = tile_degrees(z)
    west, south, east, north = bounds
    last_x, last_y = 2 ** (z + 1) - 1, 2**z - 1

    def first(value: float, origin: float, last: int) -> int:
        return min(last, max(0, math.floor((value - origin) / size)))

    def final(value: float, origin: float, last: int) -> int:
        return min(last, max(0, math.ceil((value - origin) / size) - 1))

    start_x, end_x = first(west, -180.0, last_x), final(east, -180.0, last_x)
    start_y, end_y = first(south, -90.0, last_y), final(north, -90.0, last_y)
    return start_x, start_y, max(start_x, end_x), max(start_y, end_y)


@dataclass(frozen=True)
class Region:
    """One DEM of the stack: where it has its pixels and how fine they are."""

    layer_id: str
    bounds: tuple[float, float, float, float]
    pixel_deg: float
    maxzoom: int
    # A pixel centre (the lattice of posts) and the post spacing east and north, degrees.
    post: tuple[float, float] = (0.0, 0.0)
    step: tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class Layout:
    """Which tiles a DEM stack answers, level by level."""

    regions: tuple[Region, ...]

    @property
    def maxzoom(self) -> int:
        return max(region.maxzoom for region in self.regions)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        boxes = np.array([region.bounds for region in self.regions])
        return (float(boxes[:, 0].min()), float(boxes[:, 1].min()),
                float(boxes[:, 2].max()), float(boxes[:, 3].max()))

    def ranges(self, z: int) -> list[tuple[int, int, int, int]]:
        """The available tile ranges of level z, none inside another."""
        if z == 0:
            return [(0, 0, 1, 0)]
        found = sorted({_tile_range(z, region.bounds) for region in self.regions
                        if region.maxzoom >= z})
        return [r for r in found
                if not any(o != r and o[0] <= r[0] and o[1] <= r[1] and o[2] >= r[2]
                           and o[3] >= r[3] for o in found)]

    def available(self, z: int, x: int, y: int) -> bool:
        return 0 <= z <= self.maxzoom and any(
            r[0] <= x <= r[2] and r[1] <= y <= r[3] for r in self.ranges(z))

    def check(self, z: int, x: int, y: int) -> None:
        """NotFound naming the valid range when the tile is not in the layout."""
        if self.available(z, x, y):
            return
        if not 0 <= z <= self.maxzoom:
            raise NotFound(f"terrain tile {z}/{x}/{y}: level {z} is outside 0..{self.maxzoom}")
        spans = "; ".join(f"x {r[0]}..{r[2]}, y {r[1]}..{r[3]}" for r in self.ranges(z))
        raise NotFound(f"terrain tile {z}/{x}/{y} is outside the terrain: levels 0..{self.maxzoom}"
                       f"; at level {z} the tiles are {spans} (y counted from the south)")

    def grid(self, z: int, x: int, y: int) -> Grid:
        """Where the surface is sampled for the tile's mesh (see the module docstring)."""
        west, south, east, north = tile_bounds(z, x, y)
        size = tile_degrees(z)
        meeting = [region for region in self.regions
                   if region.bounds[0] < east and region.bounds[2] > west
                   and region.bounds[1] < north and region.bounds[3] > south]
        # A cell's diagonal chord sags a * angle^2 / 4 below the ellipsoid: at most E / 2.
        wanted = math.radians(size) * math.sqrt(WGS84_A / (2 * max_error_m(z)))
        if meeting:
            finest = min(meeting, key=lambda region: region.pixel_deg)
            (lon0, lat0), (dx, dy) = finest.post, finest.step
            first_x, last_x = math.ceil((west - lon0) / dx), math.floor((east - lon0) / dx)
            first_y, last_y = math.ceil((south - lat0) / dy), math.floor((north - lat0) / dy)
            across = max(last_x - first_x, last_y - first_y)
            if wanted <= across <= MAX_GRID and min(last_x - first_x, last_y - first_y) >= 1:
                return Grid(lon0 + np.arange(first_x, last_x + 1) * dx,
                            lat0 + np.arange(first_y, last_y + 1) * dy, finest.layer_id)
            wanted = max(wanted, 2 * size / finest.pixel_deg)
        cells = int(min(MAX_GRID, max(MIN_GRID, 2 ** math.ceil(math.log2(max(wanted, 1.0))))))
        positions = grid_positions(cells) / QUANT
        return Grid(west + positions * (east - west), south + positions * (north - south), None)


@dataclass(frozen=True)
class Grid:
    """Sample longitudes (west to east) and latitudes (south to north); ``posts``: the DEM
    whose pixel centres inside the tile they are, else None (a regular grid from edge to
    edge)."""

    lon: np.ndarray
    lat: np.ndarray
    posts: str | None


def layout_of(stack: Sequence[Layer]) -> Layout:
    regions = []
    for layer in stack:
        dem = read_dem(layer)
        t = dem.transform
        regions.append(Region(layer.id, tuple(float(v) for v in dem.bounds),  # type: ignore[arg-type]
                              dem.pixel_deg, dem_maxzoom(dem.pixel_deg),
                              (t.c + t.a / 2, t.f + t.e / 2), (abs(t.a), abs(t.e))))
    return Layout(tuple(regions))


# --- the surface --------------------------------------------------------------------------

def grid_positions(cells: int) -> np.ndarray:
    """The quantized positions (0..32767) of the grid's points along one side."""
    return np.round(np.arange(cells + 1) * QUANT / cells).astype(np.int64)


# --- the mesh ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Mesh:
    u: np.ndarray  # (V,) int, 0..32767 west to east
    v: np.ndarray  # (V,) int, 0..32767 south to north
    heights: np.ndarray  # (V,) float64 metres
    triangles: np.ndarray  # (T, 3) uint32, counter-clockwise seen from above
    max_error: float
    grid: tuple[int, int]  # samples west-east and south-north
    posts: str | None  # the DEM whose pixel centres were the samples


def build_mesh(dems: Sequence[DemArray], z: int, x: int, y: int, grid: Grid,
               max_error: float) -> Mesh:
    west, south, east, north = tile_bounds(z, x, y)
    lon, lat = grid.lon, grid.lat
    # Only the DEMs meeting the tile are read (a grid of pixel centres lies inside it).
    meeting = [dem for dem in dems if dem.bounds[0] <= east and dem.bounds[2] >= west
               and dem.bounds[1] <= north and dem.bounds[3] >= south]
    # Row j is latitude j from the south, column i longitude i from the west.
    heights = surface_heights(meeting, lon[None, :], lat[:, None])
    delatin = Delatin(heights + _fall_off(lon, lat), max_error=max_error)
    points = delatin.vertices
    # Delatin's y counts rows from the array's last one.
    i = points[:, 0].round().astype(np.int64)
    j = len(lat) - 1 - points[:, 1].round().astype(np.int64)
    vertices = np.column_stack([lon[i], lat[j], heights[j, i]])
    triangles = delatin.triangles.astype(np.int64)
    if grid.posts is not None:
        vertices, triangles = _edge_strips(meeting, vertices, triangles, i, j, grid,
                                           (west, south, east, north))
    u = np.clip(np.round((vertices[:, 0] - west) / (east - west) * QUANT), 0, QUANT)
    v = np.clip(np.round((vertices[:, 1] - south) / (north - south) * QUANT), 0, QUANT)
    u, v, h = u.astype(np.int64), v.astype(np.int64), vertices[:, 2]
    if grid.posts is not None:
        # A post within half a quantization step of an edge meets its edge vertex there.
        _, first_at, same = np.unique(u * (QUANT + 1) + v, return_index=True,
                                      return_inverse=True)
        triangles = first_at[same][triangles]
    # Counter-clockwise in (u east, v north): seen from above, as Cesium draws front faces;
    # triangles that quantization flattened are left out (they cover nothing).
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    area = (u[b] - u[a]) * (v[c] - v[a]) - (u[c] - u[a]) * (v[b] - v[a])
    triangles[area < 0] = triangles[area < 0][:, [0, 2, 1]]
    triangles = triangles[area != 0]
    # Vertices in order of first use (the high-water-mark code needs it), unused ones out.
    flat = triangles.ravel()
    used, first = np.unique(flat, return_index=True)
    order = used[np.argsort(first)]
    remap = np.empty(len(u), dtype=np.int64)
    remap[order] = np.arange(len(order))
    return Mesh(u[order], v[order], h[order], remap[triangles].astype(np.uint32),
                max_error, (len(lon), len(lat)), grid.posts)


def _edge_strips(dems: Sequence[DemArray], vertices: np.ndarray, triangles: np.ndarray,
                 i: np.ndarray, j: np.ndarray, grid: Grid,
                 bounds: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The mesh of the pixel centres inside the tile, widened to the tile's edges: between
    its border vertices and the same places on the tile's edges (heights of the surface
    there), strips less than a pixel wide that hold no pixel centre; a quad at each corner."""
    west, south, east, north = bounds
    last_i, last_j = len(grid.lon) - 1, len(grid.lat) - 1
    added: list[tuple[float, float]] = []
    made: list[tuple[int, int, int]] = []
    count = len(vertices)

    def point(lon: float, lat: float) -> int:
        added.append((lon, lat))
        return count + len(added) - 1

    def strip(border: np.ndarray, edge_of: tuple[float | None, float | None]) -> list[int]:
        """Triangles between the border vertices (in order along the side) and their
        places on the tile's edge; the edge vertices, in the same order."""
        outer = [point(edge_of[0] if edge_of[0] is not None else vertices[k, 0],
                       edge_of[1] if edge_of[1] is not None else vertices[k, 1])
                 for k in border.tolist()]
        for n in range(len(border) - 1):
            a, b = int(border[n]), int(border[n + 1])
            made.extend([(outer[n], a, b), (outer[n], b, outer[n + 1])])
        return outer

    def side(mask: np.ndarray, by: np.ndarray) -> np.ndarray:
        found = np.flatnonzero(mask)
        return found[np.argsort(by[found])]

    west_side, east_side = side(i == 0, j), side(i == last_i, j)
    south_side, north_side = side(j == 0, i), side(j == last_j, i)
    west_edge = strip(west_side, (west, None))
    east_edge = strip(east_side, (east, None))
    south_edge = strip(south_side, (None, south))
    north_edge = strip(north_side, (None, north))
    # The corners: the tile's corner, the inner corner, and its places on the two edges.
    for corner, inner, on_x, on_y in (
            ((west, south), west_side[0], west_edge[0], south_edge[0]),
            ((east, south), east_side[0], east_edge[0], south_edge[-1]),
            ((west, north), west_side[-1], west_edge[-1], north_edge[0]),
            ((east, north), east_side[-1], east_edge[-1], north_edge[-1])):
        tip = point(*corner)
        made.extend([(tip, on_y, int(inner)), (tip, int(inner), on_x)])
    places = np.array(added)
    heights = surface_heights(dems, places[:, 0], places[:, 1])
    return (np.vstack([vertices, np.column_stack([places, heights])]),
            np.vstack([triangles, np.array(made, dtype=np.int64)]))


def _fall_off(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The ellipsoid's fall below the tangent plane at the grid's centre, -(de^2 + dn^2) / 2a,
    on the grid (rows latitude, columns longitude). Delatin triangulates the heights plus
    this, so a triangle's straight chord in ECEF (what Cesium draws, sagging below the
    ellipsoid) keeps the max error too, not only its interpolated heights."""
    lon_c, lat_c = (lon[0] + lon[-1]) / 2, (lat[0] + lat[-1]) / 2
    north = WGS84_A * np.radians(lat - lat_c)[:, None]
    east = WGS84_A * np.cos(np.radians(lat))[:, None] * np.radians(lon - lon_c)[None, :]
    return -(east**2 + north**2) / (2 * WGS84_A)


def _ecef(lon: np.ndarray, lat: np.ndarray, h: np.ndarray) -> np.ndarray:
    lon, lat = np.radians(lon), np.radians(lat)
    n = WGS84_A / np.sqrt(1 - WGS84_E2 * np.sin(lat) ** 2)
    return np.column_stack([(n + h) * np.cos(lat) * np.cos(lon),
                            (n + h) * np.cos(lat) * np.sin(lon),
                            (n * (1 - WGS84_E2) + h) * np.sin(lat)])


def _float32_below(value: float) -> float:
    single = np.float32(value)
    return float(np.nextafter(single, np.float32(-np.inf)) if single > value else single)


def _float32_above(value: float) -> float:
    single = np.float32(value)
    return float(np.nextafter(single, np.float32(np.inf)) if single < value else single)


def _occlusion_point(points: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Cesium's horizon-culling point (ellipsoid-scaled space, computed as Cesium's
    ``EllipsoidalOccluder`` does); for a tile reaching 90 degrees from its centre (the
    level-0 hemispheres) the exact point is at infinity, so a far point on that ray."""
    scale = np.array([WGS84_A, WGS84_A, WGS84_B])
    scaled = points / scale
    direction = center / scale
    direction = direction / np.linalg.norm(direction)
    magnitude_sq = np.maximum((scaled**2).sum(axis=1), 1.0)
    magnitude = np.sqrt(magnitude_sq)
    to_point = scaled / magnitude[:, None]
    cos_alpha = to_point @ direction
    sin_alpha = np.linalg.norm(np.cross(to_point, direction), axis=1)
    cos_beta = 1.0 / magnitude
    sin_beta = np.sqrt(magnitude_sq - 1.0) * cos_beta
    denominator = cos_alpha * cos_beta - sin_alpha * sin_beta
    if np.any(denominator <= 1e-9):
        return direction * 1e6 * scale
    return direction * float(np.max(1.0 / denominator)) * scale


def _vertex_normals(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Each vertex's normal in ECEF: the area-weighted mean of its triangles' normals
    (quantized-mesh-encoder's ``compute_vertex_normals`` weights by the area squared)."""
    a, b, c = (triangles[:, k].astype(np.int64) for k in range(3))
    faces = np.cross(points[b] - points[a], points[c] - points[a])  # length: twice the area
    total = np.zeros_like(points)
    for corner in (a, b, c):
        np.add.at(total, corner, faces)
    length = np.linalg.norm(total, axis=1)
    length[length == 0] = 1.0
    return total / length[:, None]


def _oct_encode(normals: np.ndarray) -> bytes:
    """Unit vectors as Cesium's ``AttributeCompression.octEncode``: two bytes each,
    ``round((v * 0.5 + 0.5) * 255)`` (quantized-mesh-encoder's ``oct_encode`` floors
    ``* 256``, which turns +1 into byte 0, i.e. -1)."""
    normals = np.nan_to_num(normals, nan=0.0)
    l1 = np.abs(normals).sum(axis=1)
    l1[l1 == 0] = 1.0
    x, y, z = (normals[:, i] / l1 for i in range(3))
    sign_x, sign_y = np.where(x < 0, -1.0, 1.0), np.where(y < 0, -1.0, 1.0)
    below = z < 0
    x, y = (np.where(below, (1 - np.abs(y)) * sign_x, x),
            np.where(below, (1 - np.abs(x)) * sign_y, y))
    packed = np.round((np.clip(np.column_stack([x, y]), -1, 1) * 0.5 + 0.5) * 255)
    return packed.astype(np.uint8).tobytes()


def encode_mesh(mesh: Mesh, z: int, x: int, y: int, normals: bool) -> bytes:
    west, south, east, north = tile_bounds(z, x, y)
    lon = west + mesh.u / QUANT * (east - west)
    lat = south + mesh.v / QUANT * (north - south)
    low, high = _float32_below(float(mesh.heights.min())), _float32_above(float(mesh.heights.max()))
    span = high - low
    hq = (np.zeros(len(mesh.heights), dtype=np.int64) if span <= 0
          else np.clip(np.round((mesh.heights - low) / span * QUANT), 0, QUANT).astype(np.int64))
    # Every number below is of the decoded vertices (what Cesium draws), not of the samples.
    decoded_h = low + hq / QUANT * span if span > 0 else np.full(len(hq), low)
    points = _ecef(lon, lat, decoded_h)
    box_low, box_high = points.min(axis=0), points.max(axis=0)
    center = (box_low + box_high) / 2
    sphere_center, radius = bounding_sphere(points.copy(), method="naive")
    sphere_center = np.asarray(sphere_center, dtype=np.float64)
    radius = max(float(radius), float(np.linalg.norm(points - sphere_center, axis=1).max()))
    radius = radius * (1 + 1e-9) + 0.01
    occlusion = _occlusion_point(points, sphere_center)
    out = io.BytesIO()
    out.write(struct.pack("<3d2f4d3d", *center, low, high, *sphere_center, radius, *occlusion))
    quantized = np.column_stack([mesh.u, mesh.v, hq]).astype(np.int16)
    count = len(mesh.u)
    write_vertices(out, quantized, count)
    write_indices(out, mesh.triangles, count)
    write_edge_indices(out, quantized, count)
    if normals:
        encoded = _oct_encode(_vertex_normals(points, mesh.triangles))
        out.write(struct.pack("<BI", ExtensionId.VERTEX_NORMALS, len(encoded)))
        out.write(encoded)
    return out.getvalue()


# --- requests -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MeshRequest:
    layer_id: str
    z: int
    x: int
    y: int
    scope: Scope
    # The Accept header: Cesium names the extensions it wants there.
    accept: str | None = None
    accepts_gzip: bool = False
    if_none_match: str | None = None
    # The URL's ``v=`` (layer.json's template carries the stack's token): immutable if current.
    version: str | None = None


def wants_normals(accept: str | None) -> bool:
    """Whether ``Accept`` asks for octvertexnormals, as Cesium does:
    ``application/vnd.quantized-mesh;extensions=octvertexnormals-watermask,...``."""
    for media_range in (accept or "").split(","):
        kind, _, params = media_range.partition(";")
        if kind.strip().lower() != MEDIA_TYPE:
            continue
        for param in params.split(";"):
            name, _, value = param.partition("=")
            wanted = value.strip().strip('"').lower().split("-")
            if name.strip().lower() == "extensions" and "octvertexnormals" in wanted:
                return True
    return False


@dataclass(frozen=True)
class _Terrain:
    layer: Layer
    stack: tuple[Layer, ...]
    versions: tuple[tuple[str, int], ...]

    @property
    def token(self) -> str:
        """A short token of the data the tiles are made of: the stack's layers and versions."""
        return hashlib.blake2b(repr(self.versions).encode(), digest_size=6).hexdigest()


async def _terrain(service: TileService, layer_id: str, scope: Scope) -> _Terrain:
    versions = await service.layer_versions()
    registry, (layer,) = await service.layers_for((layer_id,), scope, versions)
    stacks = _stacks.setdefault(registry, {})
    stack = stacks.get((layer.id, scope.key))
    if stack is None:
        # Reads the DEMs' pixel sizes (cached by file), once per registry and scope.
        stack = await anyio.to_thread.run_sync(visible_stack, registry, layer, scope)
        stacks[(layer.id, scope.key)] = stack
    if len(stack) > 1:
        # The registry current for every DEM of the stack, not only the one asked for.
        registry, _ = await service.layers_for(tuple(s.id for s in stack), scope, versions)
    keyed = tuple((s.id, registry.data_version(s.id, versions)) for s in stack)
    return _Terrain(layer, tuple(stack), keyed)


# Each registry's stacks by (layer, scope key): a publish resolves a new registry.
_stacks: WeakKeyDictionary[LayerRegistry, dict[tuple, list[Layer]]] = WeakKeyDictionary()


async def layer_json(service: TileService, layer_id: str, scope: Scope,
                     if_none_match: str | None = None) -> tuple[dict | None, dict[str, str]]:
    """Cesium's ``layer.json`` (None when ``If-None-Match`` names it) and its headers."""
    terrain = await _terrain(service, layer_id, scope)
    etag = etag_of(("quantized-mesh-layer", terrain.versions))
    headers = headers_of(etag)
    if not_modified(etag, if_none_match):
        return None, headers
    layout = await anyio.to_thread.run_sync(layout_of, terrain.stack)
    layer = terrain.layer
    document = {
        "tilejson": "2.1.0",
        "name": layer.title_en,
        "description": layer.title_zh,
        "version": "1.0.0",
        "format": FORMAT,
        "attribution": "",
        "scheme": "tms",
        "projection": "EPSG:4326",
        "tiles": [f"{{z}}/{{x}}/{{y}}.terrain?v={terrain.token}"],
        "minzoom": 0,
        "maxzoom": layout.maxzoom,
        "bounds": list(layout.bounds),
        "extensions": list(EXTENSIONS),
        "available": [[{"startX": r[0], "startY": r[1], "endX": r[2], "endY": r[3]}
                       for r in layout.ranges(z)] for z in range(layout.maxzoom + 1)],
    }
    return document, headers


@dataclass(frozen=True)
class MadeTile:
    content: bytes
    gzipped: bytes
    # What the tile states about itself: Twin-Max-Error, Twin-Grid(-Posts).
    facts: dict[str, str]


_made: OrderedDict[tuple, MadeTile] = OrderedDict()
_made_lock = Lock()


def _cached(key: tuple) -> MadeTile | None:
    with _made_lock:  # held for a dictionary operation only
        made = _made.get(key)
        if made is not None:
            _made.move_to_end(key)
        return made


def make_tile(stack: Sequence[Layer], key: tuple, z: int, x: int, y: int,
              normals: bool) -> MadeTile:
    """The tile (checked against the layout first: 404 naming the range), made once per
    key (the stack's data versions, the address, the extensions)."""
    made = _cached(key)
    if made is not None:
        return made
    layout = layout_of(stack)
    layout.check(z, x, y)
    dems = [read_dem(layer) for layer in stack]
    mesh = build_mesh(dems, z, x, y, layout.grid(z, x, y), max_error_m(z))
    content = encode_mesh(mesh, z, x, y, normals)
    facts = {"Twin-Max-Error": f"{mesh.max_error:g}", "Twin-Grid": f"{mesh.grid[0]}x{mesh.grid[1]}"}
    if mesh.posts:
        facts["Twin-Grid-Posts"] = mesh.posts
    made = MadeTile(content, gzip.compress(content, GZIP_LEVEL, mtime=0), facts)
    with _made_lock:
        _made[key] = made
        while len(_made) > CACHE_TILES:
            _made.popitem(last=False)
    return made


async def terrain_tile(service: TileService, request: MeshRequest) -> TileAnswer:
    """A ``.terrain`` tile: a layer outside the caller's jurisdiction is 404 before the
    ETag is compared (as raster tiles), a tile outside the layout is 404 naming the range."""
    terrain = await _terrain(service, request.layer_id, request.scope)
    normals = wants_normals(request.accept)
    key = ("quantized-mesh", terrain.versions, request.z, request.x, request.y, normals)
    etag = etag_of(key)
    headers = {**headers_of(etag), "Vary": "Accept, Accept-Encoding",
               "Cache-Control": cache_control(terrain.token, request.version)}
    if not_modified(etag, request.if_none_match):
        # Still 404 for a tile outside the layout: a 304 never stands for a missing tile.
        layout = await anyio.to_thread.run_sync(layout_of, terrain.stack)
        layout.check(request.z, request.x, request.y)
        return TileAnswer(None, MEDIA_TYPE, headers)
    made = _cached(key)  # made already: no thread
    if made is None:
        made = await anyio.to_thread.run_sync(
            make_tile, terrain.stack, key, request.z, request.x, request.y, normals)
    headers.update(made.facts)
    if request.accepts_gzip:
        return TileAnswer(made.gzipped, MEDIA_TYPE, {**headers, "Content-Encoding": "gzip"})
    return TileAnswer(made.content, MEDIA_TYPE, headers)
