"""The implicit quadtree of a 3D layer: which tile holds which building, and subtree files.

3D Tiles 1.1 implicit tiling (QUADTREE, ``region`` bounding volumes) over one fixed root
region around the municipality, so no edit ever moves the root. A tile ``(level, x, y)``
covers the root's longitude and latitude ranges cut in 2^level parts, x growing east and y
north; every level keeps the root's height range.

Where a building goes (a loose quadtree with a capacity, like pg2b3dm's but exact):

* A tile *contains* a building when the footprint's bounding box lies in the tile's region.
* A tile is a *leaf* when it contains at most ``CAPACITY`` buildings (or is at the deepest
  level); a leaf holds every building it contains.
* An inner tile holds the buildings it contains that none of its children contains (those
  crossing a mid-line), and its children share the rest.

So every vertex of a building lies in its tile's region (pg2b3dm's sample has 0.48% outside,
up to 5.7 m), content sits at every level where it belongs, a dense centre gets small tiles
and the outskirts large ones, and no tile holds more than ``CAPACITY`` buildings (plus the
few crossing its mid-lines).

The root bounds are multiples of 1/2^k degrees apart, so every tile edge is an exact double:
the same comparisons (``x >= west``, ``x < east``) decide in numpy and in SQL.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from twin.core.errors import NotFound

# The root region (degrees): holds the municipality (105.28-110.20 E, 28.15-32.21 N) with
# round edges; a tile at level 8 is about 2.3 x 2.2 km.
ROOT_WEST, ROOT_EAST, ROOT_SOUTH, ROOT_NORTH = 105.0, 111.0, 28.0, 33.0
# Level 14 tiles are ~36 m across: deeper would hold only the buildings of one lot.
MAX_LEVEL = 14
SUBTREE_LEVELS = 5
CAPACITY = 1000
# The geometric error of the root tile, halved at each level (implicit tiling): a level-8
# tile's content appears when its level-7 parent (86 m) is nearer than ~5 km on a 1080-line
# screen at CesiumJS's default maximum screen-space error of 16 pixels.
ROOT_GEOMETRIC_ERROR = 11_000.0

SUBTREE_MAGIC = b"subt"
SUBTREE_VERSION = 1

_BOUNDS_X = ROOT_WEST + np.arange(2**MAX_LEVEL + 1) * ((ROOT_EAST - ROOT_WEST) / 2**MAX_LEVEL)
_BOUNDS_Y = ROOT_SOUTH + np.arange(2**MAX_LEVEL + 1) * ((ROOT_NORTH - ROOT_SOUTH) / 2**MAX_LEVEL)


@dataclass(frozen=True)
class TileId:
    level: int
    x: int
    y: int

    def bounds(self) -> tuple[float, float, float, float]:
        """West, south, east, north in degrees (exact: the grid's own doubles)."""
        step = 2 ** (MAX_LEVEL - self.level)
        return (float(_BOUNDS_X[self.x * step]), float(_BOUNDS_Y[self.y * step]),
                float(_BOUNDS_X[(self.x + 1) * step]), float(_BOUNDS_Y[(self.y + 1) * step]))

    def midlines(self) -> tuple[float, float]:
        """The longitude and latitude where the children meet."""
        return TileId(self.level + 1, 2 * self.x + 1, 2 * self.y + 1).bounds()[:2]

    @property
    def subtree_root(self) -> TileId:
        level = self.level - self.level % SUBTREE_LEVELS
        shift = self.level - level
        return TileId(level, self.x >> shift, self.y >> shift)

    def parent(self) -> TileId:
        return TileId(self.level - 1, self.x >> 1, self.y >> 1)


ROOT = TileId(0, 0, 0)


def checked_tile(level: int, x: int, y: int, what: str = "tile") -> TileId:
    """The tile, or 404 naming the valid range (as a GIS person reads it)."""
    if not 0 <= level <= MAX_LEVEL:
        raise NotFound(f"{what} {level}/{x}/{y}: level must be 0-{MAX_LEVEL} "
                       f"(the tileset's availableLevels is {MAX_LEVEL + 1})")
    top = 2**level - 1
    if not (0 <= x <= top and 0 <= y <= top):
        raise NotFound(f"{what} {level}/{x}/{y}: at level {level}, x and y must be 0-{top}")
    if what == "subtree" and level % SUBTREE_LEVELS:
        raise NotFound(f"subtree {level}/{x}/{y}: subtrees start at levels that are multiples "
                       f"of {SUBTREE_LEVELS} (subtreeLevels)")
    return TileId(level, x, y)


def root_region(min_height: float, max_height: float) -> list[float]:
    """The root's ``region`` (radians, metres)."""
    return [float(np.radians(ROOT_WEST)), float(np.radians(ROOT_SOUTH)),
            float(np.radians(ROOT_EAST)), float(np.radians(ROOT_NORTH)),
            float(min_height), float(max_height)]


def tile_region(tile: TileId, min_height: float, max_height: float) -> list[float]:
    west, south, east, north = tile.bounds()
    return [float(np.radians(west)), float(np.radians(south)), float(np.radians(east)),
            float(np.radians(north)), float(min_height), float(max_height)]


def _bit_length(values: np.ndarray) -> np.ndarray:
    out = np.zeros(values.shape, dtype=np.int64)
    v = values.astype(np.int64).copy()
    while (v > 0).any():
        out += v > 0
        v >>= 1
    return out


@dataclass
class Placement:
    """Where the buildings contained in a subtree's root region go, level by level."""

    root: TileId
    ids: np.ndarray
    # Per building: the deepest level containing it, and its tile indices at MAX_LEVEL.
    contained: np.ndarray
    x: np.ndarray
    y: np.ndarray
    # Per building: the level of the tile that holds it (-1: below this subtree).
    level: np.ndarray
    # Counts of buildings contained, per tile, by (level, x, y).
    counts: dict[tuple[int, int, int], int]
    capacity: int = CAPACITY

    def holds(self, tile: TileId) -> np.ndarray:
        """Which buildings the tile holds (a mask)."""
        shift = MAX_LEVEL - tile.level
        return ((self.level == tile.level) & ((self.x >> shift) == tile.x)
                & ((self.y >> shift) == tile.y))

    def count(self, tile: TileId) -> int:
        return self.counts.get((tile.level, tile.x, tile.y), 0)

    def is_leaf(self, tile: TileId) -> bool:
        return tile.level == MAX_LEVEL or self.count(tile) <= self.capacity


def place(root: TileId, ids: np.ndarray, xmin: np.ndarray, ymin: np.ndarray,
          xmax: np.ndarray, ymax: np.ndarray, capacity: int = CAPACITY) -> Placement:
    """Places the buildings contained in ``root``'s region (their bounding boxes) down to
    the subtree's last level and one level more (the child subtrees' roots)."""
    x0 = np.searchsorted(_BOUNDS_X, xmin, "right") - 1
    x1 = np.searchsorted(_BOUNDS_X, xmax, "right") - 1
    y0 = np.searchsorted(_BOUNDS_Y, ymin, "right") - 1
    y1 = np.searchsorted(_BOUNDS_Y, ymax, "right") - 1
    contained = MAX_LEVEL - np.maximum(_bit_length(x0 ^ x1), _bit_length(y0 ^ y1))
    level = np.full(x0.shape, -1, dtype=np.int64)
    counts: dict[tuple[int, int, int], int] = {}
    last = min(root.level + SUBTREE_LEVELS, MAX_LEVEL)
    for depth in range(root.level, last + 1):
        shift = MAX_LEVEL - depth
        pending = level < 0
        # A building crossing this level's tile edges stays in its inner parent tile.
        if depth > root.level:
            level[pending & (contained < depth)] = depth - 1
        inside = pending & (contained >= depth)
        if not inside.any():
            break
        keys = (x0[inside] >> shift) * (1 << 32) + (y0[inside] >> shift)
        unique, inverse, number = np.unique(keys, return_inverse=True, return_counts=True)
        for key, n in zip(unique.tolist(), number.tolist(), strict=True):
            counts[(depth, key >> 32, key & 0xFFFFFFFF)] = n
        if depth == last and depth == root.level + SUBTREE_LEVELS:
            break  # only the child subtrees' counts: their placement is theirs
        leaf = (number[inverse] <= capacity) | (depth == MAX_LEVEL)
        rows = np.flatnonzero(inside)[leaf]
        level[rows] = depth
    return Placement(root, ids, contained, x0, y0, level, counts, capacity)


def _morton(x: int, y: int) -> int:
    index = 0
    for bit in range(32):
        index |= ((x >> bit) & 1) << (2 * bit) | ((y >> bit) & 1) << (2 * bit + 1)
    return index


@dataclass(frozen=True)
class Availability:
    tiles: np.ndarray  # bool, one per tile of the subtree: level by level, Morton order
    content: np.ndarray
    child_subtrees: np.ndarray  # bool, 4^SUBTREE_LEVELS, Morton order


def availability(placement: Placement, parent_is_inner: bool = True) -> Availability:
    """Tile, content and child-subtree availability of the placement's subtree.

    A tile is available when it contains a building and its parent is an inner tile (the
    subtree's root: when it contains any); content when it holds one.
    """
    root = placement.root
    offsets = [(4**d - 1) // 3 for d in range(SUBTREE_LEVELS + 1)]
    tiles = np.zeros(offsets[-1], dtype=bool)
    content = np.zeros(offsets[-1], dtype=bool)
    children = np.zeros(4**SUBTREE_LEVELS, dtype=bool)
    held = {(int(level), int(x >> (MAX_LEVEL - level)), int(y >> (MAX_LEVEL - level)))
            for level, x, y in zip(placement.level.tolist(), placement.x.tolist(),
                                   placement.y.tolist(), strict=True) if level >= 0}
    for (level, x, y), n in placement.counts.items():
        depth = level - root.level
        if n == 0:
            continue
        tile = TileId(level, x, y)
        inner_parent = parent_is_inner if depth == 0 else not placement.is_leaf(tile.parent())
        if not inner_parent:
            continue
        local = _morton(x - (root.x << depth), y - (root.y << depth))
        if depth == SUBTREE_LEVELS:
            children[local] = True
        else:
            tiles[offsets[depth] + local] = True
            content[offsets[depth] + local] = (level, x, y) in held
    return Availability(tiles, content, children)


def _bitstream(bits: np.ndarray) -> bytes:
    return np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()


def _padded(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 8)


def subtree_file(available: Availability) -> bytes:
    """The binary subtree (magic ``subt``, version 1, JSON and binary chunks 8-byte
    aligned); an all-equal availability is written as a constant."""
    views: list[dict] = []
    binary = b""
    parts: dict[str, dict] = {}
    for name, bits in (("tileAvailability", available.tiles),
                       ("contentAvailability", available.content),
                       ("childSubtreeAvailability", available.child_subtrees)):
        count = int(bits.sum())
        if count in (0, bits.size):
            parts[name] = {"constant": 1 if count else 0}
            continue
        stream = _bitstream(bits)
        views.append({"buffer": 0, "byteOffset": len(binary), "byteLength": len(stream)})
        binary = _padded(binary + stream, b"\0")
        parts[name] = {"bitstream": len(views) - 1, "availableCount": count}
    document: dict = {}
    if views:
        document["buffers"] = [{"byteLength": len(binary)}]
        document["bufferViews"] = views
    document["tileAvailability"] = parts["tileAvailability"]
    document["contentAvailability"] = [parts["contentAvailability"]]
    document["childSubtreeAvailability"] = parts["childSubtreeAvailability"]
    text = _padded(json.dumps(document, separators=(",", ":")).encode(), b" ")
    header = SUBTREE_MAGIC + struct.pack("<IQQ", SUBTREE_VERSION, len(text), len(binary))
    return header + text + binary
