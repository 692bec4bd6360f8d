"""Incidents injected into the readings, with their ground truth, plus decoy noise spikes.

Each incident starts at one pipe segment and shows at sensors linked to it through the pipe
graph, not merely nearby:

- ``blockage`` (drainage): water backs up, so levels rise at gauges on manholes upstream of
  the blocked pipe (less the further up), and flow falls at meters on it and just below it;
- ``leak`` (water): pressure falls at gauges on the connected mains around the burst;
- ``gas_buildup`` (gas): methane rises at detectors on the connected pipes around the source.

An incident lasts one to four hours, ramps up over a quarter of an hour and wobbles, and
shifts values by many times both the noise and the daily swing, so a median/MAD baseline
finds it. Zones are kept apart so no two incidents touch. Single-reading spikes at other
sensors are decoys that a detector should not report.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_samples.geodesy import to_local
from data_samples.pipes import PipeNetwork
from data_samples.sensors import Sensors

log = logging.getLogger(__name__)

INCIDENTS = (("blockage", "drainage"), ("leak", "water"), ("gas_buildup", "gas"))
# How far through the pipe graph an incident reaches (segments), and how many sensors it
# may show at, per kind of sensor.
REACH_HOPS = {"blockage": 12, "leak": 6, "gas_buildup": 4}
MAX_SENSORS = {"level": 5, "flow": 2, "pressure": 6, "gas": 6}
DOWNSTREAM_FLOW_SEGMENTS = 3
MIN_SENSORS, MAX_AFFECTED = 2, 8
# No sensor or source of one incident within this distance of another incident's.
ZONE_GAP_M = 800.0
MAX_TRIES = 2_000
RAMP_MINUTES = 15
DURATION_HOURS = (1.0, 4.0)
SPIKES_PER_INCIDENT = 2


@dataclass
class Incident:
    kind: str
    network: str
    source_segment: int  # index in its network
    segments: list[int]
    sensors: list[int]  # sensor indices
    weights: list[float]  # strength at each sensor, 1 at the source
    severity: int = 0
    start_step: int = 0
    steps: int = 0
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


class PipeGraph:
    """Adjacency of one network: which segments leave and enter each node."""

    def __init__(self, net: PipeNetwork):
        self.net = net
        self.outgoing: list[list[int]] = [[] for _ in range(net.lon.size)]
        self.incoming: list[list[int]] = [[] for _ in range(net.lon.size)]
        for s, (a, b) in enumerate(zip(net.seg_from, net.seg_to, strict=True)):
            self.outgoing[a].append(s)
            self.incoming[b].append(s)

    def search(self, starts: list[int], direction: str, max_hops: int) -> dict[int, tuple]:
        """Breadth-first search: node -> (hops, segment it was reached by, previous node)."""
        found = {node: (0, -1, -1) for node in starts}
        queue = deque(starts)
        while queue:
            node = queue.popleft()
            hops = found[node][0]
            if hops == max_hops:
                continue
            steps = []
            if direction in ("up", "both"):
                steps += [(s, int(self.net.seg_from[s])) for s in self.incoming[node]]
            if direction in ("down", "both"):
                steps += [(s, int(self.net.seg_to[s])) for s in self.outgoing[node]]
            for segment, other in steps:
                if other not in found:
                    found[other] = (hops + 1, segment, node)
                    queue.append(other)
        return found


def _path_segments(found: dict[int, tuple], node: int) -> list[int]:
    segments = []
    while found[node][1] >= 0:
        segments.append(found[node][1])
        node = found[node][2]
    return segments


class SensorIndex:
    """Sensors by (network, node) and (network, segment)."""

    def __init__(self, sensors: Sensors):
        self.sensors = sensors
        self.on_node: dict[tuple[str, int], list[int]] = {}
        self.on_segment: dict[tuple[str, int], list[int]] = {}
        for k in range(len(sensors)):
            if sensors.node[k] >= 0:
                self.on_node.setdefault((sensors.network[k], int(sensors.node[k])), []).append(k)
            else:
                key = (sensors.network[k], int(sensors.segment[k]))
                self.on_segment.setdefault(key, []).append(k)

    def at_nodes(self, network: str, found: dict[int, tuple], kind: str) -> list[tuple]:
        """(hops, sensor, node) for sensors of ``kind`` on the found nodes, nearest first."""
        hits = [(found[node][0], k, node) for node in found
                for k in self.on_node.get((network, node), []) if self.sensors.kind[k] == kind]
        return sorted(hits)[: MAX_SENSORS[kind]]


def _blockage(graph: PipeGraph, index: SensorIndex, segment: int) -> Incident | None:
    net = graph.net
    upstream = graph.search([int(net.seg_from[segment])], "up", REACH_HOPS["blockage"])
    levels = index.at_nodes("drainage", upstream, "level")
    # The blocked pipe and the next few below it, following the flow.
    below, node = [segment], int(net.seg_to[segment])
    while len(below) < DOWNSTREAM_FLOW_SEGMENTS and graph.outgoing[node]:
        below.append(graph.outgoing[node][0])
        node = int(net.seg_to[below[-1]])
    flows = [(hops, k) for hops, s in enumerate(below)
             for k in index.on_segment.get(("drainage", s), [])][: MAX_SENSORS["flow"]]
    if not levels or len(levels) + len(flows) < MIN_SENSORS:
        return None
    segments = {segment}
    for _, _, node in levels:
        segments.update(_path_segments(upstream, node))
    if flows:
        segments.update(below[: max(hops for hops, _ in flows) + 1])
    return Incident(
        "blockage", "drainage", segment, sorted(segments),
        [k for _, k, _ in levels] + [k for _, k in flows],
        [max(0.5, 1.0 / (1.0 + 0.1 * hops)) for hops, _, _ in levels]
        + [1.0 if hops == 0 else 0.9 for hops, _ in flows],
    )


def _spreading(kind: str, network: str, sensor_kind: str, min_weight: float,
               graph: PipeGraph, index: SensorIndex, segment: int) -> Incident | None:
    """A leak or gas build-up: felt at sensors around the segment in both directions."""
    net = graph.net
    ends = [int(net.seg_from[segment]), int(net.seg_to[segment])]
    found = graph.search(ends, "both", REACH_HOPS[kind])
    hits = index.at_nodes(network, found, sensor_kind)
    if len(hits) < MIN_SENSORS:
        return None
    segments = {segment}
    for _, _, node in hits:
        segments.update(_path_segments(found, node))
    return Incident(kind, network, segment, sorted(segments), [k for _, k, _ in hits],
                    [max(min_weight, 1.0 / (1.0 + 0.2 * hops)) for hops, _, _ in hits])


def _zone(kind: str, graph: PipeGraph, index: SensorIndex, segment: int) -> Incident | None:
    if kind == "blockage":
        return _blockage(graph, index, segment)
    if kind == "leak":
        return _spreading("leak", "water", "pressure", 0.7, graph, index, segment)
    return _spreading("gas_buildup", "gas", "gas", 0.5, graph, index, segment)


def find_incidents(networks: dict[str, PipeNetwork], sensors: Sensors, count: int,
                   rng: np.random.Generator) -> list[Incident]:
    """Up to ``count`` incidents, taking the kinds in turn, with zones that do not touch."""
    index = SensorIndex(sensors)
    graphs = {name: PipeGraph(net) for name, net in networks.items()}
    sx, sy = to_local(sensors.lon, sensors.lat)
    candidates = {name: iter(rng.permutation(net.seg_from.size)) for name, net in networks.items()}
    taken: list[Incident] = []
    used_sensors: set[int] = set()
    taken_points = np.zeros((0, 2))
    for n in range(count):
        kind, network = INCIDENTS[n % len(INCIDENTS)]
        net = networks[network]
        for segment in itertools.islice(candidates[network], MAX_TRIES):
            incident = _zone(kind, graphs[network], index, int(segment))
            if incident is None or used_sensors.intersection(incident.sensors):
                continue
            mid_lon = (net.lon[net.seg_from[incident.source_segment]]
                       + net.lon[net.seg_to[incident.source_segment]]) / 2
            mid_lat = (net.lat[net.seg_from[incident.source_segment]]
                       + net.lat[net.seg_to[incident.source_segment]]) / 2
            mx, my = to_local(mid_lon, mid_lat)
            points = np.vstack([[float(mx), float(my)],
                                np.column_stack([sx[incident.sensors], sy[incident.sensors]])])
            if taken_points.size:
                gaps = np.hypot(points[:, None, 0] - taken_points[None, :, 0],
                                points[:, None, 1] - taken_points[None, :, 1])
                if gaps.min() < ZONE_GAP_M:
                    continue
            incident.points = points
            taken.append(incident)
            used_sensors.update(incident.sensors)
            taken_points = np.vstack([taken_points, points])
            break
        else:
            log.warning("no room for another %s incident; %d placed", kind, len(taken))
    return taken


def _profile(steps: int, ramp_steps: int, growing: bool, rng: np.random.Generator) -> np.ndarray:
    """Strength over an incident's readings: a ramp, a wobble, and growth for gas."""
    k = np.arange(steps)
    ramp = np.minimum(1.0, (k + 1) / ramp_steps)
    wobble = 1.0 + 0.1 * np.sin(2 * np.pi * rng.uniform(1.0, 3.0) * k / steps
                                + rng.uniform(0, 2 * np.pi))
    growth = 0.6 + 0.4 * k / max(steps - 1, 1) if growing else 1.0
    return ramp * wobble * growth


