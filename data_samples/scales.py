"""How big the sample city is. ``full`` matches DOMAIN.md; ``small`` loads in seconds for tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    name: str
    streets: int
    communities: int
    grids: int
    risk_points: int
    teams: int
    depots: int
    # Road grid spacing over the central urban area, metres.
    road_spacing_m: float
    drainage_km: float
    water_km: float
    gas_km: float
    sensors: int
    anomalies: int
    hazard_sources: int
    buildings: int
    # DEM cell size over the municipality and over the central urban area, degrees.
    dem_cell_deg: float
    dem_central_cell_deg: float
    reading_hours: int = 24
    reading_step_min: int = 5


SCALES = {
    "full": Scale(
        name="full",
        streets=1031,
        communities=11200,
        grids=65300,
        risk_points=120_000,
        teams=400,
        depots=300,
        road_spacing_m=500.0,
        drainage_km=1000.0,
        water_km=300.0,
        gas_km=200.0,
        sensors=5000,
        anomalies=30,
        hazard_sources=1581,
        buildings=100_000,
        dem_cell_deg=0.005,
        dem_central_cell_deg=0.0005,
    ),
    "small": Scale(
        name="small",
        streets=80,
        communities=400,
        grids=2000,
        risk_points=3000,
        teams=60,
        depots=30,
        road_spacing_m=1500.0,
        drainage_km=60.0,
        water_km=20.0,
        gas_km=15.0,
        sensors=200,
        anomalies=6,
        hazard_sources=80,
        buildings=2000,
        dem_cell_deg=0.02,
        dem_central_cell_deg=0.002,
    ),
}

# The nine central urban districts (主城九区), where everything is denser.
CENTRAL_DISTRICTS = (
    "500103",  # 渝中 Yuzhong
    "500104",  # 大渡口 Dadukou
    "500105",  # 江北 Jiangbei
    "500106",  # 沙坪坝 Shapingba
    "500107",  # 九龙坡 Jiulongpo
    "500108",  # 南岸 Nan'an
    "500109",  # 北碚 Beibei
    "500112",  # 渝北 Yubei
    "500113",  # 巴南 Banan
)

# Jiefangbei, the traditional centre of the city (WGS84).
CITY_CENTRE = (106.5775, 29.5570)
