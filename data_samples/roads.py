"""The road graph for pgRouting: a street grid over the central city plus expressways.

The central urban core gets a jittered grid at ``scale.road_spacing_m``, turned to the NNE
strike of the valleys between the parallel ridges, with arterials every fourth line. Streets
stop at the rivers except on even lines, which cross as bridges. Expressways join the core to
every district and county seat: a minimum spanning tree over the seats and the core plus a
few extra links, each broken into nodes every ~2 km. Only the largest connected part of the
grid is kept, so the whole graph is one component.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import shapely
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree
from scipy.spatial import cKDTree
from shapely import affinity

from data_samples.geodesy import geodesic_m, to_local, to_lonlat
from data_samples.places import ARTERIAL_STEMS, Gazetteer, numbered_names
from data_samples.terrain import RIVERS, YANGTZE, Terrain

log = logging.getLogger(__name__)

SPEED_KMH = {"expressway": 80.0, "arterial": 50.0, "secondary": 40.0, "local": 30.0}

# The built-up core: an ellipse along the valleys, clipped to the nine central districts.
CORE_CENTRE = (106.545, 29.590)
CORE_HALF_ACROSS_M = 14_000.0
CORE_HALF_ALONG_M = 26_000.0
# Streets and valleys run NNE-SSW, like the ridges (degrees east of north).
GRID_BEARING_DEG = 20.0
# Node jitter as a fraction of the spacing (standard deviation, and clip).
JITTER_SD = 0.12
JITTER_MAX = 0.25
RIVER_MARGIN_M = 60.0

EXPRESSWAY_STEP_M = 2_000.0
EXTRA_LINKS = 5
EXTRA_LINK_MAX_M = 70_000.0
# Search for a seat on low ground within this radius of the district's representative point.
SEAT_SEARCH_M = 6_000.0
SEAT_SEARCH_STEP_M = 1_000.0
# How much lower (m) a candidate seat must be to be chosen 1 km further away.
SEAT_CLIMB_PER_KM = 20.0

# Short names used in expressway names (渝万高速, 万开高速); the central districts are all 渝.
SEAT_ABBREVIATIONS = {
    "500101": "万", "500102": "涪", "500110": "綦", "500111": "足", "500114": "黔",
    "500115": "长", "500116": "津", "500117": "合", "500118": "永", "500119": "南",
    "500120": "璧", "500151": "铜", "500152": "潼", "500153": "荣", "500154": "开",
    "500155": "梁", "500156": "武", "500229": "城", "500230": "丰", "500231": "垫",
    "500233": "忠", "500235": "云", "500236": "奉", "500237": "巫", "500238": "溪",
    "500240": "石", "500241": "秀", "500242": "酉", "500243": "彭",
}
CENTRAL_ABBREVIATION = "渝"

ARTERIAL_VARIANTS = ("大道", "路", "北路", "南路", "东路", "西路", "中路", "大道二段")
SECONDARY_VARIANTS = ("路", "一路", "二路", "三路", "四路", "五路", "六路", "七路", "八路", "九路")
LOCAL_VARIANTS = ("街", "正街", "后街", "横街", "支路", "一支路", "二支路", "三支路", "四支路")
BRIDGE_VARIANTS = ("大桥", "复线桥", "二桥", "三桥", "四桥")


@dataclass
class RoadNetwork:
    """Nodes and edges as parallel arrays; node and edge ids are index + 1."""

    lon: np.ndarray
    lat: np.ndarray
    x: np.ndarray
    y: np.ndarray
    # Street grid nodes and their grid indices (meaningless on expressway nodes).
    on_grid: np.ndarray
    grid_i: np.ndarray
    grid_j: np.ndarray
    source: np.ndarray
    target: np.ndarray
    road_class: np.ndarray
    name: np.ndarray
    bridge: np.ndarray
    spacing_m: float
    core: shapely.Geometry  # the core polygon, local metres

    @property
    def in_core(self) -> np.ndarray:
        """Edges of the street grid (not expressways)."""
        return self.road_class != "expressway"

    def edge_lengths_m(self) -> np.ndarray:
        return geodesic_m(self.lon[self.source], self.lat[self.source],
                          self.lon[self.target], self.lat[self.target])

    def tables(self) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
        """The road_nodes and road_edges tables."""
        nodes = gpd.GeoDataFrame(
            {"id": np.arange(1, len(self.lon) + 1, dtype=np.int64)},
            geometry=shapely.points(self.lon, self.lat), crs="EPSG:4326",
        )
        length = np.round(self.edge_lengths_m(), 2)
        speed = np.array([SPEED_KMH[c] for c in self.road_class])
        cost = np.round(length / speed * 3.6, 3)
        coords = np.stack([
            np.column_stack([self.lon[self.source], self.lat[self.source]]),
            np.column_stack([self.lon[self.target], self.lat[self.target]]),
        ], axis=1)
        edges = gpd.GeoDataFrame({
            "id": np.arange(1, len(self.source) + 1, dtype=np.int64),
            "source": self.source + 1,
            "target": self.target + 1,
            "road_class": self.road_class,
            "name": self.name,
            "speed_kmh": speed,
            "length_m": length,
            "cost_s": cost,
            "reverse_cost_s": cost,
        }, geometry=shapely.linestrings(coords), crs="EPSG:4326")
        return nodes, edges


def _local_geometry(geom: shapely.Geometry) -> shapely.Geometry:
    return shapely.transform(geom, lambda xy: np.column_stack(to_local(xy[:, 0], xy[:, 1])))


def river_lines_local() -> list[shapely.LineString]:
    lines = []
    for river in RIVERS:
        lon, lat = np.array(river.vertices).T
        lines.append(shapely.LineString(np.column_stack(to_local(lon, lat))))
    return lines


def core_polygon(districts: gpd.GeoDataFrame, central_codes: tuple[str, ...]) -> shapely.Geometry:
    """The built-up core in local metres: an ellipse along the valleys, inside the districts."""
    central = shapely.union_all(districts[districts["adcode"].isin(central_codes)].geometry.values)
    cx, cy = to_local(*CORE_CENTRE)
    circle = shapely.Point(float(cx[()]), float(cy[()])).buffer(1.0, quad_segs=32)
    ellipse = affinity.scale(circle, CORE_HALF_ACROSS_M, CORE_HALF_ALONG_M)
    # Positive angles turn anticlockwise; the long axis leans east of north.
    ellipse = affinity.rotate(ellipse, -GRID_BEARING_DEG, origin="centroid")
    return shapely.intersection(ellipse, _local_geometry(central)).buffer(0)


def line_class(index: np.ndarray) -> np.ndarray:
    """Arterial every fourth grid line, secondary every other one, local between."""
    return np.where(index % 4 == 0, "arterial", np.where(index % 2 == 0, "secondary", "local"))


@dataclass
class _Grid:
    x: np.ndarray
    y: np.ndarray
    i: np.ndarray
    j: np.ndarray
    source: np.ndarray
    target: np.ndarray
    # Orientation (0: along i, 1: along j) and index of the grid line each edge lies on.
    axis: np.ndarray
    line: np.ndarray
    bridge: np.ndarray
    crossed_river: np.ndarray  # index into RIVERS, -1 if none


def _street_grid(core: shapely.Geometry, spacing: float, rng: np.random.Generator) -> _Grid:
    """Jittered grid nodes inside the core (off the rivers) and the edges between them."""
    cx, cy = to_local(*CORE_CENTRE)
    cx, cy = float(cx[()]), float(cy[()])
    bearing = np.radians(GRID_BEARING_DEG)
    along_j = np.array([np.sin(bearing), np.cos(bearing)])
    along_i = np.array([np.cos(bearing), -np.sin(bearing)])
    half = int(np.ceil(CORE_HALF_ALONG_M / spacing)) + 2
    ii, jj = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    jitter = np.clip(rng.normal(0.0, JITTER_SD, (ii.size, 2)), -JITTER_MAX, JITTER_MAX) * spacing
    x = cx + (ii * along_i[0] + jj * along_j[0]) * spacing + jitter[:, 0]
    y = cy + (ii * along_i[1] + jj * along_j[1]) * spacing + jitter[:, 1]

    keep = shapely.contains_xy(core, x, y)
    rivers = river_lines_local()
    points = shapely.points(x, y)
    in_river = np.zeros(ii.size, bool)
    for river, line in zip(RIVERS, rivers, strict=True):
        in_river |= shapely.distance(points, line) <= river.half_width_m + RIVER_MARGIN_M
    keep &= ~in_river
    side = 2 * half + 1
    index = np.full(ii.size, -1, dtype=np.int64)
    index[keep] = np.arange(keep.sum())
    index, in_river = index.reshape(side, side), in_river.reshape(side, side)

    # Streets join grid neighbours. On bridge lines (even ones) a street also jumps the gap
    # the river leaves in the grid, to the first node on the far bank.
    max_step = int(np.ceil(2 * (YANGTZE.half_width_m + RIVER_MARGIN_M) / spacing)) + 2
    sources, targets, axes, lines = [], [], [], []
    for axis in (0, 1):
        # Work along the grid's axis 1 by transposing: rows are lines, columns positions.
        ids = index if axis == 1 else index.T
        gap = in_river if axis == 1 else in_river.T
        # all_gap[:, c]: every node strictly between column c and c + step is in the river.
        all_gap = np.ones((side, side - 1), bool)
        for step in range(1, max_step + 1):
            start, end = ids[:, :-step], ids[:, step:]
            if step > 1:
                all_gap = all_gap[:, : side - step] & gap[:, step - 1 : side - 1]
            joined = (start >= 0) & (end >= 0) & all_gap
            if step > 1:
                joined &= (np.arange(-half, half + 1) % 2 == 0)[:, None]
            line_index, _ = np.nonzero(joined)
            sources.append(start[joined])
            targets.append(end[joined])
            axes.append(np.full(line_index.size, axis))
            lines.append(line_index - half)
    source, target = np.concatenate(sources), np.concatenate(targets)
    axis, line = np.concatenate(axes), np.concatenate(lines)
    order = np.lexsort((target, source))
    source, target, axis, line = source[order], target[order], axis[order], line[order]
    x, y, ii, jj = x[keep], y[keep], ii[keep], jj[keep]

    segments = shapely.linestrings(np.stack(
        [np.column_stack([x[source], y[source]]), np.column_stack([x[target], y[target]])], axis=1))
    crossed = np.full(source.size, -1)
    for r, river in enumerate(rivers):
        crossed[(crossed < 0) & shapely.intersects(segments, river)] = r
    bridge = (crossed >= 0) & (line % 2 == 0)
    keep_edge = (crossed < 0) | bridge
    return _Grid(x, y, ii, jj, source[keep_edge], target[keep_edge], axis[keep_edge],
                 line[keep_edge], bridge[keep_edge], crossed[keep_edge])


def _largest_component(grid: _Grid) -> _Grid:
    n = grid.x.size
    adjacency = csr_matrix((np.ones(grid.source.size), (grid.source, grid.target)), shape=(n, n))
    _, labels = connected_components(adjacency, directed=False)
    biggest = np.argmax(np.bincount(labels))
    keep = labels == biggest
    new_index = np.cumsum(keep) - 1
    edge_keep = keep[grid.source]
    return _Grid(
        grid.x[keep], grid.y[keep], grid.i[keep], grid.j[keep],
        new_index[grid.source[edge_keep]], new_index[grid.target[edge_keep]],
        grid.axis[edge_keep], grid.line[edge_keep], grid.bridge[edge_keep],
        grid.crossed_river[edge_keep],
    )


def _grid_names(grid: _Grid, road_class: np.ndarray, spacing: float,
                rng: np.random.Generator) -> np.ndarray:
    """Names by stretches of a grid line: a street keeps its name for a couple of km."""
    gazetteer = Gazetteer()
    run_edges = max(1, round(2_000.0 / spacing))
    position = np.where(grid.axis == 0, grid.i[grid.source], grid.j[grid.source])
    run_length = np.where(road_class == "arterial", 3 * run_edges, run_edges)
    run = position // run_length
    mid_x = (grid.x[grid.source] + grid.x[grid.target]) / 2
    mid_y = (grid.y[grid.source] + grid.y[grid.target]) / 2
    names = np.empty(grid.source.size, dtype=object)

    keys = np.stack([grid.axis, grid.line, run], axis=1)
    unique_runs, run_of_edge = np.unique(keys, axis=0, return_inverse=True)
    run_of_edge = run_of_edge.ravel()
    counts = np.bincount(run_of_edge)
    run_x = np.bincount(run_of_edge, mid_x) / counts
    run_y = np.bincount(run_of_edge, mid_y) / counts
    run_class = line_class(unique_runs[:, 1])
    run_place = gazetteer.nearest(run_x, run_y)
    run_names = np.empty(len(unique_runs), dtype=object)

    arterial = np.flatnonzero(run_class == "arterial")
    stems = [ARTERIAL_STEMS[k % len(ARTERIAL_STEMS)]
             for k in rng.permutation(max(len(arterial), len(ARTERIAL_STEMS)))[: len(arterial)]]
    run_names[arterial] = numbered_names(stems, ARTERIAL_VARIANTS, "{n}号大道")
    for cls, variants, fallback in (("secondary", SECONDARY_VARIANTS, "{n}号路"),
                                    ("local", LOCAL_VARIANTS, "{n}号支路")):
        chosen = np.flatnonzero(run_class == cls)
        run_names[chosen] = numbered_names(list(run_place[chosen]), variants, fallback)
    names[:] = run_names[run_of_edge]

    bridges = np.flatnonzero(grid.bridge)
    if bridges.size:
        places = gazetteer.nearest(mid_x[bridges], mid_y[bridges])
        stems = [f"{place}{RIVERS[r].name_zh}" for place, r in
                 zip(places, grid.crossed_river[bridges], strict=True)]
        names[bridges] = numbered_names(stems, BRIDGE_VARIANTS, "{n}号桥")
    return names


def seat_points(districts: gpd.GeoDataFrame, terrain: Terrain) -> gpd.GeoDataFrame:
    """A seat for each district and county: low ground near its representative point."""
    rows = districts[districts["kind"] != "municipality"].sort_values("adcode")
    offsets = np.arange(-SEAT_SEARCH_M, SEAT_SEARCH_M + 1, SEAT_SEARCH_STEP_M)
    dx, dy = (a.ravel() for a in np.meshgrid(offsets, offsets))
    ring = np.hypot(dx, dy) <= SEAT_SEARCH_M
    dx, dy = dx[ring], dy[ring]
    seats = []
    for row in rows.itertuples():
        rep = row.geometry.representative_point()
        rx, ry = to_local(rep.x, rep.y)
        lon, lat = to_lonlat(rx + dx, ry + dy)
        inside = shapely.contains_xy(row.geometry, lon, lat)
        inside |= (dx == 0) & (dy == 0)
        score = terrain.ground(lon, lat) + SEAT_CLIMB_PER_KM * np.hypot(dx, dy) / 1000.0
        score[~inside] = np.inf
        best = int(np.argmin(score))
        seats.append((row.adcode, row.name_zh, lon[best], lat[best]))
    codes, names, lon, lat = zip(*seats, strict=True)
    return gpd.GeoDataFrame({"adcode": codes, "name_zh": names},
                            geometry=shapely.points(lon, lat), crs="EPSG:4326")


def _expressway_links(seats: gpd.GeoDataFrame, core_lon: np.ndarray, core_lat: np.ndarray,
                      core_x: np.ndarray, core_y: np.ndarray) -> list[tuple[int, int, int]]:
    """Links (a, b, core node) between seats (index) and the core (-1): MST plus extras."""
    sx, sy = to_local(seats.geometry.x.values, seats.geometry.y.values)
    _, nearest = cKDTree(np.column_stack([core_x, core_y])).query(np.column_stack([sx, sy]))
    k = len(seats)
    slon, slat = seats.geometry.x.values, seats.geometry.y.values
    a, b = np.triu_indices(k, 1)
    dist = np.zeros((k + 1, k + 1))
    dist[a, b] = geodesic_m(slon[a], slat[a], slon[b], slat[b])
    # The last row/column is the core, reached at its nearest node.
    dist[np.arange(k), k] = geodesic_m(slon, slat, core_lon[nearest], core_lat[nearest])
    tree = minimum_spanning_tree(csr_matrix(dist)).tocoo()
    pairs = {(int(min(p, q)), int(max(p, q))) for p, q in zip(tree.row, tree.col, strict=True)}
    candidates = [(dist[p, q], p, q) for p in range(k) for q in range(p + 1, k + 1)
                  if (p, q) not in pairs and dist[p, q] < EXTRA_LINK_MAX_M]
    for _, p, q in sorted(candidates)[:EXTRA_LINKS]:
        pairs.add((p, q))
    return [(p, -1 if q == k else q, int(nearest[p])) for p, q in sorted(pairs)]


def _expressways(lon: np.ndarray, lat: np.ndarray, seats: gpd.GeoDataFrame,
                 links: list[tuple[int, int, int]]):
    """Seat nodes and expressway chains appended after the ``lon``/``lat`` grid nodes.

    Returns all nodes' lon and lat, and the expressway edges' sources, targets and names.
    """
    node_lon = list(lon) + list(seats.geometry.x.values)
    node_lat = list(lat) + list(seats.geometry.y.values)
    seat_node = lon.size + np.arange(len(seats))
    abbreviation = [SEAT_ABBREVIATIONS.get(code, CENTRAL_ABBREVIATION) for code in seats["adcode"]]
    sources, targets, names = [], [], []
    for p, q, core_node in links:
        start = int(seat_node[p])
        end = core_node if q < 0 else int(seat_node[q])
        name = f"渝{abbreviation[p]}高速" if q < 0 else f"{abbreviation[p]}{abbreviation[q]}高速"
        length = geodesic_m(node_lon[start], node_lat[start], node_lon[end], node_lat[end])[0]
        pieces = max(1, int(np.ceil(length / EXPRESSWAY_STEP_M)))
        t = np.arange(1, pieces) / pieces
        chain = [start, *range(len(node_lon), len(node_lon) + pieces - 1), end]
        node_lon.extend(node_lon[start] + t * (node_lon[end] - node_lon[start]))
        node_lat.extend(node_lat[start] + t * (node_lat[end] - node_lat[start]))
        sources.extend(chain[:-1])
        targets.extend(chain[1:])
        names.extend([name] * pieces)
    return (np.array(node_lon), np.array(node_lat), np.array(sources, np.int64),
            np.array(targets, np.int64), np.array(names, dtype=object))


def build_roads(
    districts: gpd.GeoDataFrame,
    central_codes: tuple[str, ...],
    spacing: float,
    terrain: Terrain,
    rng: np.random.Generator,
) -> RoadNetwork:
    core = core_polygon(districts, central_codes)
    grid = _largest_component(_street_grid(core, spacing, rng))
    road_class = line_class(grid.line)
    names = _grid_names(grid, road_class, spacing, rng)
    grid_lon, grid_lat = to_lonlat(grid.x, grid.y)

    # Seats inside the core are on the street grid already.
    seats = seat_points(districts, terrain)
    sx, sy = to_local(seats.geometry.x.values, seats.geometry.y.values)
    seats = seats[~shapely.contains_xy(core, sx, sy)].reset_index(drop=True)
    links = _expressway_links(seats, grid_lon, grid_lat, grid.x, grid.y)
    lon, lat, source, target, link_names = _expressways(grid_lon, grid_lat, seats, links)

    x, y = to_local(lon, lat)
    n_express = link_names.size
    off_grid = lon.size - grid.i.size
    network = RoadNetwork(
        lon=lon, lat=lat, x=x, y=y,
        on_grid=np.arange(lon.size) < grid.i.size,
        grid_i=np.concatenate([grid.i, np.zeros(off_grid, np.int64)]),
        grid_j=np.concatenate([grid.j, np.zeros(off_grid, np.int64)]),
        source=np.concatenate([grid.source, source]).astype(np.int64),
        target=np.concatenate([grid.target, target]).astype(np.int64),
        road_class=np.concatenate([road_class, np.full(n_express, "expressway")]).astype(object),
        name=np.concatenate([names, link_names]),
        bridge=np.concatenate([grid.bridge, np.zeros(n_express, bool)]),
        spacing_m=spacing,
        core=core,
    )
    log.info("roads: %d nodes, %d edges (%d expressway links to %d seats)",
             lon.size, network.source.size, len(links), len(seats))
    return network
