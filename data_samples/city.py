"""The city part of the sample: admin hierarchy, sectors, risk points, plans, teams, supplies.

``build_city`` returns one frame per table, columns exactly as in ``twin.core.models`` (without the
server-defaulted ``updated_at``); frames with geometry are GeoDataFrames in EPSG:4326. Each part
draws from its own generator seeded from (seed, 1, part), so the output is byte-identical for a
seed and changing one part leaves the others' draws alone.
"""

from __future__ import annotations

import logging
import time

import geopandas as gpd
import numpy as np
import pandas as pd

from data_samples import risk, teams
from data_samples.admin import admin_units_frame, build_hierarchy
from data_samples.scales import Scale

log = logging.getLogger("twin.samples.city")

# Sub-streams of np.random.default_rng([seed, 1, part]).
_ADMIN, _RISK, _PLANS, _TEAMS, _DEPOTS = range(1, 6)


def _rng(seed: int, part: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1, part])


def build_city(districts: gpd.GeoDataFrame, scale: Scale, seed: int) -> dict[str, pd.DataFrame]:
    """Generate the city tables for ``scale`` from the real district boundaries (WGS84)."""
    started = time.perf_counter()
    hierarchy = build_hierarchy(districts, scale, _rng(seed, _ADMIN))
    admin_units = admin_units_frame(hierarchy)
    log.info("admin units: %d in %.1fs", len(admin_units), time.perf_counter() - started)

    risk_points = risk.risk_points_frame(hierarchy, scale.risk_points, _rng(seed, _RISK))
    emergency_plans = risk.link_emergency_plans(risk_points, hierarchy, _rng(seed, _PLANS))
    response_teams = teams.response_teams_frame(hierarchy, scale.teams, _rng(seed, _TEAMS))
    depots_rng = _rng(seed, _DEPOTS)
    supply_depots = teams.supply_depots_frame(hierarchy, scale.depots, depots_rng)
    tables = {
        "sectors": risk.sectors_frame(),
        "admin_units": admin_units,
        "emergency_plans": emergency_plans,
        "risk_points": risk_points,
        "response_teams": response_teams,
        "team_jurisdictions": teams.team_jurisdictions_frame(response_teams, hierarchy),
        "supply_depots": supply_depots,
        "depot_stock": teams.depot_stock_frame(supply_depots, depots_rng),
    }
    log.info("city tables built in %.1fs", time.perf_counter() - started)
    return tables
