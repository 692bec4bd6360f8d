"""The administrative hierarchy: city, districts, streets/towns, communities/villages, grids.

The city and its 38 districts are real (the boundary file). Below them each level is generated
as an exact partition of the level above (see ``partition``). How many units of a level a
district gets follows its area and its census population (the nine central districts weighted
up); within a district, a settlement density surface (the old centre at Jiefangbei, the
metropolitan area, every district's seat) decides which parents get them and where the seeds
fall, so units are small and many where people live and large in the mountains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from data_samples import names
from data_samples.partition import (
    area_km2,
    as_multipolygons,
    distance_km,
    partition,
    points_inside,
    rank_within,
)
from data_samples.scales import CENTRAL_DISTRICTS, CITY_CENTRE, Scale

log = logging.getLogger("twin.samples.admin")

CITY_CODE = "500000"

# Approximate urban centres (county seats) of the districts, WGS84. A seat that falls outside
# its district (it should not) is replaced by a point on the district's surface.
DISTRICT_SEATS = {
    "500101": (108.40, 30.81), "500102": (107.39, 29.70), "500103": (106.57, 29.55),
    "500104": (106.48, 29.48), "500105": (106.57, 29.60), "500106": (106.45, 29.56),
    "500107": (106.51, 29.50), "500108": (106.56, 29.52), "500109": (106.40, 29.81),
    "500110": (106.65, 29.03), "500111": (105.72, 29.71), "500112": (106.63, 29.72),
    "500113": (106.52, 29.38), "500114": (108.77, 29.53), "500115": (107.08, 29.86),
    "500116": (106.26, 29.29), "500117": (106.28, 29.97), "500118": (105.93, 29.36),
    "500119": (107.10, 29.16), "500120": (106.23, 29.59), "500151": (106.06, 29.84),
    "500152": (105.84, 30.19), "500153": (105.59, 29.41), "500154": (108.39, 31.16),
    "500155": (107.80, 30.67), "500156": (107.76, 29.33), "500229": (108.66, 31.95),
    "500230": (107.73, 29.86), "500231": (107.33, 30.33), "500233": (108.04, 30.30),
    "500235": (108.70, 30.93), "500236": (109.46, 31.02), "500237": (109.88, 31.07),
    "500238": (109.63, 31.40), "500240": (108.11, 30.00), "500241": (108.99, 28.45),
    "500242": (108.77, 28.84), "500243": (108.17, 29.29),
}

# Resident population of the districts, 2020 census (第七次全国人口普查), in 10,000s (rounded;
# Qijiang includes Wansheng). Only used to share the units out among the districts.
CENSUS_2020 = {
    "500101": 156.4, "500102": 111.5, "500103": 58.9, "500104": 42.1, "500105": 92.6,
    "500106": 147.8, "500107": 152.7, "500108": 119.6, "500109": 83.5, "500110": 101.1,
    "500111": 83.5, "500112": 219.2, "500113": 117.9, "500114": 48.7, "500115": 69.3,
    "500116": 135.9, "500117": 124.5, "500118": 114.9, "500119": 57.2, "500120": 75.6,
    "500151": 68.5, "500152": 68.8, "500153": 66.9, "500154": 120.3, "500155": 64.6,
    "500156": 35.7, "500229": 19.7, "500230": 55.7, "500231": 64.3, "500233": 72.1,
    "500235": 92.9, "500236": 74.5, "500237": 46.3, "500238": 38.8, "500240": 38.9,
    "500241": 48.3, "500242": 60.7, "500243": 49.1,
}

# How many units of a level each district gets: a mix of its share of the area and of the people,
# with the people of the nine central districts counted extra. Finer levels follow people more,
# which puts about 25% of streets but 40% of grids in the central nine.
LEVEL_SHARES = {
    # level: (weight of the area share, multiplier for the central nine)
    "street": (0.5, 1.3),
    "community": (0.3, 1.45),
    "grid": (0.15, 1.75),
}

# Within a district, settlement density relative to its open countryside: a bump at the old
# centre (Jiefangbei) and a wider one over the metropolitan area around it, and a bump at every
# district's seat. Finer levels concentrate harder, so units shrink towards the centres.
LEVEL_DENSITY = {
    # level: (centre, metro, seat)
    "street": (20.0, 4.0, 6.0),
    "community": (40.0, 8.0, 12.0),
    "grid": (80.0, 16.0, 24.0),
}
CENTRE_KM = 3.0  # e-folding distances of the density bumps
METRO_KM = 12.0
SEAT_KM = 4.0

# How each level is placed: candidate seeds per child (more = the density shows more), Lloyd
# iterations and relaxation (more = rounder, more even cells).
SEED_POOL = 4
LLOYD_ITERATIONS = {"street": 4, "community": 3, "grid": 2}
LLOYD_RELAX = 0.6

# Streets (街道) rather than towns (镇): the built-up city near the core or a district seat.
STREET_NEAR_CORE_KM = 20.0
STREET_NEAR_SEAT_KM = 7.0
# Code blocks by kind, as in GB/T 10114: 街道 001-099, 镇 100-; 社区 001-199, 村 200-.
CODE_BASE = {"street": 1, "town": 100, "community": 1, "village": 200, "grid": 1}

# Households per grid by the kind of community the grid is in (a city grid is 300-600 households),
# and people per household (2.43 on average in Chongqing at the 2020 census).
GRID_HOUSEHOLDS = {"urban": (300, 600), "town": (180, 380), "village": (50, 180)}
PEOPLE_PER_HOUSEHOLD = (2.2, 2.8)


@dataclass
class Units:
    """One level of the hierarchy, as parallel arrays."""

    level: str
    code: np.ndarray  # str codes
    parent: np.ndarray  # index into the level above (-1 for the city)
    district: np.ndarray  # index into the districts level (-1 for the city)
    geom: np.ndarray
    anchor: np.ndarray  # (n, 2) a point inside each unit: its seat or final Voronoi seed
    kind: np.ndarray
    name_zh: np.ndarray
    name_en: np.ndarray
    area: np.ndarray
    population: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.code)


@dataclass
class Density:
    """The settlement density surface, evaluated per level."""

    seats: np.ndarray  # (districts, 2)
    central: np.ndarray  # (districts,) True for the nine central districts

    def __call__(self, level: str, x: np.ndarray, y: np.ndarray, district: np.ndarray):
        centre_boost, metro_boost, seat_boost = LEVEL_DENSITY[level]
        centre = distance_km(x, y, CITY_CENTRE[0], CITY_CENTRE[1])
        seat = distance_km(x, y, self.seats[district, 0], self.seats[district, 1])
        return (
            1.0
            + centre_boost * np.exp(-centre / CENTRE_KM)
            + metro_boost * np.exp(-centre / METRO_KM)
            + seat_boost * np.exp(-seat / SEAT_KM)
        )


def apportion(weights: np.ndarray, total: int, minimum: int | np.ndarray = 1) -> np.ndarray:
    """Integer counts proportional to ``weights`` summing to ``total``, each at least ``minimum``
    (largest-remainder rounding; ties broken by position, so the result is deterministic)."""
    minimum = np.broadcast_to(np.asarray(minimum, dtype=np.int64), weights.shape)
    if minimum.sum() > total:
        raise ValueError(f"cannot give {len(weights)} parents {minimum.sum()} from {total}")
    quota = total * weights / weights.sum()
    counts = np.maximum(np.floor(quota).astype(np.int64), minimum)
    while counts.sum() < total:
        shortfall = total - counts.sum()
        order = np.argsort(counts - quota, kind="stable")
        counts[order[:shortfall]] += 1
    while counts.sum() > total:
        excess = counts.sum() - total
        spare = np.flatnonzero(counts > minimum)
        order = spare[np.argsort(quota[spare] - counts[spare], kind="stable")]
        counts[order[:excess]] -= 1
    return counts


def district_quotas(
    districts: Units, central: np.ndarray, level: str, total: int, parents: Units
) -> np.ndarray:
    """Units of ``level`` per district: area and census shares mixed, at least one per parent."""
    area_weight, central_multiplier = LEVEL_SHARES[level]
    people = np.array([CENSUS_2020[code] for code in districts.code])
    people = people * np.where(central, central_multiplier, 1.0)
    weights = area_weight * districts.area / districts.area.sum() + (1 - area_weight) * (
        people / people.sum()
    )
    return apportion(weights, total, np.bincount(parents.district, minlength=len(districts)))


def _district_level(districts: gpd.GeoDataFrame) -> tuple[Units, Units]:
    """The real city and district rows, with their seats as anchors."""
    frame = districts.sort_values("adcode", kind="stable").reset_index(drop=True)
    city_row = frame[frame["kind"] == "municipality"].iloc[0]
    rows = frame[frame["kind"] != "municipality"].reset_index(drop=True)
    geoms = as_multipolygons(rows.geometry.values)
    anchors = np.array([DISTRICT_SEATS.get(code, (np.nan, np.nan)) for code in rows["adcode"]])
    shapely.prepare(geoms)
    off = ~shapely.contains_xy(geoms, anchors[:, 0], anchors[:, 1])
    if off.any():
        log.warning("district seats outside their district: %s", list(rows["adcode"][off]))
        anchors[off] = shapely.get_coordinates(shapely.point_on_surface(geoms[off]))
    city_geom = as_multipolygons(np.array([city_row.geometry]))
    short_en = rows[["adcode", "name_en", "kind"]].itertuples(index=False)
    city = Units(
        level="city",
        code=np.array([CITY_CODE], dtype=object),
        parent=np.array([-1]),
        district=np.array([-1]),
        geom=city_geom,
        anchor=np.array([CITY_CENTRE]),
        kind=np.array(["municipality"], dtype=object),
        name_zh=np.array([city_row["name_zh"]], dtype=object),
        name_en=np.array([city_row["name_en"]], dtype=object),
        area=area_km2(city_geom),
    )
    district = Units(
        level="district",
        code=rows["adcode"].to_numpy(dtype=object),
        parent=np.zeros(len(rows), dtype=np.int64),
        district=np.arange(len(rows)),
        geom=geoms,
        anchor=anchors,
        kind=rows["kind"].to_numpy(dtype=object),
        name_zh=rows["name_zh"].to_numpy(dtype=object),
        name_en=np.array([names.district_name_en(*row) for row in short_en], dtype=object),
        area=area_km2(geoms),
    )
    return city, district


def _mean_density(
    parents: Units, level: str, density: Density, samples: int, rng: np.random.Generator
) -> np.ndarray:
    """Mean density over each parent, from ``samples`` uniform points inside it."""
    owner, x, y = points_inside(parents.geom, np.full(len(parents), samples), rng)
    values = density(level, x, y, parents.district[owner])
    return np.bincount(owner, weights=values, minlength=len(parents)) / samples


def _choose_seeds(
    parents: Units,
    counts: np.ndarray,
    level: str,
    density: Density,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``counts[k]`` seed points in each parent, drawn from a uniform pool with probability
    proportional to density (weighted sampling without replacement by exponential keys)."""
    pool_owner, x, y = points_inside(parents.geom, counts * SEED_POOL, rng)
    weight = density(level, x, y, parents.district[pool_owner])
    key = rng.exponential(size=weight.size) / weight
    order = np.lexsort((key, pool_owner))
    first = np.searchsorted(pool_owner, np.arange(len(parents)))
    rank = np.arange(order.size) - first[pool_owner[order]]
    chosen = order[rank < counts[pool_owner[order]]]
    chosen.sort()
    return pool_owner[chosen], np.column_stack([x[chosen], y[chosen]])


