"""Buildings as 3D Tiles content: which rows, where they stand, their meshes and metadata.

A 3D buildings layer is the built-in ``buildings`` table or an upload converted to its
columns (a CityJSON upload; ``layers.meta.tiles3d == "buildings"``). Its rows are drawn at
the CIM grades asked for (``Grades``): CIM2 an LOD1 block from the footprint, CIM3 an LOD2
building (its own surfaces when it has them, else its roof form over the footprint); a
building with a model of a selected CIM4-6 grade is left to the model (tiles/tiles3d.py).

Blocks stand on the terrain the 3D view draws (tiles/dem.py, the same DEMs as the
quantized-mesh terrain): the roof is ``height_m`` above the lowest DEM height under the
footprint's corners, and the walls reach ``FOUNDATION_M`` below it, so a block neither
floats over a slope nor shows a gap where the terrain mesh simplifies the DEM. A building on
a podium (``base_height`` > 0) starts that high above the ground.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from sqlalchemy.ext.asyncio import AsyncConnection

from tiles import dem, glb, meshes, roofs
from tiles.sql import fetch_row, sql_text
from twin.core.errors import InvalidParameter
from twin.core.layer import Layer
from twin.core.principal import Scope
from twin.core.scope import table_predicate

FOUNDATION_M = 3.0
GRADES = (2, 3, 4, 5, 6)
MODEL_GRADES = (4, 5, 6)


@dataclass(frozen=True)
class Grades:
    """The CIM grades asked for (``cim=2,3,4``): which forms a tileset draws."""

    values: frozenset[int]

    @classmethod
    def parse(cls, text: str | None) -> Grades:
        if text is None or not text.strip():
            return cls(frozenset(GRADES))
        values = set()
        for part in text.split(","):
            part = part.strip().upper().removeprefix("CIM")
            if not part.isdigit() or int(part) not in GRADES:
                raise InvalidParameter(
                    f"cim: expected a comma list of CIM grades 2-6 (2 LOD1 blocks, 3 LOD2 roofs, "
                    f"4-6 models; CIM1 is the terrain), got {text!r}")
            values.add(int(part))
        return cls(frozenset(values))

    @property
    def key(self) -> str:
        return ",".join(str(g) for g in sorted(self.values))

    @property
    def least_drawn(self) -> int | None:
        """The lowest building grade drawn as a block (2 or 3), or None for models only."""
        return 2 if 2 in self.values else 3 if 3 in self.values else None

    def models(self) -> frozenset[int]:
        return self.values & frozenset(MODEL_GRADES)


def is_buildings_layer(layer: Layer) -> bool:
    return bool(layer.source_table) and (
        layer.source_table == "buildings" or layer.meta.get("tiles3d") == "buildings")


def _rows_filter(layer: Layer, scope: Scope, grades: Grades, skipped: Sequence[int]
                 ) -> tuple[str, dict]:
    """The rows the tileset draws as blocks: in the scope, of a drawn grade, not replaced."""
    where = table_predicate(scope, layer.source_table, alias="b")
    params = dict(where.params)
    sql = f"({layer.where}){where.and_sql} AND b.cim_level >= :least"
    params["least"] = grades.least_drawn or 99
    if skipped:
        sql += " AND b.id <> ALL(:skipped)"
        params["skipped"] = list(skipped)
    return sql, params


async def boxes_in(conn: AsyncConnection, layer: Layer, scope: Scope, grades: Grades,
                   skipped: Sequence[int], bounds: tuple[float, float, float, float]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Ids and footprint bounding boxes (xmin, ymin, xmax, ymax) of the drawn buildings
    whose box lies in ``bounds`` (west <= x < east, south <= y < north)."""
    where, params = _rows_filter(layer, scope, grades, skipped)
    west, south, east, north = bounds
    # One row of five arrays (binary): the root subtree reads every building, and 100,000
    # rows as Python objects cost seconds where the arrays cost milliseconds.
    row = await fetch_row(conn, f"""
        SELECT coalesce(array_agg(b.id), '{{}}'), coalesce(array_agg(ST_XMin(b.geom)), '{{}}'),
               coalesce(array_agg(ST_YMin(b.geom)), '{{}}'),
               coalesce(array_agg(ST_XMax(b.geom)), '{{}}'),
               coalesce(array_agg(ST_YMax(b.geom)), '{{}}')
          FROM "{layer.source_table}" AS b
         WHERE b.geom && ST_MakeEnvelope(:west, :south, :east, :north, 4326)
           AND ST_XMin(b.geom) >= :west AND ST_XMax(b.geom) < :east
           AND ST_YMin(b.geom) >= :south AND ST_YMax(b.geom) < :north
           AND {where}
    """, {**params, "west": west, "south": south, "east": east, "north": north})
    ids = np.asarray(row[0], dtype=np.int64)
    return ids, np.column_stack([np.asarray(column, dtype=np.float64) for column in row[1:]]
                                ).reshape(ids.size, 4)


