"""Sectors, risk points and the emergency plans that the major and large risks link to.

Risk points fall in grid cells, more of them where people live; which kinds of risk a place has
depends on whether it is city (社区) or countryside (村): lifts and rented flats in the city,
landslide hazards and forest fire zones in the mountains.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from h3.api import basic_int as h3

from data_samples.admin import Hierarchy
from data_samples.partition import points_inside, rank_within
from twin.core.models import H3_RESOLUTIONS

# The seven sectors (七大板块) of DOMAIN.md, in their customary order.
SECTORS = (
    ("party_building", "党建统领", "Party building"),
    ("facility_operation", "设施运行", "Facility operation"),
    ("social_governance", "社会治理", "Social governance"),
    ("emergency_mobilisation", "应急动员", "Emergency mobilisation"),
    ("civic_civility", "文明创建", "Civic civility"),
    ("ecology_landscape", "生态景观", "Ecology and landscape"),
    ("production_services", "生产生活服务", "Production and living services"),
)

# Share of all risk points in each sector.
SECTOR_SHARE = {
    "party_building": 0.06,
    "facility_operation": 0.22,
    "social_governance": 0.20,
    "emergency_mobilisation": 0.18,
    "civic_civility": 0.09,
    "ecology_landscape": 0.10,
    "production_services": 0.15,
}

# The hazard an emergency plan is written for (title words in Chinese and English).
PLAN_THEMES = {
    "opinion": ("网络舆情突发事件", "Online Public Opinion Incidents"),
    "gas": ("燃气管线泄漏", "Gas Pipeline Leaks"),
    "pipes": ("城市内涝及管网事故", "Urban Waterlogging and Pipe Network Failures"),
    "structures": ("城市基础设施运行事故", "Urban Infrastructure Failures"),
    "residential_fire": ("居住场所火灾", "Residential Fires"),
    "crowd": ("人员密集场所踩踏事件", "Crowd Crushes in Crowded Places"),
    "mass_incident": ("群体性事件", "Mass Incidents"),
    "geohazard": ("地质灾害", "Geological Hazards"),
    "chemical": ("危险化学品事故", "Hazardous Chemical Accidents"),
    "fire": ("火灾事故", "Fires"),
    "flood": ("防汛抗旱", "Flood and Drought Control"),
    "forest_fire": ("森林火灾", "Forest Fires"),
    "food": ("食品安全事故", "Food Safety Incidents"),
    "work_safety": ("生产经营安全事故", "Work Safety Accidents"),
    "environment": ("突发环境事件", "Environmental Emergencies"),
    "cityscape": ("户外设施及市容突发事件", "Outdoor Structure and Cityscape Incidents"),
}

# (sector, category, plan theme, weight in the city, weight in the countryside)
CATEGORIES = (
    ("party_building", "党群服务中心", "opinion", 3.0, 2.0),
    ("party_building", "新就业群体服务站点", "opinion", 2.0, 0.3),
    ("party_building", "网络舆情关注点", "opinion", 2.0, 1.0),
    ("party_building", "流动党员集中居住点", "opinion", 1.5, 1.0),
    ("party_building", "基层党组织阵地", "opinion", 1.0, 2.0),
    ("facility_operation", "燃气管线", "gas", 5.0, 1.0),
    ("facility_operation", "燃气调压站", "gas", 1.5, 0.5),
    ("facility_operation", "排水管网", "pipes", 4.0, 1.0),
    ("facility_operation", "供水管网", "pipes", 2.0, 1.0),
    ("facility_operation", "道路塌陷隐患", "pipes", 2.0, 0.3),
    ("facility_operation", "桥梁隧道", "structures", 2.0, 1.5),
    ("facility_operation", "高切坡", "structures", 2.0, 2.0),
    ("facility_operation", "电梯设备", "structures", 4.0, 0.2),
    ("social_governance", "群租房", "residential_fire", 4.0, 0.5),
    ("social_governance", "电动自行车集中充电点", "residential_fire", 3.0, 1.0),
    ("social_governance", "老旧小区", "residential_fire", 3.0, 0.3),
    ("social_governance", "人员密集场所", "crowd", 3.0, 1.0),
    ("social_governance", "大型活动场所", "crowd", 1.0, 0.3),
    ("social_governance", "矛盾纠纷", "mass_incident", 2.0, 2.0),
    ("social_governance", "信访重点", "mass_incident", 1.0, 1.0),
    ("emergency_mobilisation", "地质灾害隐患点", "geohazard", 0.5, 5.0),
    ("emergency_mobilisation", "危化品企业", "chemical", 1.0, 1.0),
    ("emergency_mobilisation", "消防重点单位", "fire", 3.0, 1.0),
    ("emergency_mobilisation", "防汛重点部位", "flood", 1.0, 2.5),
    ("emergency_mobilisation", "应急避难场所", "flood", 1.5, 1.0),
    ("emergency_mobilisation", "森林防火重点区域", "forest_fire", 0.2, 3.0),
    ("production_services", "农贸市场", "food", 2.0, 1.5),
    ("production_services", "学校食堂", "food", 2.0, 1.5),
    ("production_services", "餐饮场所", "food", 4.0, 1.0),
    ("production_services", "建筑工地", "work_safety", 3.0, 1.0),
    ("production_services", "加油站", "work_safety", 1.0, 1.0),
    ("production_services", "工贸企业", "work_safety", 1.5, 1.0),
    ("production_services", "养老机构", "work_safety", 1.0, 1.0),
    ("ecology_landscape", "黑臭水体", "environment", 1.0, 0.5),
    ("ecology_landscape", "饮用水水源地", "environment", 0.3, 1.5),
    ("ecology_landscape", "河道水质断面", "environment", 1.0, 1.5),
    ("ecology_landscape", "垃圾处理设施", "environment", 0.5, 1.0),
    ("ecology_landscape", "扬尘污染工地", "environment", 2.0, 0.5),
    ("ecology_landscape", "古树名木", "environment", 0.5, 1.0),
    ("civic_civility", "户外广告牌", "cityscape", 3.0, 0.3),
    ("civic_civility", "违法建筑", "cityscape", 1.5, 1.0),
    ("civic_civility", "占道经营", "cityscape", 3.0, 0.5),
    ("civic_civility", "背街小巷", "cityscape", 2.0, 0.3),
    ("civic_civility", "共享单车停放点", "cityscape", 2.0, 0.05),
    ("civic_civility", "农村人居环境整治点", "cityscape", 0.05, 2.0),
)

# Four-colour levels: 1 major (red) ... 4 low (blue).
LEVEL_SHARE = (0.02, 0.08, 0.30, 0.60)
# A city grid holds more risk points than its people alone would say (lifts, gas, crowds).
URBAN_RISK_FACTOR = 1.5
LEVEL_NUMERALS = {1: "Ⅰ", 2: "Ⅱ", 3: "Ⅲ", 4: "Ⅳ"}


def sectors_frame() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"code": code, "name_zh": zh, "name_en": en, "sort_order": order}
            for order, (code, zh, en) in enumerate(SECTORS, start=1)
        ]
    )


def _category_probabilities() -> dict[str, np.ndarray]:
    """P(category) in the city and in the countryside: sector share times the category's
    weight within its sector."""
    table = pd.DataFrame(CATEGORIES, columns=["sector", "category", "theme", "urban", "rural"])
    probabilities = {}
    for setting in ("urban", "rural"):
        within = table[setting] / table.groupby("sector")[setting].transform("sum")
        p = (within * table["sector"].map(SECTOR_SHARE)).to_numpy()
        probabilities[setting] = p / p.sum()
    return probabilities


def _h3_cells(lat: np.ndarray, lng: np.ndarray) -> dict[str, list[int]]:
    """The H3 cell (as a 64-bit integer) of every point at every stored resolution."""
    pairs = list(zip(lat.tolist(), lng.tolist(), strict=True))
    return {
        f"h3_r{res}": [h3.latlng_to_cell(a, b, res) for a, b in pairs] for res in H3_RESOLUTIONS
    }


def risk_points_frame(
    hierarchy: Hierarchy, total: int, rng: np.random.Generator
) -> gpd.GeoDataFrame:
    """``total`` risk points inside grid cells, without plans yet (``plan_id`` all null)."""
    grids, communities = hierarchy.grids, hierarchy.communities
    streets, districts = hierarchy.streets, hierarchy.districts
    community = grids.parent
    urban_grid = communities.kind[community] == "community"
    weight = grids.population * np.where(urban_grid, URBAN_RISK_FACTOR, 1.0)
    per_grid = rng.multinomial(total, weight / weight.sum())
    grid, x, y = points_inside(grids.geom, per_grid, rng)

    urban = urban_grid[grid]
    probabilities = _category_probabilities()
    category = np.empty(total, dtype=np.int64)
    for setting, members in (("urban", urban), ("rural", ~urban)):
        category[members] = rng.choice(
            len(CATEGORIES), size=int(members.sum()), p=probabilities[setting]
        )
    level = rng.choice(np.arange(1, 5), size=total, p=LEVEL_SHARE)

    sector_of = np.array([c[0] for c in CATEGORIES], dtype=object)
    category_of = np.array([c[1] for c in CATEGORIES], dtype=object)
    community_zh = communities.name_zh[community[grid]]
    # Numbered within (community, category): 和平社区燃气管线3号.
    serial = rank_within(community[grid] * len(CATEGORIES) + category) + 1
    names = [
        f"{c}{k}{n}号"
        for c, k, n in zip(community_zh, category_of[category], serial, strict=True)
    ]
    street = communities.parent[community[grid]]
    house = rng.integers(1, 300, size=total)
    village_group = np.array([int(code[-3:]) for code in grids.code])[grid]
    addresses = [
        f"重庆市{d}{s}{c}{f'{g}组' if is_village else ''}{h}号"
        for d, s, c, g, is_village, h in zip(
            districts.name_zh[streets.district[street]],
            streets.name_zh[street],
            community_zh,
            village_group,
            ~urban,
            house,
            strict=True,
        )
    ]
    ids = np.arange(1, total + 1)
    frame = pd.DataFrame(
        {
            "id": ids,
            "code": [f"RP{i:08d}" for i in ids],
            "name": names,
            "sector_code": sector_of[category],
            "category": category_of[category],
            "level": level.astype(np.int64),
            "address": addresses,
            "grid_code": grids.code[grid],
            "plan_id": pd.array([pd.NA] * total, dtype="Int64"),
            **_h3_cells(y, x),
        }
    )
    return gpd.GeoDataFrame(frame, geometry=shapely.points(x, y), crs="EPSG:4326")


def link_emergency_plans(
    points: gpd.GeoDataFrame, hierarchy: Hierarchy, rng: np.random.Generator
) -> pd.DataFrame:
    """One plan per (district, theme) that has major or large risk points, and set every such
    point's ``plan_id`` (in place). Returns the emergency_plans table."""
    theme_of = {category: theme for _, category, theme, _, _ in CATEGORIES}
    sector_of_theme = {theme: sector for sector, _, theme, _, _ in CATEGORIES}
    serious = points["level"] <= 2
    keyed = pd.DataFrame(
        {
            "district": points.loc[serious, "grid_code"].str[:6],
            "theme": points.loc[serious, "category"].map(theme_of),
            "level": points.loc[serious, "level"],
        }
    )
    sector_order = {code: i for i, (code, _, _) in enumerate(SECTORS)}
    theme_order = {theme: i for i, theme in enumerate(PLAN_THEMES)}
    plans = keyed.groupby(["district", "theme"], sort=False)["level"].min().reset_index()
    plans["order"] = plans["theme"].map(
        lambda t: (sector_order[sector_of_theme[t]], theme_order[t])
    )
    plans = plans.sort_values(["district", "order"], kind="stable").reset_index(drop=True)
    plans["id"] = np.arange(1, len(plans) + 1)
    serial = plans.groupby("district").cumcount() + 1

    district_zh = dict(zip(hierarchy.districts.code, hierarchy.districts.name_zh, strict=True))
    district_en = dict(zip(hierarchy.districts.code, hierarchy.districts.name_en, strict=True))
    # Plans for places with a major (red) risk may call a level I or II response; the rest II-IV.
    response = np.where(
        plans["level"].to_numpy() == 1,
        rng.choice([1, 2], size=len(plans), p=[0.3, 0.7]),
        rng.choice([2, 3, 4], size=len(plans), p=[0.3, 0.5, 0.2]),
    )
    keys = list(zip(plans["district"], plans["theme"], response, strict=True))
    title_zh = [f"{district_zh[d]}{PLAN_THEMES[t][0]}专项应急预案" for d, t, _ in keys]
    title_en = [
        f"{district_en[d]} Special Emergency Plan for {PLAN_THEMES[t][1]}" for d, t, _ in keys
    ]
    summary = [
        f"规定{district_zh[d]}{PLAN_THEMES[t][0]}的监测预警、分级响应（最高{LEVEL_NUMERALS[r]}级）"
        "启动条件和指挥处置程序，明确各街道（乡镇）和有关部门的职责。"
        for d, t, r in keys
    ]
    table = pd.DataFrame(
        {
            "id": plans["id"].astype(np.int64),
            "code": [f"YA-{d}-{n:04d}" for d, n in zip(plans["district"], serial, strict=True)],
            "title_zh": title_zh,
            "title_en": title_en,
            "sector_code": plans["theme"].map(sector_of_theme),
            "response_level": response.astype(np.int64),
            "issuer_code": plans["district"],
            "summary": summary,
        }
    )
    plan_of = plans.set_index(["district", "theme"])["id"]
    point_keys = pd.MultiIndex.from_frame(keyed[["district", "theme"]])
    points.loc[serious, "plan_id"] = plan_of.reindex(point_keys).to_numpy()
    points["plan_id"] = points["plan_id"].astype("Int64")
    return table