def _child_kinds(
    level: str, parents: Units, owner: np.ndarray, anchor: np.ndarray, density: Density
) -> np.ndarray:
    """street/town for streets, community/village for communities, grid for grids."""
    if level == "grid":
        return np.full(len(owner), "grid", dtype=object)
    district = parents.district[owner]
    if level == "street":
        core = distance_km(anchor[:, 0], anchor[:, 1], CITY_CENTRE[0], CITY_CENTRE[1])
        seat = distance_km(
            anchor[:, 0], anchor[:, 1], density.seats[district, 0], density.seats[district, 1]
        )
        urban = ((core < STREET_NEAR_CORE_KM) & density.central[district]) | (
            seat < STREET_NEAR_SEAT_KM
        )
        # Every district and county has at least one 街道: the unit at its seat.
        nearest = _nearest_per_parent(owner, seat)
        urban[nearest] = True
        return np.where(urban, "street", "town").astype(object)
    # Communities: all of a 街道 is 社区; a town keeps 社区 only at its centre, villages around.
    urban = parents.kind[owner] == "street"
    to_centre = distance_km(
        anchor[:, 0], anchor[:, 1], parents.anchor[owner, 0], parents.anchor[owner, 1]
    )
    urban[_nearest_per_parent(owner, to_centre)] = True
    return np.where(urban, "community", "village").astype(object)


