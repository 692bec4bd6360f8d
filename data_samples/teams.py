"""Response teams, the streets they answer for, and the supply depots with their stock.

Teams and depots stand where people live: each is placed in a grid cell of its district drawn
with weight rising faster than the grid's population, so they cluster in the built-up areas.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from data_samples.admin import CENSUS_2020, Hierarchy, apportion
from data_samples.partition import KM_PER_DEG_LAT, KM_PER_DEG_LON, points_inside, rank_within
from data_samples.scales import CENTRAL_DISTRICTS
from twin.core.models import TEAM_TYPES

# Per team type: code letters, Chinese and English station names, headcount range.
TEAM_KINDS = {
    "fire": ("FR", "消防救援站", "Fire and Rescue Station", (15, 40)),
    "medical": ("MD", "急救站", "Emergency Medical Station", (6, 20)),
    "police": ("PL", "派出所", "Police Station", (12, 45)),
    "rescue": ("RS", "应急救援队", "Emergency Rescue Team", (10, 50)),
    "utility_repair": ("UR", "市政抢修队", "Utility Repair Crew", (8, 25)),
}
# Beyond the first one of each type, extra teams are drawn with these odds.
EXTRA_TEAM_ODDS = {
    "fire": 0.3,
    "medical": 0.2,
    "police": 0.2,
    "rescue": 0.15,
    "utility_repair": 0.15,
}
TEAM_STATUS = (("standby", 0.82), ("dispatched", 0.12), ("off_duty", 0.06))
# Teams in the nine central districts count for more when sharing teams out.
CENTRAL_TEAM_WEIGHT = 1.5

# Stock a depot may hold: (item code, Chinese name, unit, quantity range).
SUPPLY_ITEMS = (
    ("TENT", "帐篷", "顶", (50, 800)),
    ("LIFE_JACKET", "救生衣", "件", (100, 2000)),
    ("SANDBAG", "沙袋", "个", (2000, 50000)),
    ("GENERATOR", "发电机", "台", (2, 40)),
    ("WATER_PUMP", "抽水泵", "台", (5, 60)),
    ("DRINKING_WATER", "饮用水", "箱", (200, 5000)),
    ("INSTANT_FOOD", "方便食品", "箱", (200, 5000)),
    ("FIRST_AID_KIT", "急救包", "个", (100, 2000)),
    ("FOLDING_BED", "折叠床", "张", (50, 1000)),
    ("QUILT", "棉被", "床", (100, 3000)),
    ("RAINCOAT", "雨衣", "件", (100, 3000)),
    ("ASSAULT_BOAT", "冲锋舟", "艘", (1, 12)),
    ("FLASHLIGHT", "强光手电", "个", (50, 1000)),
    ("CHAINSAW", "油锯", "台", (2, 30)),
    ("FIRE_EXTINGUISHER", "灭火器", "具", (50, 1500)),
)
ITEMS_PER_DEPOT = (5, 12)

# A unit's name without its 街道/镇 suffix, for naming stations after the place.
_STREET_SUFFIX = {"street": ("街道", " Subdistrict"), "town": ("镇", " Town")}


def _district_short_en(name_en: str) -> str:
    """'Yuzhong District' -> 'Yuzhong', 'Shizhu Tujia Autonomous County' -> 'Shizhu'."""
    return name_en.split(" ")[0]


def _street_place_names(hierarchy: Hierarchy) -> tuple[np.ndarray, np.ndarray]:
    streets = hierarchy.streets
    zh, en = [], []
    for name_zh, name_en, kind in zip(streets.name_zh, streets.name_en, streets.kind, strict=True):
        suffix_zh, suffix_en = _STREET_SUFFIX[kind]
        zh.append(name_zh.removesuffix(suffix_zh))
        en.append(name_en.removesuffix(suffix_en))
    return np.array(zh, dtype=object), np.array(en, dtype=object)


def _per_district(hierarchy: Hierarchy, total: int, central_weight: float) -> np.ndarray:
    """Share ``total`` among the districts by people (central ones weighted up); every district
    gets one when there are enough to go round."""
    districts = hierarchy.districts
    central = np.isin(districts.code.astype(str), CENTRAL_DISTRICTS)
    weights = np.array([CENSUS_2020[code] for code in districts.code])
    weights = weights * np.where(central, central_weight, 1.0)
    minimum = 2 if total >= 2 * len(districts) else (1 if total >= len(districts) else 0)
    return apportion(weights, total, minimum)


def _sites(
    hierarchy: Hierarchy, district: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A grid for each entry of ``district`` (weighted by population squared, so sites gather in
    the dense parts), and a point inside it. Returns (grid index, (n, 2) points)."""
    grids = hierarchy.grids
    grid_district = grids.district
    chosen = np.empty(len(district), dtype=np.int64)
    for d in np.unique(district):
        members = np.flatnonzero(grid_district == d)
        weight = grids.population[members].astype(float) ** 2
        slots = np.flatnonzero(district == d)
        chosen[slots] = rng.choice(
            members, size=slots.size, replace=False, p=weight / weight.sum()
        )
    _, x, y = points_inside(grids.geom[chosen], np.ones(len(chosen), dtype=np.int64), rng)
    return chosen, np.column_stack([x, y])