async def height_range(conn: AsyncConnection, layer: Layer, scope: Scope, grades: Grades,
                       dems: Sequence[Layer]) -> tuple[float, float]:
    """Heights every drawn building lies within (metres above the ellipsoid)."""
    where, params = _rows_filter(layer, scope, grades, ())
    row = (await conn.execute(sql_text(f"""
        SELECT max(b.height_m), min(ST_ZMin(b.surfaces)), max(ST_ZMax(b.surfaces))
          FROM "{layer.source_table}" AS b WHERE {where}
    """), params)).one()
    tallest = float(row[0] or 0.0)
    lows, highs = [], []
    for layer_dem in dems:
        heights = dem.read_dem(layer_dem).heights
        if np.isfinite(heights).any():
            lows.append(float(np.nanmin(heights)))
            highs.append(float(np.nanmax(heights)))
    low = min(lows, default=0.0) - FOUNDATION_M
    high = max(highs, default=0.0) + tallest
    if row[1] is not None:
        low, high = min(low, float(row[1])), max(high, float(row[2]))
    # A metre of slack for the float32 vertices of the content.
    return float(np.floor(low - 1.0)), float(np.ceil(high + 1.0))


@dataclass
class BuildingRows:
    ids: np.ndarray
    name: list[str | None]
    use: list[str | None]
    height: np.ndarray
    base_height: np.ndarray
    floors: np.ndarray
    cim_level: np.ndarray
    roof_type: list[str]
    district_code: list[str | None]
    street_code: list[str | None]
    footprints: np.ndarray  # shapely polygons
    surfaces: np.ndarray  # shapely MultiPolygon Z or None

    def __len__(self) -> int:
        return int(self.ids.size)


async def fetch_rows(conn: AsyncConnection, layer: Layer, ids: Sequence[int]) -> BuildingRows:
    rows = (await conn.execute(sql_text(f"""
        SELECT b.id, b.name, b.use, b.height_m, b.base_height, b.floors, b.cim_level,
               b.roof_type, b.district_code, b.street_code, ST_AsBinary(b.geom),
               ST_AsBinary(b.surfaces)
          FROM "{layer.source_table}" AS b
         WHERE b.id = ANY(:ids)
         ORDER BY b.id
    """), {"ids": list(ids)})).all()
    columns = list(zip(*rows, strict=True)) if rows else [()] * 12
    return BuildingRows(
        ids=np.array(columns[0], dtype=np.int64),
        name=list(columns[1]), use=list(columns[2]),
        height=np.array(columns[3], dtype=np.float64),
        base_height=np.array(columns[4], dtype=np.float64),
        floors=np.array([f or 0 for f in columns[5]], dtype=np.int64),
        cim_level=np.array(columns[6], dtype=np.int64),
        roof_type=list(columns[7]), district_code=list(columns[8]),
        street_code=list(columns[9]),
        footprints=shapely.from_wkb(np.array([bytes(g) for g in columns[10]], dtype=object))
        if rows else np.zeros(0, dtype=object),
        surfaces=np.array([shapely.from_wkb(bytes(s)) if s is not None else None
                           for s in columns[11]], dtype=object),
    )