def inject_incidents(values: np.ndarray, sensors: Sensors, incidents: list[Incident],
                     step_min: int, rng: np.random.Generator) -> None:
    """Shift the readings of every incident's sensors over its time window (in place)."""
    n_steps = values.shape[1]
    per_hour = 60 // step_min
    for incident in incidents:
        incident.severity = int(rng.integers(1, 4))
        low, high = (int(h * per_hour) for h in DURATION_HOURS)
        incident.steps = int(rng.integers(low, min(high, n_steps - 2 * per_hour) + 1))
        incident.start_step = int(rng.integers(per_hour // 2,
                                               n_steps - incident.steps - per_hour // 2))
        window = slice(incident.start_step, incident.start_step + incident.steps)
        profile = _profile(incident.steps, max(1, RAMP_MINUTES // step_min),
                           incident.kind == "gas_buildup", rng)
        grade = incident.severity - 1
        for k, weight in zip(incident.sensors, incident.weights, strict=True):
            base = sensors.baseline[k]
            strength = weight * profile
            kind = sensors.kind[k]
            if kind == "level":
                # Backed-up water: several times the usual depth in the manhole.
                values[k, window] += base * (2.5 + grade + rng.uniform(0, 0.5)) * strength
            elif kind == "flow":
                cut = min(0.95, (0.82 + 0.05 * grade) * weight)
                values[k, window] *= 1.0 - cut * np.minimum(profile, 1.0)
            elif kind == "pressure":
                values[k, window] -= (0.09 + 0.03 * grade) * strength
            else:
                values[k, window] += (60.0, 150.0, 400.0)[grade] * strength


def inject_spikes(values: np.ndarray, sensors: Sensors, incidents: list[Incident],
                  rng: np.random.Generator) -> list[tuple[int, int]]:
    """Single-reading spikes at sensors no incident touches: (sensor, step) pairs."""
    busy = np.zeros(len(sensors), bool)
    for incident in incidents:
        busy[incident.sensors] = True
    free = np.flatnonzero(~busy)
    count = min(free.size, SPIKES_PER_INCIDENT * max(len(incidents), 1))
    chosen = np.sort(rng.choice(free, size=count, replace=False))
    steps = rng.integers(1, values.shape[1] - 1, size=count)
    for k, step in zip(chosen, steps, strict=True):
        base = sensors.baseline[k]
        kind = sensors.kind[k]
        if kind == "level":
            values[k, step] += base * rng.uniform(1.5, 3.0)
        elif kind == "flow":
            values[k, step] *= rng.choice([rng.uniform(0.1, 0.3), rng.uniform(1.8, 2.5)])
        elif kind == "pressure":
            values[k, step] -= rng.uniform(0.08, 0.15)
        else:
            values[k, step] += rng.uniform(30.0, 150.0)
    return [(int(k), int(step)) for k, step in zip(chosen, steps, strict=True)]


def truth(incidents: list[Incident], spikes: list[tuple[int, int]], times: pd.DatetimeIndex,
          segment_offset: dict[str, int]) -> dict:
    """The ground truth file's content; ids are table ids, times ISO 8601 with offset."""
    step = times[1] - times[0]
    records = []
    for n, incident in enumerate(incidents, start=1):
        offset = segment_offset[incident.network]
        start = times[incident.start_step]
        records.append({
            "id": n,
            "kind": incident.kind,
            "network": incident.network,
            "source_segment_id": offset + incident.source_segment + 1,
            "affected_segment_ids": [offset + s + 1 for s in incident.segments],
            "affected_sensor_ids": sorted(k + 1 for k in incident.sensors),
            # Readings at start <= ts < end are affected.
            "start": start.isoformat(),
            "end": (start + incident.steps * step).isoformat(),
            "severity": incident.severity,
        })
    return {
        "anomalies": records,
        "noise_spikes": [{"sensor_id": k + 1, "ts": times[step_index].isoformat()}
                         for k, step_index in spikes],
    }
