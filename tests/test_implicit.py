"""The implicit quadtree (tiles/implicit.py) against a brute-force oracle and the spec.

The oracle places buildings by descending the tree tile by tile with plain comparisons
(contained = the box within the tile's degrees; a tile over capacity hands what its children
contain down). Subtree files are decoded here from the 3D Tiles 1.1 layout, with a Morton
index written independently of the module's.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tiles import implicit
from tiles.implicit import MAX_LEVEL, SUBTREE_LEVELS, TileId

WEST, SOUTH, EAST, NORTH = 105.0, 28.0, 111.0, 33.0


def tile_degrees(level: int, x: int, y: int) -> tuple[float, float, float, float]:
    dx, dy = (EAST - WEST) / 2**level, (NORTH - SOUTH) / 2**level
    return WEST + x * dx, SOUTH + y * dy, WEST + (x + 1) * dx, SOUTH + (y + 1) * dy


def oracle(boxes: np.ndarray, capacity: int) -> dict[tuple[int, int, int], set[int]]:
    """Tile -> the rows it holds, by recursive descent."""
    held: dict[tuple[int, int, int], set[int]] = {}

    def descend(level: int, x: int, y: int, rows: np.ndarray) -> None:
        w, s, e, n = tile_degrees(level, x, y)
        inside = rows[(boxes[rows, 0] >= w) & (boxes[rows, 2] < e) & (boxes[rows, 1] >= s)
                      & (boxes[rows, 3] < n)]
        if not inside.size:
            return
        if inside.size <= capacity or level == MAX_LEVEL:
            held[(level, x, y)] = set(inside.tolist())
            return
        handed: set[int] = set()
        for cx in (2 * x, 2 * x + 1):
            for cy in (2 * y, 2 * y + 1):
                cw, cs, ce, cn = tile_degrees(level + 1, cx, cy)
                child = inside[(boxes[inside, 0] >= cw) & (boxes[inside, 2] < ce)
                               & (boxes[inside, 1] >= cs) & (boxes[inside, 3] < cn)]
                handed |= set(child.tolist())
                descend(level + 1, cx, cy, child)
        rest = set(inside.tolist()) - handed
        if rest:
            held[(level, x, y)] = rest

    descend(0, 0, 0, np.arange(len(boxes)))
    return held


def random_boxes(seed: int, n: int) -> np.ndarray:
    """Footprints of 10 m to 3 km around the city centre, many on tile edges."""
    rng = np.random.default_rng(seed)
    cx = rng.uniform(106.3, 106.8, n)
    cy = rng.uniform(29.3, 29.8, n)
    # A fifth sit exactly on a level-9 grid line: the comparisons at the edge must agree.
    on_line = rng.random(n) < 0.2
    cx[on_line] = WEST + np.round((cx[on_line] - WEST) / (6 / 512)) * (6 / 512)
    half = rng.choice([0.00005, 0.0003, 0.003, 0.015], n, p=[0.5, 0.3, 0.15, 0.05])
    return np.column_stack([cx - half, cy - half, cx + half, cy + half])


def decode_subtree(data: bytes, bits_tiles: int, bits_children: int) -> dict:
    magic, version, json_length, binary_length = struct.unpack("<4sIQQ", data[:24])
    assert magic == b"subt" and version == 1
    assert json_length % 8 == 0 and binary_length % 8 == 0
    assert len(data) == 24 + json_length + binary_length
    document = json.loads(data[24:24 + json_length].decode().rstrip(" "))
    binary = data[24 + json_length:]
    if "buffers" in document:
        assert document["buffers"][0]["byteLength"] == binary_length

    def bits(part: dict, count: int) -> np.ndarray:
        if "constant" in part:
            return np.full(count, bool(part["constant"]))
        view = document["bufferViews"][part["bitstream"]]
        assert view["byteOffset"] % 8 == 0
        assert view["byteLength"] == (count + 7) // 8
        raw = binary[view["byteOffset"]:view["byteOffset"] + view["byteLength"]]
        out = np.array([(raw[i // 8] >> (i % 8)) & 1 for i in range(count)], dtype=bool)
        assert part.get("availableCount", out.sum()) == out.sum()
        return out

    return {"tiles": bits(document["tileAvailability"], bits_tiles),
            "content": bits(document["contentAvailability"][0], bits_tiles),
            "children": bits(document["childSubtreeAvailability"], bits_children)}


def morton_to_xy(index: int) -> tuple[int, int]:
    x = y = 0
    for bit in range(20):
        x |= ((index >> (2 * bit)) & 1) << bit
        y |= ((index >> (2 * bit + 1)) & 1) << bit
    return x, y


def tiles_of_subtree(root: TileId) -> list[TileId]:
    """Tiles of a subtree in bitstream order: level by level, Morton order within."""
    out = []
    for depth in range(SUBTREE_LEVELS):
        for index in range(4**depth):
            x, y = morton_to_xy(index)
            out.append(TileId(root.level + depth, (root.x << depth) + x, (root.y << depth) + y))
    return out


def placement_of(boxes: np.ndarray, root: TileId, capacity: int) -> implicit.Placement:
    w, s, e, n = root.bounds()
    inside = np.flatnonzero((boxes[:, 0] >= w) & (boxes[:, 2] < e) & (boxes[:, 1] >= s)
                            & (boxes[:, 3] < n))
    part = boxes[inside]
    return implicit.place(root, inside, part[:, 0], part[:, 1], part[:, 2], part[:, 3],
                          capacity)


@pytest.mark.parametrize("seed,capacity", [(1, 40), (2, 200), (3, 5)])
def test_placement_and_availability_match_the_oracle(seed: int, capacity: int):
    boxes = random_boxes(seed, 4000)
    expected = oracle(boxes, capacity)
    found: dict[tuple[int, int, int], set[int]] = {}
    pending = [implicit.ROOT]
    subtrees = 0
    while pending:
        root = pending.pop()
        subtrees += 1
        placement = placement_of(boxes, root, capacity)
        tiles = tiles_of_subtree(root)
        decoded = decode_subtree(
            implicit.subtree_file(implicit.availability(placement)), len(tiles),
            4**SUBTREE_LEVELS)
        for k, tile in enumerate(tiles):
            rows = set(placement.ids[placement.holds(tile)].tolist())
            if rows:
                found[(tile.level, tile.x, tile.y)] = rows
            assert decoded["content"][k] == bool(rows), tile
            if decoded["content"][k]:
                assert decoded["tiles"][k], f"content without the tile at {tile}"
            if decoded["tiles"][k] and tile.level > root.level:
                parent_index = tiles.index(tile.parent())
                assert decoded["tiles"][parent_index], f"{tile} available under a gap"
        for index in np.flatnonzero(decoded["children"]):
            x, y = morton_to_xy(int(index))
            child = TileId(root.level + SUBTREE_LEVELS, (root.x << SUBTREE_LEVELS) + x,
                           (root.y << SUBTREE_LEVELS) + y)
            assert decoded["tiles"][tiles.index(child.parent())]
            pending.append(child)
    assert found == expected
    # Every row once; no tile holds more than the capacity plus its mid-line crossers.
    assert sorted(r for rows in found.values() for r in rows) == list(range(len(boxes)))
    assert subtrees > 1 or capacity > 100


def test_every_held_box_lies_in_its_tile():
    boxes = random_boxes(7, 3000)
    for (level, x, y), rows in oracle(boxes, 30).items():
        w, s, e, n = TileId(level, x, y).bounds()
        assert (w, s, e, n) == tile_degrees(level, x, y)
        part = boxes[sorted(rows)]
        assert (part[:, 0] >= w).all() and (part[:, 2] < e).all()
        assert (part[:, 1] >= s).all() and (part[:, 3] < n).all()


def test_constant_availability_and_padding():
    empty = implicit.place(implicit.ROOT, np.zeros(0, dtype=np.int64), *(np.zeros(0),) * 4)
    data = implicit.subtree_file(implicit.availability(empty))
    decoded = decode_subtree(data, (4**SUBTREE_LEVELS - 1) // 3, 4**SUBTREE_LEVELS)
    assert not decoded["tiles"].any() and not decoded["children"].any()
    document = json.loads(data[24:].decode().strip())
    assert document["tileAvailability"] == {"constant": 0}
    assert "buffers" not in document


@pytest.mark.parametrize("address,message", [
    ((15, 0, 0), "level must be 0-14"), ((-1, 0, 0), "level must be 0-14"),
    ((3, 8, 0), "x and y must be 0-7"), ((2, 0, -1), "x and y must be 0-3"),
])
def test_addresses_outside_the_tree(address, message):
    with pytest.raises(Exception) as raised:
        implicit.checked_tile(*address)
    assert message in str(raised.value)
    assert getattr(raised.value, "status_code", None) == 404
