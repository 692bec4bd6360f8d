"""CityJSON uploads: LOD1/LOD2 buildings as a 3D buildings table (the columns of ``buildings``).

A CityJSON file (1.0, 1.1 or 2.0) holds CityObjects over one shared vertex
list, stored as integers with a ``transform`` (scale, translate). Every Building and
BuildingPart with LOD1 or LOD2 geometry (Solid, MultiSurface or CompositeSurface) becomes a
row: its footprint (the GroundSurface, else the lowest ring, else the 2D hull) as the layer's
POLYGON, and its surfaces as a MULTIPOLYGONZ with absolute heights, which the 3D tiles draw
instead of an extrusion. The CRS is the file's ``metadata.referenceSystem`` (or the form's
``source_crs``, which wins, as for every upload); a file naming none is refused, never
guessed. GCJ-02/BD-09 coordinates are corrected by the form's ``datum``.

Heights are taken as the file gives them (metres; the twin's DEMs are treated the same way).

``convert`` runs in the request (every refusal is a 400 before a job is queued) and again in
the job, which writes the table inside the job's publishing transaction (``build_version``):
nothing is half-written.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError, ProjError
from sqlalchemy import Connection, text

from layers.crs import MUNICIPALITY_BBOX, WGS84, Datum, describe
from layers.safety import UploadRefused
from layers.versions import Version, table_name
from twin.core.datum import coords_to_wgs84
from twin.core.settings import UploadSettings

VERSIONS = ("1.0", "1.1", "2.0")
BUILDING_TYPES = ("Building", "BuildingPart")
GEOMETRY_TYPES = ("Solid", "MultiSurface", "CompositeSurface")
LODS = (1, 2)
# A CRS's area of use is where its maker vouches for it; a Gauss-Krüger zone still maps well a
# little past its edges (Chongqing's centre lies at the border of two 3-degree zones).
AREA_MARGIN_DEG = 1.0
MAX_BUILDING_EXTENT_M = 3000.0
HEIGHT_RANGE_M = (-500.0, 9000.0)
HORIZONTAL_M = 0.2
SLOPED_DEG = 5.0
USE_CHARS = 16
# CityGML's roofType code list: flat; gabled; hipped, half-hipped, pavilion, pyramidal.
ROOF_CODES = {"1000": "flat", "1030": "gable", "1040": "hip", "1050": "hip", "1070": "hip",
              "1120": "hip"}
ROOF_TYPES = ("flat", "gable", "hip")
_EPSG = re.compile(r"EPSG(?:/[\d.]+/|:[\d.]*:|:)(\d{4,6})\s*$", re.IGNORECASE)
_METRES_PER_DEG = 111_320.0


@dataclass
class CityBuilding:
    """One row of the buildings table made from a Building or BuildingPart."""

    cityjson_id: str
    name: str | None
    use: str
    height_m: float
    floors: int
    cim_level: int
    roof_type: str
    lod: str
    footprint: shapely.Polygon
    surfaces: shapely.MultiPolygon


@dataclass
class Converted:
    buildings: list[CityBuilding]
    crs: CRS
    version: str
    skipped: list[str] = field(default_factory=list)

    @property
    def lods(self) -> dict[str, int]:
        return dict(sorted(Counter(b.lod[0] for b in self.buildings).items()))


def refuse(reason: str) -> UploadRefused:
    return UploadRefused(f"file: {reason}")


# --- reading -----------------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    document: dict = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"the key {key!r} appears twice in one object")
        document[key] = value
    return document


def read_document(path: Path) -> dict:
    """The CityJSON document, parsed as cjio's reader parses it (duplicate keys refused, the
    type checked). Not with cjio itself: importing ``cjio.cityjson`` replaces the json
    module's float encoder process-wide (6 decimals, no C encoder)."""
    try:
        document = json.loads(path.read_bytes().decode("utf-8"),
                              object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise refuse("a CityJSON file is UTF-8 JSON; this one is not UTF-8 text") from None
    except ValueError as error:  # JSONDecodeError included
        raise refuse(f"the CityJSON does not parse ({str(error)[:200]})") from None
    if not isinstance(document, dict) or document.get("type") != "CityJSON":
        raise refuse('not a CityJSON file (no "type": "CityJSON"); a GeoJSON file is '
                     "uploaded as .geojson")
    version = str(document.get("version", ""))
    if version not in VERSIONS:
        raise refuse(f"CityJSON version {version or 'missing'}; twin reads "
                     f"{', '.join(VERSIONS)}")
    if not isinstance(document.get("CityObjects"), dict) \
            or not isinstance(document.get("vertices"), list):
        raise refuse("a CityJSON file needs 'CityObjects' (an object) and 'vertices' (an array)")
    return document


def file_crs(document: dict) -> CRS | None:
    """metadata.referenceSystem as a CRS (None when the file names none)."""
    metadata = document.get("metadata")
    reference = metadata.get("referenceSystem") if isinstance(metadata, dict) else None
    if reference is None:
        return None
    if isinstance(reference, dict):  # CityJSON 1.0 allowed {"type": ..., "code": ...}
        reference = reference.get("code") or reference.get("href") or ""
    match = _EPSG.search(str(reference))
    if not match:
        raise refuse(f"metadata.referenceSystem {str(reference)[:80]!r} is not an EPSG CRS "
                     "(e.g. 'https://www.opengis.net/def/crs/EPSG/0/4545'); give "
                     "source_crs=EPSG:…")
    try:
        return CRS.from_epsg(int(match.group(1)))
    except CRSError:
        raise refuse(f"metadata.referenceSystem names EPSG:{match.group(1)}, which is not a "
                     "known CRS") from None


def _vertices(document: dict) -> np.ndarray:
    try:
        vertices = np.asarray(document["vertices"], dtype=np.float64)
    except (TypeError, ValueError):
        raise refuse("'vertices' must be an array of [x, y, z] numbers") from None
    if vertices.size == 0:
        raise refuse("the file holds no vertices (no geometry)")
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not np.isfinite(vertices).all():
        raise refuse("'vertices' must be an array of [x, y, z] numbers")
    transform = document.get("transform")
    if transform is not None:
        try:
            scale = np.asarray(transform["scale"], dtype=np.float64).reshape(3)
            translate = np.asarray(transform["translate"], dtype=np.float64).reshape(3)
        except (KeyError, TypeError, ValueError):
            raise refuse("'transform' needs 'scale' and 'translate', three numbers each") \
                from None
        vertices = vertices * scale + translate
    return vertices


def _to_wgs84(vertices: np.ndarray, crs: CRS, datum: Datum) -> np.ndarray:
    """Vertices to lon, lat (EPSG:4326) and height; refused when they do not fit the CRS."""
    horizontal = crs.sub_crs_list[0] if crs.is_compound else crs
    name = describe(crs)
    try:
        transformer = Transformer.from_crs(horizontal, WGS84, always_xy=True)
        lon, lat = transformer.transform(vertices[:, 0], vertices[:, 1], errcheck=False)
    except (CRSError, ProjError) as error:
        raise refuse(f"the file's CRS ({name}) cannot be transformed to WGS84 ({error})") \
            from None
    lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    area = crs.area_of_use or horizontal.area_of_use
    finite = np.isfinite(lon) & np.isfinite(lat)
    if area is not None:
        west, south, east, north = area.bounds
        m = AREA_MARGIN_DEG
        outside = ~finite | (lon < west - m) | (lon > east + m) | (lat < south - m) \
            | (lat > north + m)
    else:
        outside = ~finite
    if outside.any():
        where = f" ({area.bounds[0]}-{area.bounds[2]} E, {area.bounds[1]}-{area.bounds[3]} N)" \
            if area is not None else ""
        raise refuse(f"{int(outside.sum())} of {len(lon)} vertices lie outside the area of use "
                     f"of {name}{where}: the coordinates are not in that CRS (x easting, y "
                     "northing, as CityJSON stores them); give the right one with source_crs=")
    points = np.column_stack([lon, lat])
    if datum != Datum.WGS84:
        points = coords_to_wgs84(points, datum)
    return np.column_stack([points, vertices[:, 2]])


# --- geometry ----------------------------------------------------------------------------------

def _lod(geometry: dict) -> tuple[int, str]:
    raw = str(geometry.get("lod", ""))
    try:
        return int(float(raw)), raw
    except ValueError:
        return 0, raw


def _surfaces(geometry: dict) -> tuple[list, list]:
    """The geometry's surfaces (each a list of rings of vertex indices) and each surface's
    semantic type (None without semantics). A Solid's outer shell only (inner shells are
    voids)."""
    boundaries = geometry.get("boundaries")
    semantics = geometry.get("semantics") or {}
    kinds = [s.get("type") if isinstance(s, dict) else None
             for s in semantics.get("surfaces") or []]
    values = semantics.get("values")
    if not isinstance(boundaries, list) or not boundaries:
        raise ValueError("has no boundaries")
    if geometry["type"] == "Solid":
        surfaces = boundaries[0]
        values = values[0] if isinstance(values, list) and values else None
    else:
        surfaces = boundaries
    types = []
    for k in range(len(surfaces)):
        index = values[k] if isinstance(values, list) and k < len(values) else None
        types.append(kinds[index] if isinstance(index, int) and 0 <= index < len(kinds)
                     else None)
    return surfaces, types


def _rings(surface: object, count: int) -> list[np.ndarray]:
    if not isinstance(surface, list) or not surface:
        raise ValueError("has a surface that is not a list of rings")
    rings = []
    for ring in surface:
        if not isinstance(ring, list) or len(ring) < 3 \
                or not all(isinstance(i, int) and 0 <= i < count for i in ring):
            raise ValueError("has a ring that is not 3 or more valid vertex indices")
        rings.append(np.asarray(ring, dtype=np.int64))
    return rings


def _metres(points: np.ndarray, lat0: float) -> np.ndarray:
    """lon/lat/h to local metres (for normals and extents only)."""
    scale = np.array([_METRES_PER_DEG * math.cos(math.radians(lat0)), _METRES_PER_DEG, 1.0])
    return (points - points[0]) * scale


def _normal(points: np.ndarray) -> np.ndarray:
    """Newell's normal of a ring (unnormalised)."""
    following = np.roll(points, -1, axis=0)
    return np.array([np.sum((points[:, 1] - following[:, 1]) * (points[:, 2] + following[:, 2])),
                     np.sum((points[:, 2] - following[:, 2]) * (points[:, 0] + following[:, 0])),
                     np.sum((points[:, 0] - following[:, 0]) * (points[:, 1] + following[:, 1]))])


def _roof_type(roofs: list[np.ndarray], lat0: float) -> str:
    """flat (no sloped roof plane), gable (two opposite slopes), hip (three or more slope
    directions), from the roof surfaces' normals."""
    directions = set()
    for ring in roofs:
        normal = _normal(_metres(ring, lat0))
        length = float(np.linalg.norm(normal))
        if length == 0:
            continue
        slope = math.degrees(math.acos(min(1.0, abs(normal[2]) / length)))
        if SLOPED_DEG < slope < 85.0:
            directions.add(round(math.degrees(math.atan2(normal[0], normal[1])) / 45.0) % 8)
    if not directions:
        return "flat"
    if len(directions) <= 2:
        return "gable"
    return "hip"


def _footprint(rings: list[list[np.ndarray]], types: list, xyz: np.ndarray) -> shapely.Polygon:
    ground = [surface for surface, kind in zip(rings, types, strict=True)
              if kind == "GroundSurface"]
    if not ground:
        tops = [float(xyz[surface[0], 2].max()) for surface in rings]
        ground = [rings[int(np.argmin(tops))]]
    polygons = [shapely.Polygon(xyz[surface[0], :2], [xyz[r, :2] for r in surface[1:]])
                for surface in ground]
    shape = shapely.make_valid(shapely.union_all(polygons))
    parts = [g for g in getattr(shape, "geoms", [shape]) if isinstance(g, shapely.Polygon)]
    if not parts or max(p.area for p in parts) <= 0:
        hull = shapely.MultiPoint(xyz[np.concatenate([r for s in rings for r in s]), :2])
        shape = hull.convex_hull
        parts = [shape] if isinstance(shape, shapely.Polygon) else []
    if not parts:
        raise ValueError("has no footprint (its ground surface has no area)")
    return shapely.geometry.polygon.orient(max(parts, key=lambda p: p.area), 1.0)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _building(key: str, obj: dict, parent: dict | None, xyz: np.ndarray
              ) -> CityBuilding | str:
    """A row, or the reason the object was left out."""
    geometries = [g for g in obj.get("geometry") or [] if isinstance(g, dict)]
    usable = [g for g in geometries if g.get("type") in GEOMETRY_TYPES and _lod(g)[0] in LODS]
    if not usable:
        found = ", ".join(sorted({f"{g.get('type')} LOD{g.get('lod')}" for g in geometries}))
        return (f"{obj['type']} '{key}': no LOD1/LOD2 Solid, MultiSurface or CompositeSurface "
                f"geometry (it has {found})")
    geometry = max(usable, key=lambda g: (_lod(g)[0], str(g.get("lod"))))
    try:
        surfaces, types = _surfaces(geometry)
        rings = [_rings(surface, len(xyz)) for surface in surfaces]
        if not rings:
            raise ValueError("has no surfaces")
        footprint = _footprint(rings, types, xyz)
    except (ValueError, TypeError, IndexError, shapely.errors.GEOSException) as error:
        return f"{obj['type']} '{key}': its LOD{geometry.get('lod')} geometry {error}"
    used = np.unique(np.concatenate([r for s in rings for r in s]))
    z = xyz[used, 2]
    low, high = float(z.min()), float(z.max())
    if not (HEIGHT_RANGE_M[0] <= low and high <= HEIGHT_RANGE_M[1]):
        return (f"{obj['type']} '{key}': heights {low:.1f}-{high:.1f} m are outside "
                f"{HEIGHT_RANGE_M[0]:.0f}-{HEIGHT_RANGE_M[1]:.0f} m (wrong units?)")
    lat0 = float(xyz[used, 1].mean())
    extent = _metres(xyz[used], lat0)[:, :2]
    if float(np.ptp(extent, axis=0).max()) > MAX_BUILDING_EXTENT_M:
        return (f"{obj['type']} '{key}': spans more than {MAX_BUILDING_EXTENT_M:.0f} m; "
                "not a building (wrong CRS or units?)")
    own, from_parent = obj.get("attributes"), (parent or {}).get("attributes")
    attributes: dict = own if isinstance(own, dict) else {}
    inherited: dict = from_parent if isinstance(from_parent, dict) else {}
    measured = _number(attributes.get("measuredHeight"))
    height = measured if measured and measured > 0 else high - low
    if height <= 0.1:
        return f"{obj['type']} '{key}': has no height (a flat geometry and no measuredHeight)"
    lod_number, lod_text = _lod(geometry)
    roof = attributes.get("roofType")
    roof_type = ROOF_CODES.get(str(roof)) if roof is not None else None
    if roof_type is None and str(roof).lower() in ROOF_TYPES:
        roof_type = str(roof).lower()
    if roof_type is None:
        roofs = [xyz[s[0]] for s, kind in zip(rings, types, strict=True) if kind == "RoofSurface"]
        if not roofs and lod_number == 2:
            roofs = [xyz[s[0]] for s in rings if float(xyz[s[0], 2].min()) > low + 0.5]
        roof_type = _roof_type(roofs, lat0) if lod_number == 2 else "flat"
    level = _number(attributes.get("cim_level"))
    cim = int(level) if level is not None and level == int(level) and 1 <= level <= 6 \
        else (3 if lod_number == 2 else 2)
    storeys = _number(attributes.get("storeysAboveGround", attributes.get("floors")))
    floors = int(storeys) if storeys is not None and 1 <= storeys < 500 \
        else max(1, round(height / 3.0))
    name = attributes.get("name") or attributes.get("名称") or inherited.get("name")
    use = attributes.get("use") or attributes.get("function") or attributes.get("usage") \
        or inherited.get("function") or "unknown"
    polygons = [shapely.Polygon(xyz[s[0]], [xyz[r] for r in s[1:]]) for s in rings]
    return CityBuilding(
        cityjson_id=key, name=None if name is None else str(name)[:200],
        use=str(use)[:USE_CHARS], height_m=round(float(height), 3), floors=floors,
        cim_level=cim, roof_type=roof_type, lod=lod_text, footprint=footprint,
        surfaces=shapely.MultiPolygon(polygons))


def convert(path: Path, declared: CRS | None, datum: Datum, limits: UploadSettings
            ) -> Converted:
    """The file's buildings in EPSG:4326; UploadRefused (400) with the reason otherwise."""
    document = read_document(path)
    crs = declared or file_crs(document)
    if crs is None:
        raise UploadRefused("source_crs: the CityJSON file names no CRS (metadata."
                            "referenceSystem); give it with source_crs=EPSG:… (CGCS2000 "
                            "Gauss-Krüger CM 105E: EPSG:4544, CM 108E: EPSG:4545; WGS84: "
                            "EPSG:4326); twin never guesses a CRS")
    objects = document["CityObjects"]
    wanted = {key: obj for key, obj in objects.items()
              if isinstance(obj, dict) and obj.get("type") in BUILDING_TYPES}
    if not wanted:
        kinds = Counter(str(o.get("type")) for o in objects.values() if isinstance(o, dict))
        held = ", ".join(f"{n} {k}" for k, n in kinds.most_common(5)) or "no city objects"
        raise refuse(f"the CityJSON holds no Building or BuildingPart ({held})")
    if len(wanted) > limits.max_features:
        raise refuse(f"{len(wanted)} buildings; an upload holds at most {limits.max_features} "
                     "(TWIN_UPLOADS_MAX_FEATURES)")
    xyz = _to_wgs84(_vertices(document), crs, datum)
    buildings, skipped = [], []
    for key, obj in wanted.items():
        parents = obj.get("parents") or []
        parent = objects.get(parents[0]) if parents and isinstance(parents[0], str) else None
        made = _building(key, obj, parent if isinstance(parent, dict) else None, xyz)
        if isinstance(made, str):
            # A Building whose parts carry the geometry has none of its own: not a loss.
            if not obj.get("geometry") and obj.get("children"):
                continue
            skipped.append(made)
        else:
            buildings.append(made)
    if not buildings:
        raise refuse("no building has usable LOD1/LOD2 geometry: " + "; ".join(skipped[:5]))
    _check_extent(buildings)
    return Converted(buildings, crs, str(document["version"]), skipped)


def _check_extent(buildings: list[CityBuilding]) -> None:
    west, south, east, north = MUNICIPALITY_BBOX
    bounds = shapely.bounds(np.array([b.footprint for b in buildings]))
    outside = (bounds[:, 0] < west) | (bounds[:, 2] > east) | (bounds[:, 1] < south) \
        | (bounds[:, 3] > north)
    if outside.any():
        first = buildings[int(np.flatnonzero(outside)[0])]
        x, y = first.footprint.centroid.x, first.footprint.centroid.y
        raise refuse(f"{int(outside.sum())} of {len(buildings)} buildings lie outside the "
                     f"municipality of Chongqing ({west}-{east} E, {south}-{north} N), e.g. "
                     f"'{first.cityjson_id}' at ({x:.5f}, {y:.5f}); check the CRS and datum")


# --- the table ---------------------------------------------------------------------------------

FIELDS = (("id", "bigint"), ("name", "text"), ("use", "character varying"),
          ("height_m", "double precision"), ("height", "double precision"),
          ("base_height", "double precision"), ("floors", "smallint"),
          ("cim_level", "smallint"), ("roof_type", "character varying"),
          ("district_code", "character varying"), ("street_code", "character varying"),
          ("cityjson_id", "text"), ("lod", "text"))

_CREATE = """
    CREATE TABLE "{table}" (
        id bigint PRIMARY KEY, name text, use varchar(16) NOT NULL,
        height_m double precision NOT NULL,
        height double precision GENERATED ALWAYS AS (height_m) STORED,
        base_height double precision NOT NULL DEFAULT 0, floors smallint NOT NULL,
        cim_level smallint NOT NULL CHECK (cim_level BETWEEN 1 AND 6),
        roof_type varchar(8) NOT NULL DEFAULT 'flat', district_code varchar(12),
        street_code varchar(12), cityjson_id text NOT NULL, lod text NOT NULL,
        geom geometry(Polygon, 4326) NOT NULL, surfaces geometry(MultiPolygonZ, 4326))
"""
_INSERT = """
    INSERT INTO "{table}" (id, name, use, height_m, floors, cim_level, roof_type, cityjson_id,
                           lod, geom, surfaces)
    VALUES (:id, :name, :use, :height_m, :floors, :cim_level, :roof_type, :cityjson_id, :lod,
            ST_GeomFromWKB(:geom, 4326), ST_GeomFromWKB(:surfaces, 4326))
"""
# District and street by the footprint (a point inside it), as the sample's buildings have them.
_CODES = """
    UPDATE "{table}" AS b
       SET district_code = (SELECT u.code FROM admin_units AS u WHERE u.level = 'district'
                              AND ST_Covers(u.geom, ST_PointOnSurface(b.geom))
                            ORDER BY u.code LIMIT 1),
           street_code = (SELECT u.code FROM admin_units AS u WHERE u.level = 'street'
                            AND ST_Covers(u.geom, ST_PointOnSurface(b.geom))
                          ORDER BY u.code LIMIT 1)
"""


def write_table(conn: Connection, table: str, buildings: list[CityBuilding]) -> None:
    conn.execute(text(_CREATE.format(table=table)))
    rows = [{"id": k, "name": b.name, "use": b.use, "height_m": b.height_m, "floors": b.floors,
             "cim_level": b.cim_level, "roof_type": b.roof_type, "cityjson_id": b.cityjson_id,
             "lod": b.lod, "geom": shapely.to_wkb(b.footprint),
             "surfaces": shapely.to_wkb(b.surfaces, output_dimension=3)}
            for k, b in enumerate(buildings, start=1)]
    conn.execute(text(_INSERT.format(table=table)), rows)
    conn.execute(text(_CODES.format(table=table)))
    conn.execute(text(f'CREATE INDEX "{table}_geom_idx" ON "{table}" USING gist (geom)'))


def build_version(conn: Connection, common: dict, source: Path, declared: CRS | None,
                  datum: Datum, limits: UploadSettings,
                  progress: Callable[[int, str], None]) -> Version:
    """The job's part: convert the file again and write the version's table (in the job's
    transaction); ``common`` is what every version of the job carries (layers/jobs.py)."""
    progress(20, "reading the CityJSON buildings")
    converted = convert(source, declared, datum, limits)
    progress(60, "writing the buildings table")
    table = table_name(common["layer_id"], common["version"])
    write_table(conn, table, converted.buildings)
    bbox = conn.execute(text(f'SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM '
                             f'(SELECT ST_Extent(geom) AS e FROM "{table}") AS x')).one()
    lods = converted.lods
    meta = {"tiles3d": "buildings", "lod": max(int(lod) for lod in lods), "lods": lods,
            "cityjson_version": converted.version}
    report = {"features": len(converted.buildings), "lods": lods,
              "source_crs": describe(converted.crs), "datum": datum.value,
              "cityjson_version": converted.version}
    if converted.skipped:
        report["skipped"] = converted.skipped[:50]
        report["warnings"] = [f"{len(converted.skipped)} city objects were left out (see "
                              "skipped)"]
    return Version(**common, source_crs=converted.crs.srs or converted.crs.to_wkt(),
                   source_crs_name=describe(converted.crs), geometry_type="Polygon",
                   fields=[{"name": n, "type": t} for n, t in FIELDS],
                   bbox=[float(v) for v in bbox], feature_count=len(converted.buildings),
                   table_name=table, meta=meta, report=report)