def _nearest_per_parent(owner: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Index of the smallest ``distance`` within each owner group."""
    order = np.lexsort((distance, owner))
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    return order[first]


def _child_codes(parents: Units, owner: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Parent code + 3 digits, numbered within (parent, kind) in array order from the kind's
    code block."""
    _, group = np.unique(np.char.add(owner.astype(str), kind.astype(str)), return_inverse=True)
    number = rank_within(group) + np.array([CODE_BASE[k] for k in kind])
    if number.max() > 999:
        raise ValueError("more than 999 children of one kind in a parent")
    return np.array(
        [f"{parents.code[o]}{n:03d}" for o, n in zip(owner, number, strict=True)],
        dtype=object,
    )


def _child_names(
    level: str,
    parents: Units,
    grandparents: Units,
    owner: np.ndarray,
    kind: np.ndarray,
    codes: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Names distinct among siblings; grids are numbered within their community."""
    if level == "grid":
        number = np.array([int(code[-3:]) for code in codes])
        street_zh = grandparents.name_zh[parents.parent[owner]]
        community_zh = parents.name_zh[owner]
        name_zh = [
            f"{s}{c}第{n}网格" for s, c, n in zip(street_zh, community_zh, number, strict=True)
        ]
        name_en = [f"Grid {n}, {c}" for n, c in zip(number, parents.name_en[owner], strict=True)]
        return np.array(name_zh, dtype=object), np.array(name_en, dtype=object)
    name_zh = np.empty(len(owner), dtype=object)
    name_en = np.empty(len(owner), dtype=object)
    starts = np.searchsorted(owner, np.arange(len(parents) + 1))
    for parent in range(len(parents)):
        siblings = np.arange(starts[parent], starts[parent + 1])
        if level == "street":
            # Streets and towns share one draw, so 龙溪街道 and 龙溪镇 never sit side by side.
            real = names.CENTRAL_STREET_NAMES.get(parents.code[parent], ())
            groups = [(siblings, names.PLACE_NAMES, names.PLACE_WEIGHTS, real)]
        else:
            urban = kind[siblings] == "community"
            groups = [
                (
                    siblings[urban],
                    names.URBAN_COMMUNITY_NAMES,
                    names.URBAN_COMMUNITY_WEIGHTS,
                    (),
                ),
                (siblings[~urban], names.PLACE_NAMES, names.PLACE_WEIGHTS, ()),
            ]
        for members, pool, weights, first in groups:
            if members.size == 0:
                continue
            drawn = names.draw_names(rng, members.size, pool, weights, first)
            for index, (hanzi, pinyin) in zip(members, drawn, strict=True):
                name_zh[index], name_en[index] = names.unit_names(hanzi, pinyin, kind[index])
    return name_zh, name_en


def _child_counts(
    level: str,
    parents: Units,
    districts: Units,
    total: int,
    density: Density,
    rng: np.random.Generator,
    samples: int = 24,
) -> np.ndarray:
    """Children per parent: the district's quota shared out by area times mean density."""
    quotas = district_quotas(districts, density.central, level, total, parents)
    if parents.level == "district":
        return quotas
    weights = parents.area * _mean_density(parents, level, density, samples, rng)
    counts = np.zeros(len(parents), dtype=np.int64)
    for district in range(len(districts)):
        members = np.flatnonzero(parents.district == district)
        counts[members] = apportion(weights[members], quotas[district])
    return counts


def _subdivide(
    level: str,
    parents: Units,
    grandparents: Units,
    districts: Units,
    total: int,
    density: Density,
    rng: np.random.Generator,
) -> Units:
    """Split every parent into children: ``total`` over the level, at least one each."""
    counts = _child_counts(level, parents, districts, total, density, rng)
    owner, seeds = _choose_seeds(parents, counts, level, density, rng)
    geoms, anchors = partition(
        parents.geom, owner, seeds, iterations=LLOYD_ITERATIONS[level], relax=LLOYD_RELAX
    )
    # Number children outwards from the parent's centre (its seat or own anchor).
    centre = parents.anchor[owner]
    outward = distance_km(anchors[:, 0], anchors[:, 1], centre[:, 0], centre[:, 1])
    order = np.lexsort((outward, owner))
    owner, geoms, anchors = owner[order], geoms[order], anchors[order]
    kind = _child_kinds(level, parents, owner, anchors, density)
    # Within a parent, 街道 (or 社区) come before 镇 (or 村), as their code blocks do.
    order = np.lexsort((np.arange(len(owner)), ~np.isin(kind, ("street", "community")), owner))
    owner, geoms, anchors, kind = owner[order], geoms[order], anchors[order], kind[order]
    codes = _child_codes(parents, owner, kind)
    name_zh, name_en = _child_names(level, parents, grandparents, owner, kind, codes, rng)
    geoms = as_multipolygons(geoms)
    log.info("%s: %d units", level, len(codes))
    return Units(
        level=level,
        code=codes,
        parent=owner,
        district=parents.district[owner],
        geom=geoms,
        anchor=anchors,
        kind=kind,
        name_zh=name_zh,
        name_en=name_en,
        area=area_km2(geoms),
    )


def _grid_population(
    grids: Units, communities: Units, streets: Units, rng: np.random.Generator
) -> np.ndarray:
    """People per grid: households by the kind of place, times people per household."""
    community_kind = communities.kind[grids.parent]
    in_street = streets.kind[communities.parent[grids.parent]] == "street"
    setting = np.where(
        community_kind == "village", "village", np.where(in_street, "urban", "town")
    )
    low = np.array([GRID_HOUSEHOLDS[s][0] for s in setting])
    high = np.array([GRID_HOUSEHOLDS[s][1] for s in setting])
    households = rng.integers(low, high + 1)
    return np.rint(households * rng.uniform(*PEOPLE_PER_HOUSEHOLD, size=len(grids))).astype(
        np.int64
    )


def _sum_to_parents(children: Units, parents: Units) -> np.ndarray:
    return np.bincount(children.parent, weights=children.population, minlength=len(parents)).astype(
        np.int64
    )


@dataclass
class Hierarchy:
    city: Units
    districts: Units
    streets: Units
    communities: Units
    grids: Units

    @property
    def levels(self) -> tuple[Units, ...]:
        return (self.city, self.districts, self.streets, self.communities, self.grids)


def build_hierarchy(
    districts: gpd.GeoDataFrame, scale: Scale, rng: np.random.Generator
) -> Hierarchy:
    city, district = _district_level(districts)
    density = Density(
        seats=district.anchor,
        central=np.isin(district.code.astype(str), CENTRAL_DISTRICTS),
    )
    streets = _subdivide("street", district, city, district, scale.streets, density, rng)
    communities = _subdivide(
        "community", streets, district, district, scale.communities, density, rng
    )
    grids = _subdivide("grid", communities, streets, district, scale.grids, density, rng)
    grids.population = _grid_population(grids, communities, streets, rng)
    communities.population = _sum_to_parents(grids, communities)
    streets.population = _sum_to_parents(communities, streets)
    district.population = _sum_to_parents(streets, district)
    city.population = np.array([district.population.sum()])
    return Hierarchy(city, district, streets, communities, grids)


def admin_units_frame(hierarchy: Hierarchy) -> gpd.GeoDataFrame:
    """The admin_units table, parents before children (the parent_code foreign key)."""
    frames = []
    parent_codes = None
    for units in hierarchy.levels:
        if parent_codes is None:
            parent_code = np.full(len(units), None, dtype=object)
        else:
            parent_code = parent_codes[units.parent]
        frames.append(
            pd.DataFrame(
                {
                    "code": units.code,
                    "level": units.level,
                    "parent_code": parent_code,
                    "name_zh": units.name_zh,
                    "name_en": units.name_en,
                    "kind": units.kind,
                    "population": units.population.astype(np.int64),
                    "area_km2": units.area,
                    "geometry": units.geom,
                }
            )
        )
        parent_codes = units.code
    frame = pd.concat(frames, ignore_index=True)
    return gpd.GeoDataFrame(frame, geometry="geometry", crs="EPSG:4326")
