"""Underground pipe networks laid along the streets: drainage, water and gas.

Drainage runs under the road centre lines and flows by gravity: every road node drains to its
lowest lower neighbour on the DEM (steepest descent), nodes with no lower neighbour are
outfalls, and manholes are added along each pipe only where the ground keeps falling, so
ground and invert elevations strictly decrease along every segment. Water and gas are
pressurised: trees grown from a few sources (water plants, gas gate stations) along the
streets, arterials first, plus a few loops, offset a few metres from the drainage line.

Elevations are handled in integer millimetres: the DEM's 1/8 m steps are whole millimetres,
so "strictly lower" survives the trip through the CSV files exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from data_samples.geodesy import geodesic_m, to_local, to_lonlat
from data_samples.roads import RoadNetwork, river_lines_local
from data_samples.scales import CITY_CENTRE
from data_samples.terrain import Terrain

log = logging.getLogger(__name__)

NETWORK_LETTER = {"drainage": "D", "water": "W", "gas": "G"}

MANHOLE_SPACING_M = 100.0
DEPTH_RANGE_MM = (1_500, 3_500)
# Minimum sewer gradient, capped at half the ground's fall so a pipe never has to go deeper
# than the manhole above it to keep falling.
MIN_GRADIENT = 0.002
DRAIN_DIAMETERS_MM = np.array([300, 400, 500, 600, 800, 1000, 1200, 1500, 1800, 2000])

PRESSURE_NODE_SPACING_M = 150.0
COVER_RANGE_MM = (1_000, 1_500)
# Water mains sit a few metres to one side of the road centre line, gas to the other.
OFFSET_M = {"water": (4.0, 4.0), "gas": (-4.0, -4.0)}
# Growing along arterials is cheaper: mains follow the big roads first.
CLASS_COST = {"arterial": 1.0, "secondary": 1.6, "local": 2.6}
LOOP_SHARE = 0.1
VALVE_SHARE = 0.45
DIAMETERS_MM = {
    "water": np.array([100, 150, 200, 300, 400, 500, 600, 800, 1000, 1200]),
    "gas": np.array([100, 150, 200, 250, 300, 400, 500, 600]),
}
# Water plants draw from the rivers; gas gate stations sit at the edge of the city.
# Both stay within reach of the centre so the three networks overlap under the same streets.
SOURCES = {"water": {"count_per_km": 1 / 75, "river_km": 1.5, "centre_km": (0.0, 7.0)},
           "gas": {"count_per_km": 1 / 70, "river_km": None, "centre_km": (3.0, 8.0)}}
CITY_CENTRE_XY = tuple(float(v) for v in to_local(*CITY_CENTRE))


@dataclass
class PipeNetwork:
    """One network's nodes and segments as parallel arrays (indices, not ids)."""

    network: str
    lon: np.ndarray
    lat: np.ndarray
    kind: np.ndarray
    ground_mm: np.ndarray
    invert_mm: np.ndarray
    seg_from: np.ndarray
    seg_to: np.ndarray
    diameter_mm: np.ndarray
    material: np.ndarray
    install_year: np.ndarray
    # The road edge (index) each segment lies along, and the road node (or -1) at each node.
    road_edge: np.ndarray
    road_node: np.ndarray

    @property
    def lengths_m(self) -> np.ndarray:
        return geodesic_m(self.lon[self.seg_from], self.lat[self.seg_from],
                          self.lon[self.seg_to], self.lat[self.seg_to])