def _ordinal_names(
    base_zh: list[str], base_en: list[str], mark_zh: str, mark_en: str
) -> tuple[list[str], list[str]]:
    """Make repeated names distinct. Names carry a '|' where a number goes if the same name came
    before: with mark_zh '第{n}', the second 解放碑|消防救援站 becomes 解放碑第2消防救援站."""
    seen: dict[str, int] = {}
    zh, en = [], []
    for name_zh, name_en in zip(base_zh, base_en, strict=True):
        seen[name_zh] = seen.get(name_zh, 0) + 1
        count = seen[name_zh]
        zh.append(name_zh.replace("|", mark_zh.format(n=count) if count > 1 else ""))
        en.append(name_en.replace("|", mark_en.format(n=count) if count > 1 else ""))
    return zh, en


def response_teams_frame(
    hierarchy: Hierarchy, total: int, rng: np.random.Generator
) -> gpd.GeoDataFrame:
    districts, communities, grids = hierarchy.districts, hierarchy.communities, hierarchy.grids
    counts = _per_district(hierarchy, total, CENTRAL_TEAM_WEIGHT)
    district = np.repeat(np.arange(len(districts)), counts)
    # Every district first gets one team of each type in order (fire, medical, ...), then extras.
    rank = np.arange(len(district)) - np.repeat(np.cumsum(counts) - counts, counts)
    extra = rng.choice(
        list(EXTRA_TEAM_ODDS), size=len(district), p=list(EXTRA_TEAM_ODDS.values())
    )
    first_of_type = np.array(TEAM_TYPES)[np.minimum(rank, len(TEAM_TYPES) - 1)]
    team_type = np.where(rank < len(TEAM_TYPES), first_of_type, extra).astype(object)
    order = np.lexsort((rank, [TEAM_TYPES.index(t) for t in team_type], district))
    district, team_type = district[order], team_type[order]

    grid, points = _sites(hierarchy, district, rng)
    street = communities.parent[grids.parent[grid]]
    place_zh, place_en = _street_place_names(hierarchy)
    base_zh, base_en = [], []
    for d, s, t in zip(district, street, team_type, strict=True):
        _, station_zh, station_en, _ = TEAM_KINDS[t]
        base_zh.append(f"{districts.name_zh[d]}{place_zh[s]}|{station_zh}")
        base_en.append(
            f"{place_en[s]} {station_en}|, {_district_short_en(districts.name_en[d])}"
        )
    name_zh, name_en = _ordinal_names(base_zh, base_en, "第{n}", " {n}")
    # Number teams of one type within their district: TM-500103-FR01.
    type_index = np.array([TEAM_TYPES.index(t) for t in team_type])
    type_serial = rank_within(district * len(TEAM_TYPES) + type_index) + 1
    low = np.array([TEAM_KINDS[t][3][0] for t in team_type])
    high = np.array([TEAM_KINDS[t][3][1] for t in team_type])
    statuses, odds = zip(*TEAM_STATUS, strict=True)
    phones = rng.choice(10_000_000, size=len(district), replace=False)
    ids = np.arange(1, len(district) + 1)
    frame = pd.DataFrame(
        {
            "id": ids,
            "code": [
                f"TM-{districts.code[d]}-{TEAM_KINDS[t][0]}{n:02d}"
                for d, t, n in zip(district, team_type, type_serial, strict=True)
            ],
            "name_zh": name_zh,
            "name_en": name_en,
            "team_type": team_type.astype(object),
            "headcount": rng.integers(low, high + 1).astype(np.int64),
            "status": rng.choice(statuses, size=len(district), p=odds).astype(object),
            "phone": [f"023-6{p:07d}" for p in phones],
            "district_code": districts.code[district],
        }
    )
    return gpd.GeoDataFrame(frame, geometry=shapely.points(points), crs="EPSG:4326")


