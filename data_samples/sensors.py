"""Sensors on the pipe networks and a day of their readings.

Drainage manholes carry level gauges and drainage pipes flow meters; water nodes carry
pressure gauges and gas nodes methane detectors. Readings follow a per-sensor baseline times a
diurnal pattern (morning and evening peaks of use; pressure dips when demand peaks) plus small
noise, every ``scale.reading_step_min`` minutes from a fixed start.
"""

from __future__ import annotations

from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from data_samples.pipes import PipeNetwork

READINGS_START = pd.Timestamp("2026-11-20T00:00:00+08:00")

@dataclass(frozen=True)
class SensorKind:
    network: str
    share: float  # of all sensors
    unit: str
    code_prefix: str
    # The physically possible range (the instrument's), not the usual one.
    low: float
    high: float


SENSOR_KINDS = {
    "level": SensorKind("drainage", 0.38, "m", "S-DL", 0.0, 10.0),
    "flow": SensorKind("drainage", 0.22, "m3/s", "S-DF", 0.0, 20.0),
    "pressure": SensorKind("water", 0.22, "MPa", "S-WP", 0.0, 1.6),
    "gas": SensorKind("gas", 0.18, "ppm", "S-GC", 0.0, 50_000.0),
}
# Decimal places readings are kept to: a millimetre, a litre per second, 100 Pa, 0.01 ppm.
DECIMALS = {"level": 3, "flow": 4, "pressure": 4, "gas": 2}


@dataclass
class Sensors:
    """Sensors as parallel arrays; sensor id = index + 1."""

    kind: np.ndarray
    network: np.ndarray
    # Index in its network's node or segment arrays (-1 for the other one).
    node: np.ndarray
    segment: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    baseline: np.ndarray
    noise_sd: np.ndarray

    def __len__(self) -> int:
        return self.kind.size


def _apportion(total: int, shares: list[float], capacity: list[int]) -> list[int]:
    """Split ``total`` by ``shares`` (largest remainders), never above each capacity."""
    raw = np.array(shares) / sum(shares) * total
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[k] += 1
    return [int(min(c, cap)) for c, cap in zip(counts, capacity, strict=True)]


def place_sensors(networks: dict[str, PipeNetwork], total: int,
                  rng: np.random.Generator) -> Sensors:
    """Choose sensor sites at random among the eligible nodes and segments."""
    sites = {}
    for kind, spec in SENSOR_KINDS.items():
        net = networks[spec.network]
        if kind == "flow":
            sites[kind] = np.arange(net.seg_from.size)
        else:
            # Outfalls, plants and gate stations are watched by other systems.
            sites[kind] = np.flatnonzero(~np.isin(net.kind, ("outfall", "source")))
    counts = _apportion(total, [spec.share for spec in SENSOR_KINDS.values()],
                        [sites[k].size for k in SENSOR_KINDS])
    parts = []
    for (kind, spec), count in zip(SENSOR_KINDS.items(), counts, strict=True):
        net = networks[spec.network]
        chosen = np.sort(rng.choice(sites[kind], size=count, replace=False))
        if kind == "flow":
            node, segment = np.full(count, -1), chosen
            lon = (net.lon[net.seg_from[chosen]] + net.lon[net.seg_to[chosen]]) / 2
            lat = (net.lat[net.seg_from[chosen]] + net.lat[net.seg_to[chosen]]) / 2
        else:
            node, segment = chosen, np.full(count, -1)
            lon, lat = net.lon[chosen], net.lat[chosen]
        baseline, noise_sd = _baselines(kind, net, chosen, rng)
        parts.append((np.full(count, kind), np.full(count, spec.network), node, segment, lon, lat,
                      baseline, noise_sd))
    columns = [np.concatenate(c) for c in zip(*parts, strict=True)]
    return Sensors(columns[0].astype(object), columns[1].astype(object),
                   *(c.astype(np.int64) for c in columns[2:4]), *columns[4:])