def _snap_up(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The smallest standard size at or above each value (the largest if none is)."""
    return sizes[np.minimum(np.searchsorted(sizes, values), sizes.size - 1)]


def _distance_to_centre_m(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.hypot(x - CITY_CENTRE_XY[0], y - CITY_CENTRE_XY[1])


def _install_years(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Older pipes in the old centre, newer towards the edge, 1985-2024."""
    reach = np.clip(_distance_to_centre_m(x, y) / 16_000.0, 0.0, 1.0)
    years = 1988 + 30 * reach + rng.normal(0.0, 7.0, x.size)
    return np.clip(np.round(years), 1985, 2024).astype(np.int64)


# --- drainage ---------------------------------------------------------------------------


def _steepest_descent(road: RoadNetwork, ground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each road node, the street edge to its lowest lower neighbour (-1: none)."""
    usable = np.flatnonzero(road.in_core & ~road.bridge)
    edge = np.concatenate([usable, usable])
    upper = np.concatenate([road.source[usable], road.target[usable]])
    lower = np.concatenate([road.target[usable], road.source[usable]])
    downhill = ground[lower] < ground[upper]
    edge, upper, lower = edge[downhill], upper[downhill], lower[downhill]
    order = np.lexsort((lower, ground[lower], upper))
    edge, upper, lower = edge[order], upper[order], lower[order]
    first = np.r_[True, upper[1:] != upper[:-1]]
    down_edge = np.full(road.lon.size, -1, dtype=np.int64)
    down_node = np.full(road.lon.size, -1, dtype=np.int64)
    down_edge[upper[first]] = edge[first]
    down_node[upper[first]] = lower[first]
    return down_edge, down_node


def _select_catchments(road: RoadNetwork, down_edge: np.ndarray, down_node: np.ndarray,
                       target_m: float) -> np.ndarray:
    """Road edges of the drainage: whole paths to outfalls, nearest the centre first."""
    lengths = road.edge_lengths_m()
    chosen = np.zeros(road.source.size, bool)
    total = 0.0
    start_order = np.argsort(_distance_to_centre_m(road.x, road.y), kind="stable")
    for node in start_order:
        if total >= target_m:
            break
        while down_edge[node] >= 0 and not chosen[down_edge[node]]:
            chosen[down_edge[node]] = True
            total += lengths[down_edge[node]]
            node = down_node[node]
    return np.flatnonzero(chosen)


def _falling_manholes(ground_start: float, ground_end: float, candidates: np.ndarray) -> list[int]:
    """Indices of candidates kept as manholes so that ground strictly falls along the pipe."""
    kept, last = [], ground_start
    for k, value in enumerate(candidates):
        if ground_end < value < last:
            kept.append(k)
            last = value
    return kept


def _assign_inverts(ground_mm: np.ndarray, seg_from: np.ndarray, seg_to: np.ndarray,
                    lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inverts 1.5-3.5 m below ground that strictly fall along every segment.

    Segments are visited from the highest upstream node down (ground strictly falls along
    the flow, so this is a topological order) and each lowers its downstream node's invert
    as needed. The drop is at most half the ground's fall, so depths never build up.
    """
    invert = ground_mm - rng.integers(*DEPTH_RANGE_MM, size=ground_mm.size, endpoint=True)
    fall = ground_mm[seg_from] - ground_mm[seg_to]
    drop = np.maximum(1, np.minimum(np.round(MIN_GRADIENT * lengths * 1000).astype(np.int64),
                                    fall // 2))
    for s in np.argsort(-ground_mm[seg_from], kind="stable"):
        invert[seg_to[s]] = min(invert[seg_to[s]], invert[seg_from[s]] - drop[s])
    return invert


def _upstream_length_m(ground_mm: np.ndarray, seg_from: np.ndarray, seg_to: np.ndarray,
                       lengths: np.ndarray) -> np.ndarray:
    """Pipe length draining through each segment (itself included)."""
    above = np.zeros(ground_mm.size)
    through = np.zeros(seg_from.size)
    for s in np.argsort(-ground_mm[seg_from], kind="stable"):
        through[s] = above[seg_from[s]] + lengths[s]
        above[seg_to[s]] += through[s]
    return through


def _drain_materials(diameter: np.ndarray, years: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    roll = rng.random(diameter.size)
    small = np.where(roll < 0.5, "hdpe", np.where(roll < 0.8, "pvc", "concrete"))
    small = np.where(years < 2000, np.where(roll < 0.7, "concrete", "ductile_iron"), small)
    medium = np.where(roll < 0.55, "concrete", np.where(roll < 0.85, "hdpe", "ductile_iron"))
    return np.where(diameter >= 1000, "concrete", np.where(diameter >= 500, medium, small))


@dataclass
class _Pipes:
    """Nodes (road-level nodes first) and segments laid along street edges."""

    lon: np.ndarray
    lat: np.ndarray
    ground: np.ndarray
    seg_from: np.ndarray
    seg_to: np.ndarray
    seg_edge: np.ndarray
    road_nodes: np.ndarray


def _lay_drains(road: RoadNetwork, terrain: Terrain, edges: np.ndarray, upper: np.ndarray,
                lower: np.ndarray, road_ground: np.ndarray) -> _Pipes:
    """Pipes down each street edge, with manholes every ~100 m where the ground falls."""
    road_nodes = np.unique(np.concatenate([upper, lower]))
    node_of_road = {int(r): k for k, r in enumerate(road_nodes)}
    lon, lat = list(road.lon[road_nodes]), list(road.lat[road_nodes])
    ground = list(road_ground[road_nodes])
    # Candidate manholes, evenly spaced along each edge, evaluated on the DEM in one go.
    pieces = np.maximum(1, np.round(road.edge_lengths_m()[edges] / MANHOLE_SPACING_M).astype(int))
    owner = np.repeat(np.arange(edges.size), pieces - 1)
    t = np.concatenate([np.arange(1, m) / m for m in pieces] + [np.zeros(0)])
    cand_lon = road.lon[upper[owner]] + t * (road.lon[lower[owner]] - road.lon[upper[owner]])
    cand_lat = road.lat[upper[owner]] + t * (road.lat[lower[owner]] - road.lat[upper[owner]])
    cand_ground = terrain.ground(cand_lon, cand_lat)
    offsets = np.r_[0, np.cumsum(pieces - 1)]

    seg_from, seg_to, seg_edge = [], [], []
    for e in range(edges.size):
        span = slice(offsets[e], offsets[e + 1])
        chain = [node_of_road[int(upper[e])]]
        for k in _falling_manholes(road_ground[upper[e]], road_ground[lower[e]],
                                   cand_ground[span]):
            chain.append(len(lon))
            lon.append(cand_lon[span][k])
            lat.append(cand_lat[span][k])
            ground.append(cand_ground[span][k])
        chain.append(node_of_road[int(lower[e])])
        seg_from.extend(chain[:-1])
        seg_to.extend(chain[1:])
        seg_edge.extend([edges[e]] * (len(chain) - 1))
    return _Pipes(np.array(lon), np.array(lat), np.array(ground),
                  np.array(seg_from, np.int64), np.array(seg_to, np.int64),
                  np.array(seg_edge, np.int64), road_nodes)


def build_drainage(road: RoadNetwork, terrain: Terrain, target_km: float,
                   rng: np.random.Generator) -> PipeNetwork:
    road_ground = terrain.ground(road.lon, road.lat)
    down_edge, down_node = _steepest_descent(road, road_ground)
    edges = _select_catchments(road, down_edge, down_node, target_km * 1000.0)
    # Orient each chosen street edge downhill.
    forward = road_ground[road.source[edges]] > road_ground[road.target[edges]]
    upper = np.where(forward, road.source[edges], road.target[edges])
    lower = np.where(forward, road.target[edges], road.source[edges])
    laid = _lay_drains(road, terrain, edges, upper, lower, road_ground)
    lon, lat, seg_from, seg_to = laid.lon, laid.lat, laid.seg_from, laid.seg_to

    ground_mm = np.round(laid.ground * 1000).astype(np.int64)
    seg_lengths = geodesic_m(lon[seg_from], lat[seg_from], lon[seg_to], lat[seg_to])
    invert_mm = _assign_inverts(ground_mm, seg_from, seg_to, seg_lengths, rng)
    upstream_km = _upstream_length_m(ground_mm, seg_from, seg_to, seg_lengths) / 1000.0
    diameter = _snap_up(300.0 * (1.0 + upstream_km) ** 0.45, DRAIN_DIAMETERS_MM)
    # One street's pipes were laid together.
    years = _install_years(road.x[upper], road.y[upper], rng)[np.searchsorted(edges,
                                                                              laid.seg_edge)]

    degree = np.bincount(np.concatenate([seg_from, seg_to]), minlength=lon.size)
    has_outlet = np.zeros(lon.size, bool)
    has_outlet[seg_from] = True
    kind = np.where(~has_outlet, "outfall", np.where(degree >= 3, "junction", "manhole"))
    road_node = np.full(lon.size, -1, dtype=np.int64)
    road_node[: laid.road_nodes.size] = laid.road_nodes
    network = PipeNetwork(
        network="drainage", lon=lon, lat=lat, kind=kind.astype(object), ground_mm=ground_mm,
        invert_mm=invert_mm, seg_from=seg_from, seg_to=seg_to, diameter_mm=diameter,
        material=_drain_materials(diameter, years, rng).astype(object), install_year=years,
        road_edge=laid.seg_edge, road_node=road_node,
    )
    log.info("drainage: %d nodes (%d outfalls), %d segments, %.0f km", lon.size,
             (kind == "outfall").sum(), seg_from.size, seg_lengths.sum() / 1000)
    return network


# --- water and gas ----------------------------------------------------------------------


def _pick_sources(road: RoadNetwork, candidates: np.ndarray, count: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Spread ``count`` sources over the candidates by farthest-point sampling."""
    first = candidates[rng.integers(candidates.size)]
    chosen = [first]
    nearest = np.hypot(road.x[candidates] - road.x[first], road.y[candidates] - road.y[first])
    while len(chosen) < min(count, candidates.size):
        pick = candidates[int(np.argmax(nearest))]
        chosen.append(pick)
        nearest = np.minimum(nearest, np.hypot(road.x[candidates] - road.x[pick],
                                               road.y[candidates] - road.y[pick]))
    return np.array(sorted(chosen), np.int64)


def _source_candidates(road: RoadNetwork, network: str) -> np.ndarray:
    rule = SOURCES[network]
    street_nodes = np.unique(np.concatenate([road.source[road.in_core],
                                             road.target[road.in_core]]))
    distance_km = _distance_to_centre_m(road.x, road.y)[street_nodes] / 1000.0
    low, high = rule["centre_km"]
    ok = (distance_km >= low) & (distance_km <= high)
    if rule["river_km"] is not None:
        points = shapely.points(road.x[street_nodes], road.y[street_nodes])
        near = np.zeros(street_nodes.size, bool)
        for line in river_lines_local():
            near |= shapely.distance(points, line) < rule["river_km"] * 1000.0
        ok &= near
    return street_nodes[ok] if ok.any() else street_nodes


@dataclass
class _Layout:
    """Street edges of a pressurised network, oriented away from the sources."""

    edges: np.ndarray
    upstream: np.ndarray
    downstream: np.ndarray
    tree: np.ndarray  # False on the loop edges added after the tree
    dist: np.ndarray  # every road node's cost distance from its nearest source


def _grow_network(road: RoadNetwork, sources: np.ndarray, target_m: float,
                  rng: np.random.Generator) -> _Layout:
    """A tree grown from the sources along the cheapest streets, plus a share of loops."""
    street = np.flatnonzero(road.in_core)
    lengths = road.edge_lengths_m()
    weight = lengths[street] * np.array([CLASS_COST[c] for c in road.road_class[street]])
    n = road.lon.size
    graph = csr_matrix((weight, (road.source[street], road.target[street])), shape=(n, n))
    dist, pred, _ = dijkstra(graph, directed=False, indices=sources, min_only=True,
                             return_predecessors=True)
    edge_of = {}
    for e in street:
        edge_of[(int(road.source[e]), int(road.target[e]))] = int(e)
        edge_of[(int(road.target[e]), int(road.source[e]))] = int(e)

    chosen, total = [], 0.0
    reached = np.isfinite(dist)
    for node in np.argsort(np.where(reached, dist, np.inf), kind="stable"):
        if total >= (1.0 - LOOP_SHARE) * target_m or not reached[node]:
            break
        if pred[node] < 0:
            continue
        e = edge_of[(int(pred[node]), int(node))]
        chosen.append(e)
        total += lengths[e]
    in_net = np.zeros(n, bool)
    in_net[sources] = True
    in_net[road.source[chosen]] = True
    in_net[road.target[chosen]] = True
    taken = np.zeros(road.source.size, bool)
    taken[chosen] = True
    loops = street[in_net[road.source[street]] & in_net[road.target[street]] & ~taken[street]]
    n_tree = len(chosen)
    for e in loops[rng.permutation(loops.size)]:
        if total >= target_m:
            break
        chosen.append(int(e))
        total += lengths[e]
    edges = np.array(chosen, np.int64)
    tree = np.arange(edges.size) < n_tree
    order = np.argsort(edges)
    edges, tree = edges[order], tree[order]
    forward = dist[road.source[edges]] <= dist[road.target[edges]]
    upstream = np.where(forward, road.source[edges], road.target[edges])
    downstream = np.where(forward, road.target[edges], road.source[edges])
    return _Layout(edges, upstream, downstream, tree, dist)


def _served_length_m(road: RoadNetwork, layout: _Layout) -> np.ndarray:
    """Pipe length fed through each street edge: its subtree in the supply tree.

    Loop edges only carry their own length; they balance pressure rather than feed.
    """
    lengths = road.edge_lengths_m()[layout.edges]
    below = np.zeros(road.lon.size)
    served = lengths.copy()
    tree = np.flatnonzero(layout.tree)
    for k in tree[np.argsort(-layout.dist[layout.downstream[tree]], kind="stable")]:
        served[k] += below[layout.downstream[k]]
        below[layout.upstream[k]] += served[k]
    return served


def _pressure_materials(network: str, diameter: np.ndarray, years: np.ndarray,
                        rng: np.random.Generator) -> np.ndarray:
    roll = rng.random(diameter.size)
    if network == "gas":
        return np.where((diameter >= 300) | (years < 2000) | (roll < 0.2), "steel", "pe")
    modern = np.where(diameter >= 1000, "steel", np.where(diameter >= 300, "ductile_iron", "pe"))
    return np.where((years < 1995) & (roll < 0.7), "cast_iron", modern)


def _lay_mains(network: str, road: RoadNetwork, terrain: Terrain, layout: _Layout,
               sources: np.ndarray, rng: np.random.Generator) -> tuple[_Pipes, np.ndarray]:
    """Mains along each street edge, a joint every ~150 m, offset from the centre line.

    Returns the pipes and each node's kind.
    """
    edges, upstream, downstream = layout.edges, layout.upstream, layout.downstream
    road_nodes = np.unique(np.concatenate([upstream, downstream, sources]))
    index_of = np.full(road.lon.size, -1, dtype=np.int64)
    index_of[road_nodes] = np.arange(road_nodes.size)
    dx, dy = OFFSET_M[network]
    px, py = list(road.x[road_nodes] + dx), list(road.y[road_nodes] + dy)
    kind = ["junction"] * road_nodes.size
    for s in sources:
        kind[index_of[s]] = "source"
    pieces = np.maximum(1, np.round(road.edge_lengths_m()[edges]
                                    / PRESSURE_NODE_SPACING_M).astype(int))
    # Joints along a main are valves often enough that a shut-off trace stops within a street.
    valve = iter(rng.random(int((pieces - 1).sum())) < VALVE_SHARE)
    seg_from, seg_to, seg_edge = [], [], []
    for k, e in enumerate(edges):
        a, b = upstream[k], downstream[k]
        chain = [int(index_of[a])]
        for step in range(1, pieces[k]):
            t = step / pieces[k]
            chain.append(len(px))
            px.append(road.x[a] + t * (road.x[b] - road.x[a]) + dx)
            py.append(road.y[a] + t * (road.y[b] - road.y[a]) + dy)
            kind.append("valve" if next(valve) else "junction")
        chain.append(int(index_of[b]))
        seg_from.extend(chain[:-1])
        seg_to.extend(chain[1:])
        seg_edge.extend([e] * (len(chain) - 1))
    lon, lat = to_lonlat(np.array(px), np.array(py))
    pipes = _Pipes(lon, lat, terrain.ground(lon, lat), np.array(seg_from, np.int64),
                   np.array(seg_to, np.int64), np.array(seg_edge, np.int64), road_nodes)
    return pipes, np.array(kind, dtype=object)


def build_pressurised(network: str, road: RoadNetwork, terrain: Terrain, target_km: float,
                      rng: np.random.Generator) -> PipeNetwork:
    """A water or gas network along the streets, offset from the road centre line."""
    candidates = _source_candidates(road, network)
    count = max(2, round(target_km * SOURCES[network]["count_per_km"]))
    sources = _pick_sources(road, candidates, count, rng)
    layout = _grow_network(road, sources, target_km * 1000.0, rng)
    laid, kind = _lay_mains(network, road, terrain, layout, sources, rng)
    lon, lat = laid.lon, laid.lat
    ground_mm = np.round(laid.ground * 1000).astype(np.int64)
    invert_mm = ground_mm - rng.integers(*COVER_RANGE_MM, size=lon.size, endpoint=True)
    edge_pos = np.searchsorted(layout.edges, laid.seg_edge)
    served_km = _served_length_m(road, layout)[edge_pos] / 1000.0
    diameter = _snap_up(100.0 * (1.0 + served_km) ** 0.55, DIAMETERS_MM[network])
    years = _install_years(road.x[layout.upstream], road.y[layout.upstream], rng)[edge_pos]
    road_node = np.full(lon.size, -1, dtype=np.int64)
    road_node[: laid.road_nodes.size] = laid.road_nodes
    result = PipeNetwork(
        network=network, lon=lon, lat=lat, kind=kind, ground_mm=ground_mm, invert_mm=invert_mm,
        seg_from=laid.seg_from, seg_to=laid.seg_to, diameter_mm=diameter,
        material=_pressure_materials(network, diameter, years, rng).astype(object),
        install_year=years, road_edge=laid.seg_edge, road_node=road_node,
    )
    log.info("%s: %d sources, %d nodes, %d segments, %.0f km", network, sources.size, lon.size,
             result.seg_from.size, result.lengths_m.sum() / 1000)
    return result


# --- tables -----------------------------------------------------------------------------


@dataclass
class PipeTables:
    nodes: gpd.GeoDataFrame
    segments: gpd.GeoDataFrame
    # Id of each network's first node and first segment: id = offset + index + 1.
    node_offset: dict[str, int]
    segment_offset: dict[str, int]


def pipe_tables(networks: list[PipeNetwork]) -> PipeTables:
    node_frames, segment_frames = [], []
    node_offset, segment_offset = {}, {}
    n_nodes = n_segments = 0
    for net in networks:
        letter = NETWORK_LETTER[net.network]
        node_offset[net.network] = n_nodes
        segment_offset[net.network] = n_segments
        node_ids = n_nodes + np.arange(1, net.lon.size + 1, dtype=np.int64)
        node_frames.append(gpd.GeoDataFrame({
            "id": node_ids,
            "code": [f"PN-{letter}-{k:06d}" for k in range(1, net.lon.size + 1)],
            "network": net.network,
            "kind": net.kind,
            "ground_elev_m": net.ground_mm / 1000.0,
            "invert_elev_m": net.invert_mm / 1000.0,
        }, geometry=shapely.points(net.lon, net.lat), crs="EPSG:4326"))
        coords = np.stack([np.column_stack([net.lon[net.seg_from], net.lat[net.seg_from]]),
                           np.column_stack([net.lon[net.seg_to], net.lat[net.seg_to]])], axis=1)
        count = net.seg_from.size
        segment_frames.append(gpd.GeoDataFrame({
            "id": n_segments + np.arange(1, count + 1, dtype=np.int64),
            "code": [f"PS-{letter}-{k:06d}" for k in range(1, count + 1)],
            "network": net.network,
            "from_node": n_nodes + net.seg_from + 1,
            "to_node": n_nodes + net.seg_to + 1,
            "diameter_mm": net.diameter_mm.astype(np.int64),
            "material": net.material,
            "install_year": net.install_year.astype(np.int64),
            "length_m": np.round(net.lengths_m, 2),
            "flow_direction": "downstream" if net.network == "drainage" else "both",
        }, geometry=shapely.linestrings(coords), crs="EPSG:4326"))
        n_nodes += net.lon.size
        n_segments += count
    nodes = gpd.GeoDataFrame(pd.concat(node_frames, ignore_index=True), crs="EPSG:4326")
    segments = gpd.GeoDataFrame(pd.concat(segment_frames, ignore_index=True), crs="EPSG:4326")
    return PipeTables(nodes, segments, node_offset, segment_offset)
