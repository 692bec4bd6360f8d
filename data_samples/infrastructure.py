"""The infrastructure part of the sample city: terrain, roads, pipes, sensors, buildings.

``build_infrastructure`` writes the two DEM GeoTIFFs into the output directory and returns
the tables (GeoDataFrames in EPSG:4326 where the model has a ``geom``) plus the ground truth
of the anomalies injected into the sensor readings. Each part draws from its own generator,
derived from the seed, so changing one part does not reshuffle the others.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import geopandas as gpd
import numpy as np

from data_samples.anomalies import find_incidents, inject_incidents, inject_spikes, truth
from data_samples.buildings import build_buildings
from data_samples.hazards import build_hazards
from data_samples.pipes import build_drainage, build_pressurised, pipe_tables
from data_samples.roads import build_roads
from data_samples.scales import CENTRAL_DISTRICTS, Scale
from data_samples.sensors import (
    baseline_readings,
    finish_readings,
    place_sensors,
    reading_times,
    readings_table,
    sensor_table,
)
from data_samples.terrain import build_terrain

log = logging.getLogger(__name__)

STREAM = 2  # this part's stream of the sample seed; the city part uses its own
PARTS = ("roads", "drainage", "water", "gas", "sensors", "readings", "anomalies", "hazards",
         "buildings")


def _generators(seed: int) -> dict[str, np.random.Generator]:
    return {part: np.random.default_rng([seed, STREAM, k]) for k, part in enumerate(PARTS)}


def build_infrastructure(districts: gpd.GeoDataFrame, scale: Scale, seed: int,
                         out_dir: Path) -> dict:
    """Build every infrastructure table; write ``dem_*.tif`` into ``out_dir``."""
    started = time.perf_counter()
    rng = _generators(seed)
    municipality = districts[districts["kind"] == "municipality"].geometry
    central = districts[districts["adcode"].isin(CENTRAL_DISTRICTS)]
    terrain = build_terrain(municipality, tuple(central.total_bounds), scale.dem_cell_deg,
                            scale.dem_central_cell_deg, Path(out_dir))

    road = build_roads(districts, CENTRAL_DISTRICTS, scale.road_spacing_m, terrain,
                       rng["roads"])
    networks = {
        "drainage": build_drainage(road, terrain, scale.drainage_km, rng["drainage"]),
        "water": build_pressurised("water", road, terrain, scale.water_km, rng["water"]),
        "gas": build_pressurised("gas", road, terrain, scale.gas_km, rng["gas"]),
    }
    pipes = pipe_tables(list(networks.values()))

    sensors = place_sensors(networks, scale.sensors, rng["sensors"])
    times = reading_times(scale.reading_hours, scale.reading_step_min)
    values = baseline_readings(sensors, times, rng["readings"])
    incidents = find_incidents(networks, sensors, scale.anomalies, rng["anomalies"])
    inject_incidents(values, sensors, incidents, scale.reading_step_min, rng["anomalies"])
    spikes = inject_spikes(values, sensors, incidents, rng["anomalies"])
    values = finish_readings(sensors, values)

    hazards = build_hazards(networks["drainage"], scale.hazard_sources, rng["hazards"])
    hazards["node_id"] += pipes.node_offset["drainage"]
    road_nodes, road_edges = road.tables()
    tables = {
        "road_nodes": road_nodes,
        "road_edges": road_edges,
        "pipe_nodes": pipes.nodes,
        "pipe_segments": pipes.segments,
        "sensors": sensor_table(sensors, pipes.node_offset, pipes.segment_offset),
        "sensor_readings": readings_table(values, times),
        "hazard_sources": hazards,
        "buildings": build_buildings(road, terrain, districts, scale.buildings,
                                     rng["buildings"]),
        "anomalies": truth(incidents, spikes, times, pipes.segment_offset),
    }
    log.info("infrastructure (%s) built in %.1fs: %s", scale.name,
             time.perf_counter() - started,
             ", ".join(f"{k} {len(v)}" for k, v in tables.items() if k != "anomalies"))
    return tables