def _baselines(kind: str, net: PipeNetwork, chosen: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each sensor's typical value and noise standard deviation."""
    n = chosen.size
    if kind == "level":
        baseline = rng.uniform(0.15, 0.8, n)
        return baseline, 0.012 * baseline + 0.003
    if kind == "flow":
        diameter_m = net.diameter_mm[chosen] / 1000.0
        baseline = 0.15 * diameter_m**2.5 * rng.uniform(0.6, 1.4, n)
        return baseline, 0.025 * baseline
    if kind == "pressure":
        # Lower pressure on higher ground, within the usual 0.28-0.45 MPa of city mains.
        relief = (net.ground_mm[chosen] - net.ground_mm.min()) / 1000.0
        baseline = np.clip(0.45 - 0.0006 * relief + rng.normal(0, 0.02, n), 0.25, 0.5)
        return baseline, np.full(n, 0.003)
    baseline = rng.uniform(2.0, 12.0, n)
    return baseline, 0.04 * baseline + 0.15


def reading_times(hours: int, step_min: int) -> pd.DatetimeIndex:
    return pd.date_range(READINGS_START, periods=hours * 60 // step_min, freq=f"{step_min}min")


def _peak(hour: np.ndarray, centre: float, width: float) -> np.ndarray:
    # Wrap around midnight so the pattern is periodic.
    delta = (hour - centre + 12.0) % 24.0 - 12.0
    return np.exp(-((delta / width) ** 2))


def _diurnal(kind: str, hour: np.ndarray) -> np.ndarray:
    """A daily pattern scaled to [-1, 1] (-1 in the small hours for use-driven kinds)."""
    if kind == "gas":
        # Methane from sewers and soil rises with the afternoon warmth.
        shape = _peak(hour, 15.0, 4.0)
    else:
        shape = _peak(hour, 8.0, 1.8) + 0.8 * _peak(hour, 20.0, 2.2) + 0.3 * _peak(hour, 12.5, 2.0)
    low, high = shape.min(), shape.max()
    return 2.0 * (shape - low) / (high - low) - 1.0


# Amplitude of the daily swing relative to the baseline (pressure falls as demand rises).
DIURNAL_AMPLITUDE = {"level": 0.2, "flow": 0.12, "pressure": -0.025, "gas": 0.08}


def baseline_readings(sensors: Sensors, times: pd.DatetimeIndex,
                      rng: np.random.Generator) -> np.ndarray:
    """Readings without incidents: (sensors, times) array."""
    hours = np.asarray((times - times[0]).total_seconds() / 3600.0)
    values = np.empty((len(sensors), hours.size))
    # Each sensor's day runs a little early or late (catchment size, district habits).
    shift = rng.normal(0.0, 0.4, len(sensors))
    noise = rng.standard_normal((len(sensors), hours.size))
    for kind in SENSOR_KINDS:
        rows = np.flatnonzero(sensors.kind == kind)
        pattern = _diurnal(kind, (hours[None, :] - shift[rows, None]) % 24.0)
        values[rows] = sensors.baseline[rows, None] * (1.0 + DIURNAL_AMPLITUDE[kind] * pattern)
    return values + noise * sensors.noise_sd[:, None]


def finish_readings(sensors: Sensors, values: np.ndarray) -> np.ndarray:
    """Clip to each sensor's physical range and round to its resolution."""
    out = np.empty_like(values)
    for kind, spec in SENSOR_KINDS.items():
        rows = sensors.kind == kind
        out[rows] = np.round(np.clip(values[rows], spec.low, spec.high), DECIMALS[kind])
    return out


def sensor_table(sensors: Sensors, node_offset: dict[str, int],
                 segment_offset: dict[str, int]) -> gpd.GeoDataFrame:
    n = len(sensors)
    codes = np.empty(n, dtype=object)
    node_id = pd.array([None] * n, dtype="Int64")
    segment_id = pd.array([None] * n, dtype="Int64")
    unit = np.empty(n, dtype=object)
    low = np.empty(n)
    high = np.empty(n)
    for kind, spec in SENSOR_KINDS.items():
        rows = np.flatnonzero(sensors.kind == kind)
        codes[rows] = [f"{spec.code_prefix}-{k:05d}" for k in range(1, rows.size + 1)]
        unit[rows] = spec.unit
        low[rows], high[rows] = spec.low, spec.high
        if kind == "flow":
            segment_id[rows] = segment_offset[spec.network] + sensors.segment[rows] + 1
        else:
            node_id[rows] = node_offset[spec.network] + sensors.node[rows] + 1
    return gpd.GeoDataFrame({
        "id": np.arange(1, n + 1, dtype=np.int64),
        "code": codes,
        "network": sensors.network,
        "kind": sensors.kind,
        "unit": unit,
        "node_id": node_id,
        "segment_id": segment_id,
        "min_value": low,
        "max_value": high,
    }, geometry=shapely.points(sensors.lon, sensors.lat), crs="EPSG:4326")


def readings_table(values: np.ndarray, times: pd.DatetimeIndex) -> pd.DataFrame:
    n_sensors, n_times = values.shape
    return pd.DataFrame({
        "sensor_id": np.repeat(np.arange(1, n_sensors + 1, dtype=np.int64), n_times),
        # Indexing keeps the timezone-aware dtype (np.tile would make Python objects).
        "ts": times[np.tile(np.arange(n_times), n_sensors)],
        "value": values.ravel(),
    })