def team_jurisdictions_frame(teams: gpd.GeoDataFrame, hierarchy: Hierarchy) -> pd.DataFrame:
    """Every street answers to its nearest fire station (in any district, so every street is
    covered) and to the nearest team of each other type in its own district."""
    streets = hierarchy.streets
    street_xy = streets.anchor * [KM_PER_DEG_LON, KM_PER_DEG_LAT]
    team_xy = shapely.get_coordinates(teams.geometry.values) * [KM_PER_DEG_LON, KM_PER_DEG_LAT]
    team_type = teams["team_type"].to_numpy()
    team_district = teams["district_code"].to_numpy()
    street_district = np.array([code[:6] for code in streets.code])
    pairs = []
    for kind in TEAM_TYPES:
        of_kind = np.flatnonzero(team_type == kind)
        if of_kind.size == 0:
            continue
        distance = np.linalg.norm(street_xy[:, None, :] - team_xy[None, of_kind, :], axis=2)
        if kind != "fire":
            distance[street_district[:, None] != team_district[None, of_kind]] = np.inf
        nearest = of_kind[np.argmin(distance, axis=1)]
        covered = np.isfinite(distance.min(axis=1))
        pairs.append(
            pd.DataFrame(
                {
                    "team_id": teams["id"].to_numpy()[nearest[covered]],
                    "admin_code": streets.code[covered],
                }
            )
        )
    table = pd.concat(pairs, ignore_index=True).drop_duplicates()
    return table.sort_values(["team_id", "admin_code"], kind="stable").reset_index(drop=True)


def supply_depots_frame(
    hierarchy: Hierarchy, total: int, rng: np.random.Generator
) -> gpd.GeoDataFrame:
    districts, grids, communities = hierarchy.districts, hierarchy.grids, hierarchy.communities
    counts = _per_district(hierarchy, total, 1.0)
    district = np.repeat(np.arange(len(districts)), counts)
    grid, points = _sites(hierarchy, district, rng)
    street = communities.parent[grids.parent[grid]]
    place_zh, place_en = _street_place_names(hierarchy)
    sites = list(zip(district, street, strict=True))
    base_zh = [f"{districts.name_zh[d]}应急物资储备库（{place_zh[s]}|）" for d, s in sites]
    base_en = [
        f"{districts.name_en[d]} Emergency Supplies Depot ({place_en[s]}|)"
        for d, s in sites
    ]
    name_zh, name_en = _ordinal_names(base_zh, base_en, "{n}号库", " {n}")
    serial = np.arange(len(district)) - np.repeat(np.cumsum(counts) - counts, counts) + 1
    ids = np.arange(1, len(district) + 1)
    frame = pd.DataFrame(
        {
            "id": ids,
            "code": [
                f"DP-{districts.code[d]}-{n:02d}" for d, n in zip(district, serial, strict=True)
            ],
            "name_zh": name_zh,
            "name_en": name_en,
            "district_code": districts.code[district],
        }
    )
    return gpd.GeoDataFrame(frame, geometry=shapely.points(points), crs="EPSG:4326")


def depot_stock_frame(depots: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Each depot holds 5-12 kinds of supplies, in amounts scaled by the depot's size."""
    rows = []
    for depot_id in depots["id"]:
        size = rng.uniform(0.4, 1.6)
        count = rng.integers(ITEMS_PER_DEPOT[0], ITEMS_PER_DEPOT[1] + 1)
        for item in np.sort(rng.choice(len(SUPPLY_ITEMS), size=count, replace=False)):
            code, name_zh, unit, (low, high) = SUPPLY_ITEMS[item]
            quantity = int(round(rng.uniform(low, high) * size))
            rows.append((int(depot_id), code, name_zh, unit, max(quantity, 1)))
    return pd.DataFrame(rows, columns=["depot_id", "item_code", "item_name_zh", "unit", "quantity"])