def ground_under(rows: BuildingRows, dems: Sequence[Layer]) -> np.ndarray:
    """The lowest terrain height under each footprint's exterior corners (tiles/dem.py)."""
    if not len(rows):
        return np.zeros(0)
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(rows.footprints),
                                            return_index=True)
    heights = dem.ground_heights(dems, coords[:, 0], coords[:, 1])
    ground = np.full(len(rows), np.inf)
    np.minimum.at(ground, index, heights)
    return ground


def building_mesh(rows: BuildingRows, grades: Grades, dems: Sequence[Layer]) -> meshes.Mesh:
    """Every row's mesh at its drawn grade; vertex features are row numbers."""
    ground = ground_under(rows, dems)
    own = np.array([s is not None for s in rows.surfaces], dtype=bool)
    base = np.where(rows.base_height > 0, ground + rows.base_height, ground - FOUNDATION_M)
    top = ground + rows.height
    lod2 = (rows.cim_level >= 3) & (3 in grades.values)
    rings = meshes.footprint_rings(rows.footprints)
    parts: list[meshes.Mesh] = []

    def remap(mesh: meshes.Mesh, rows_of: np.ndarray) -> meshes.Mesh:
        mesh.feature = rows_of[mesh.feature].astype(np.uint32)
        return mesh

    # Own surfaces (CityJSON): as given at LOD2; their box as a block at LOD1.
    surfaced = np.flatnonzero(own & lod2)
    if surfaced.size:
        polygons = [[np.asarray(ring.coords) for ring in (p.exterior, *p.interiors)]
                    for k in surfaced for p in rows.surfaces[k].geoms]
        owners = np.array([k for k in surfaced for _ in rows.surfaces[k].geoms],
                          dtype=np.uint32)
        parts.append(meshes.polygon_surfaces(polygons, owners))
    own_block = np.flatnonzero(own & ~lod2)
    if own_block.size:
        low = np.array([min(c[2] for c in shapely.get_coordinates(rows.surfaces[k],
                                                                   include_z=True))
                        for k in own_block])
        high = np.array([max(c[2] for c in shapely.get_coordinates(rows.surfaces[k],
                                                                    include_z=True))
                         for k in own_block])
        parts.append(remap(roofs.blocks([rings[k] for k in own_block],
                                        low, high), own_block))
    roofed = np.flatnonzero(~own & lod2)
    if roofed.size:
        parts.append(remap(roofs.roofed([rings[k] for k in roofed],
                                        base[roofed], top[roofed],
                                        [rows.roof_type[k] for k in roofed]), roofed))
    blocks = np.flatnonzero(~own & ~lod2)
    if blocks.size:
        parts.append(remap(roofs.blocks([rings[k] for k in blocks],
                                        base[blocks], top[blocks]), blocks))
    return meshes.merge(parts)


def feature_table(rows: BuildingRows, grades: Grades) -> glb.FeatureTable:
    drawn = np.where((rows.cim_level >= 3) & (3 in grades.values), 3, 2)
    id_type = "UINT32" if not rows.ids.size or int(rows.ids.max()) < 2**32 else "INT64"
    return glb.FeatureTable("building", [
        glb.Property("id", id_type, rows.ids.tolist()),
        glb.Property("name", "STRING", [n or "" for n in rows.name]),
        glb.Property("use", "STRING", [u or "" for u in rows.use]),
        glb.Property("height", "FLOAT64", rows.height.tolist()),
        glb.Property("floors", "UINT16", np.clip(rows.floors, 0, 65535).tolist()),
        glb.Property("cim_level", "UINT8", rows.cim_level.tolist()),
        glb.Property("drawn_grade", "UINT8", drawn.tolist()),
        glb.Property("roof_type", "STRING", [r or "flat" for r in rows.roof_type]),
        glb.Property("district_code", "STRING", [c or "" for c in rows.district_code]),
        glb.Property("street_code", "STRING", [c or "" for c in rows.street_code]),
    ])


def content(rows: BuildingRows, grades: Grades, dems: Sequence[Layer]) -> bytes:
    """A GLB of the rows (ordered by id: the same rows give the same bytes)."""
    return glb.glb(building_mesh(rows, grades, dems), feature_table(rows, grades))
