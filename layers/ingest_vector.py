"""Vector uploads: read a checked file, place it in EPSG:4326, clean it, write its own table.

``plan`` runs in the request (so an ambiguous file gets a 400 at once); ``read_frame`` and
``write_table`` run in the background job, inside the transaction that publishes the version.
"""

from __future__ import annotations

import struct
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pyogrio.errors
import shapely
from pyproj import CRS
from sqlalchemy import Connection, text

from layers import crs as crs_mod
from layers.crs import SourceError
from layers.safety import TooLarge, UploadRefused
from twin.core.settings import UploadSettings

# GDAL never reaches the network from an upload (pyogrio's bundled GDAL).
pyogrio.set_gdal_config_options({
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".twin-no-network",
    "GDAL_HTTP_MAX_RETRY": "0", "GDAL_HTTP_TIMEOUT": "1",
})

FAMILIES = {"Point": "Point", "MultiPoint": "Point", "LineString": "LineString",
            "MultiLineString": "LineString", "Polygon": "Polygon", "MultiPolygon": "Polygon",
            "LinearRing": "LineString"}
MULTI = {"Point": "MultiPoint", "LineString": "MultiLineString", "Polygon": "MultiPolygon"}
LON_NAMES = ("lon", "lng", "long", "longitude", "经度", "x")
LAT_NAMES = ("lat", "latitude", "纬度", "y")
RESERVED = {"id", "geom"}
# PostgreSQL's limit of columns per table, less the id and geometry columns.
MAX_ATTRIBUTES = 1600 - 2
# Longest column name PostgreSQL keeps (NAMEDATALEN - 1, in bytes); longer ones it truncates.
MAX_NAME_BYTES = 63
COPY_BATCH_ROWS = 20_000
COPY_SPECIALS = r"[\\\t\n\r\x00]"
READ_ERRORS = (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError,
               pyogrio.errors.FeatureError, pyogrio.errors.FieldError,
               pyogrio.errors.GeometryError)


@dataclass
class VectorResult:
    geometry_type: str
    fields: list[dict]
    bbox: list[float]
    feature_count: int
    report: dict = field(default_factory=dict)


# --- which layer (in the request) --------------------------------------------------------

def plan_layer(path: Path, fmt: str, layer: str | None) -> str | None:
    """The layer to read from a multi-layer file; several without ``layer`` is a 400."""
    if fmt not in ("gpkg", "kml", "kmz"):
        return layer
    try:
        listed = pyogrio.list_layers(path)
    except Exception as error:  # noqa: BLE001 - GDAL's message is the useful part
        message = str(error).replace(str(path), path.name).replace(str(path.parent) + "/", "")
        raise UploadRefused(f"file: cannot be opened as {fmt.upper()} ({message})") from None
    names = [str(name) for name, geometry_type in listed if geometry_type is not None]
    if not names:
        raise UploadRefused(f"file: the {fmt.upper()} holds no spatial layer (non-spatial "
                            "or empty)")
    if layer is not None:
        if layer not in names:
            raise UploadRefused(f"layer: no spatial layer '{layer}' in the file; "
                                f"layers: {', '.join(names)}")
        return layer
    if len(names) > 1:
        raise UploadRefused(f"layer: the file holds {len(names)} layers; choose one with "
                            f"layer= ({', '.join(names)})")
    return names[0]


# Formats that store their feature count (Shapefile header, GeoPackage's gpkg_ogr_contents),
# so the limit is checked in the request; others are counted when the job reads them.
COUNTED_FORMATS = ("shapefile", "gpkg")


def check_feature_count(path: Path, fmt: str, layer: str | None, limits: UploadSettings
                        ) -> None:
    """413 at once when a file's own feature count is over the limit."""
    if fmt not in COUNTED_FORMATS:
        return
    try:
        count = pyogrio.read_info(path, layer=layer)["features"]
    except READ_ERRORS as error:
        message = str(error).replace(str(path.parent) + "/", "")
        raise UploadRefused(f"file: cannot be opened as {fmt} ({message})") from None
    if count > limits.max_features:
        raise TooLarge(f"file: {count} features is over the limit of {limits.max_features} "
                       "(TWIN_UPLOADS_MAX_FEATURES)")


# --- reading (in the job) ----------------------------------------------------------------

def read_frame(path: Path, fmt: str, layer: str | None, declared: CRS | None,
               limits: UploadSettings) -> tuple[gpd.GeoDataFrame, CRS, dict]:
    """The features in the file's CRS, the CRS they are in, and notes for the report."""
    if fmt == "csv":
        return _read_csv(path, declared, limits)
    notes: dict = {}
    kwargs: dict = {"layer": layer} if layer else {}
    if fmt == "shapefile":
        kwargs["encoding"] = notes["encoding"] = shapefile_encoding(path)
    try:
        info = pyogrio.read_info(path, **kwargs)
        _check_count(info["features"], limits)
        try:
            frame = pyogrio.read_dataframe(path, **kwargs)
        except shapely.errors.GEOSException:
            frame, notes["malformed_geometries"] = _read_malformed(path, kwargs)
        frame = _declared_dtypes(frame, info)
    except READ_ERRORS as error:
        # GDAL's message, without the server's folder names.
        message = str(error).replace(str(path.parent) + "/", "")
        raise SourceError(f"the {fmt.upper()} file cannot be read: {message}") from None
    file_crs = CRS.from_user_input(frame.crs) if frame.crs is not None else None
    missing = f"the {fmt.upper()} file names no CRS and no source_crs was given"
    if fmt == "shapefile":
        has_prj = any(p.suffix.lower() == ".prj" for p in path.parent.iterdir())
        missing = ("the Shapefile's .prj names no CRS GDAL knows; give source_crs"
                   if has_prj else "no .prj in the Shapefile and no source_crs given")
    return frame, crs_mod.choose_crs(file_crs, declared, missing), notes


def _read_malformed(path: Path, kwargs: dict) -> tuple[gpd.GeoDataFrame, dict]:
    """Read a file some of whose geometries GEOS refuses (a line of one point, a ring that
    is not closed): those repair can close are kept, the others have no geometry."""
    meta, _, wkb, _ = pyogrio.raw.read(path, columns=[], **kwargs)
    attributes = pyogrio.read_dataframe(path, read_geometry=False, **kwargs)
    strict = shapely.from_wkb(wkb, on_invalid="ignore")
    geoms = shapely.from_wkb(wkb, on_invalid="fix")
    malformed = np.flatnonzero(pd.notna(wkb) & pd.isna(strict))
    repaired = int(pd.notna(geoms[malformed]).sum())
    first = int(malformed[0]) + 1
    if pd.isna(geoms).all():
        raise SourceError(f"no geometry can be read: {len(malformed)} are malformed (a line "
                          f"of one point, a polygon ring that is not closed or has under 4 "
                          f"points); first: feature {first}")
    frame = gpd.GeoDataFrame(attributes, geometry=geoms, crs=meta["crs"])
    return frame, {"count": len(malformed), "repaired": repaired,
                   "dropped": len(malformed) - repaired, "first_feature": first}


def _declared_dtypes(frame: gpd.GeoDataFrame, info: dict) -> gpd.GeoDataFrame:
    """Integer and boolean fields with NULLs come back as floats: give them their own type."""
    for name, dtype in zip(info["fields"], info["dtypes"], strict=True):
        if name not in frame.columns or not pd.api.types.is_float_dtype(frame[name].dtype):
            continue
        if dtype.startswith("int"):
            frame[name] = frame[name].astype("Int64")
        elif dtype == "bool":
            frame[name] = frame[name].astype("boolean")
    return frame


def _check_count(count: int, limits: UploadSettings) -> None:
    if count > limits.max_features:
        raise SourceError(f"{count} features is over the limit of {limits.max_features} "
                          "(TWIN_UPLOADS_MAX_FEATURES)")
    if count == 0:
        raise SourceError("the file holds no features")


def shapefile_encoding(shp: Path) -> str:
    """The .cpg's encoding, else the first of UTF-8 and GB18030 that decodes every text byte."""
    cpg = shp.with_suffix(".cpg")
    if not cpg.exists():
        cpg = next((p for p in shp.parent.iterdir() if p.suffix.lower() == ".cpg"), cpg)
    if cpg.exists():
        declared = cpg.read_text("ascii", errors="replace").strip()
        name = "cp" + declared if declared.isdigit() else declared
        name = {"cp65001": "utf-8", "cp936": "gbk"}.get(name.lower(), name)
        try:
            "".encode(name)
            return name
        except LookupError:
            raise SourceError(f"the .cpg names an unknown encoding {declared!r}") from None
    text_bytes = _dbf_text_bytes(next(p for p in shp.parent.iterdir()
                                      if p.suffix.lower() == ".dbf"))
    for encoding in ("utf-8", "gb18030"):
        try:
            text_bytes.decode(encoding)
            return encoding
        except UnicodeDecodeError:
            continue
    return "latin-1"


def _dbf_text_bytes(dbf: Path) -> bytes:
    """Field names and record bytes of a dBase file (what an encoding applies to)."""
    data = dbf.read_bytes()
    header_length = int.from_bytes(data[8:10], "little")
    names = b"".join(data[offset:offset + 11].rstrip(b"\x00")
                     for offset in range(32, header_length - 1, 32))
    return names + data[header_length:]


def _read_csv(path: Path, declared: CRS | None, limits: UploadSettings
              ) -> tuple[gpd.GeoDataFrame, CRS, dict]:
    raw = path.read_bytes()
    encoding = "utf-8-sig"
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        encoding = "gb18030"
        try:
            raw.decode(encoding)
        except UnicodeDecodeError as error:
            line = raw.count(b"\n", 0, error.start) + 1
            raise SourceError(f"the CSV is neither UTF-8 nor GB18030 text (byte "
                              f"{raw[error.start]:#04x} on line {line} is neither); save it "
                              "as UTF-8") from None
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
    except pd.errors.EmptyDataError:
        raise SourceError("the CSV holds no header line (no columns)") from None
    except pd.errors.ParserError as error:
        # pandas names the line and the problem ("Expected 3 fields in line 3, saw 4").
        message = str(error).removeprefix("Error tokenizing data. C error: ").strip()
        raise SourceError(f"the CSV cannot be read: {message}") from None
    _check_count(len(table), limits)
    lon_col, lat_col = _coordinate_columns(table.columns)
    xs, ys = _numbers(table, lon_col), _numbers(table, lat_col)
    projected = lon_col.strip().lower() == "x"
    if projected and declared is None:
        raise crs_mod.MissingCrs(f"the CSV has x/y columns ({lon_col}, {lat_col}) and no "
                                 "source_crs; give source_crs (e.g. EPSG:4524), or name the "
                                 "columns lon/lat")
    frame = gpd.GeoDataFrame(table.drop(columns=[lon_col, lat_col]),
                             geometry=gpd.points_from_xy(xs, ys))
    crs = declared or crs_mod.WGS84
    return frame, crs, {"encoding": encoding, "coordinates": [lon_col, lat_col]}


def _coordinate_columns(columns) -> tuple[str, str]:
    by_name = {str(column).strip().lower(): column for column in columns}
    for lon_names, lat_names in ((LON_NAMES[:-1], LAT_NAMES[:-1]), (("x",), ("y",))):
        lon = next((by_name[n] for n in lon_names if n in by_name), None)
        lat = next((by_name[n] for n in lat_names if n in by_name), None)
        if lon is not None and lat is not None:
            return lon, lat
    separator = next((name for sep, name in ((";", "semicolons"), ("\t", "tabs"))
                      if len(columns) == 1 and sep in str(columns[0])), None)
    hint = f" (the header is separated by {separator}; save the CSV comma-separated)" \
        if separator else ""
    raise SourceError(f"the CSV has no coordinate columns: expected lon/lat (or lng, "
                      f"longitude/latitude, 经度/纬度) or x/y; columns are "
                      f"{', '.join(map(str, columns))}{hint}")


def _numbers(table: pd.DataFrame, column: str) -> np.ndarray:
    values = pd.to_numeric(table[column].str.strip(), errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy() | ~np.isfinite(values.to_numpy()))
    if len(bad):
        first = int(bad[0])
        raise SourceError(f"column {column} has {len(bad)} non-numeric values, first at row "
                          f"{first + 1} ({table[column].iloc[first]!r})")
    return values.to_numpy(dtype=float)


# --- cleaning ----------------------------------------------------------------------------

def clean(frame: gpd.GeoDataFrame) -> tuple[gpd.GeoDataFrame, str, dict]:
    """Drop empty geometries, make invalid ones valid, and settle one geometry type."""
    geoms = frame.geometry.values
    if shapely.has_z(geoms).any():
        geoms = shapely.force_2d(geoms)
    missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
    types = Counter(shapely.get_type_id(geoms[~missing]).tolist())
    names = {i: name for name, i in _TYPE_IDS.items()}
    families = {FAMILIES.get(names.get(t, ""), "other") for t in types}
    if "other" in families:
        raise SourceError("geometry collections cannot be published; split them by type first")
    if len(families) > 1:
        found = ", ".join(f"{names[t]} ({n})" for t, n in sorted(types.items()))
        raise SourceError(f"mixed geometry types: {found}; upload one geometry type per layer "
                          "(or choose a layer with layer=)")
    if not families:
        raise SourceError("no feature has a geometry (non-spatial or empty data)")
    family = families.pop()
    invalid = ~missing & ~shapely.is_valid(geoms)
    fixed_geoms, dropped_invalid = _make_valid(geoms, invalid, family)
    keep = ~missing & ~dropped_invalid
    fixed_geoms = fixed_geoms[keep]
    # Repairs can turn a polygon into a multipolygon, so decide on the repaired geometries.
    multi = bool(np.isin(shapely.get_type_id(fixed_geoms), [4, 5, 6]).any())
    geometry_type = MULTI[family] if multi else family
    if multi:
        fixed_geoms = _as_multi(fixed_geoms, family)
    out = frame.loc[keep].copy()
    out["geometry"] = fixed_geoms
    report = {"fixed": int(invalid.sum() - dropped_invalid.sum()),
              "dropped": int(missing.sum() + dropped_invalid.sum()),
              "dropped_reasons": _drop_reasons(int(missing.sum()), int(dropped_invalid.sum()),
                                               family)}
    return gpd.GeoDataFrame(out, geometry="geometry", crs=frame.crs), geometry_type, report


_TYPE_IDS = {"Point": 0, "LineString": 1, "LinearRing": 2, "Polygon": 3, "MultiPoint": 4,
             "MultiLineString": 5, "MultiPolygon": 6, "GeometryCollection": 7}


def _make_valid(geoms: np.ndarray, invalid: np.ndarray, family: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """make_valid, keeping only parts of the layer's own family; nothing left = dropped."""
    out = geoms.copy()
    dropped = np.zeros(len(geoms), dtype=bool)
    for i in np.flatnonzero(invalid):
        repaired = shapely.make_valid(geoms[i])
        parts = [part for part in shapely.get_parts(repaired)
                 if FAMILIES.get(part.geom_type) == family and not part.is_empty]
        if not parts:
            dropped[i] = True
        elif len(parts) == 1:
            out[i] = parts[0]
        else:
            out[i] = shapely.union_all(parts) if family == "Polygon" else \
                shapely.multilinestrings(parts) if family == "LineString" else \
                shapely.multipoints(parts)
    return out, dropped


def _as_multi(geoms: np.ndarray, family: str) -> np.ndarray:
    make = {"Point": shapely.multipoints, "LineString": shapely.multilinestrings,
            "Polygon": shapely.multipolygons}[family]
    single = shapely.get_type_id(geoms) == _TYPE_IDS[family]
    out = geoms.copy()
    for i in np.flatnonzero(single):
        out[i] = make([geoms[i]])
    return out


def _drop_reasons(missing: int, collapsed: int, family: str) -> list[str]:
    reasons = []
    if missing:
        reasons.append(f"{missing} features have no geometry")
    if collapsed:
        reasons.append(f"{collapsed} invalid geometries have no {family.lower()} left "
                       "after repair (collapsed)")
    return reasons


# --- columns -----------------------------------------------------------------------------

def column_names(names: list[str]) -> list[str]:
    """PostgreSQL-safe, readable names: Chinese kept, at most 63 bytes, unique, not id/geom."""
    out: list[str] = []
    taken: set[str] = set()
    for i, raw in enumerate(names):
        name = unicodedata.normalize("NFC", str(raw)).strip().lower()
        name = "".join(c if c.isalnum() or c == "_" else "_" for c in name).strip("_")
        name = _fit(name, 60) or f"field_{i + 1}"
        if name in RESERVED:
            name += "_src"
        base, n = name, 2
        while name in taken:
            # The suffix must survive PostgreSQL's truncation to 63 bytes.
            suffix = f"_{n}"
            name, n = _fit(base, MAX_NAME_BYTES - len(suffix)) + suffix, n + 1
        out.append(name)
        taken.add(name)
    return out


def _fit(name: str, max_bytes: int) -> str:
    while len(name.encode()) > max_bytes:
        name = name[:-1]
    return name


def _column_type(series: pd.Series) -> str:
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "boolean"
    if pd.api.types.is_integer_dtype(dtype):
        return "bigint"
    if pd.api.types.is_float_dtype(dtype):
        return "double precision"
    if isinstance(dtype, pd.DatetimeTZDtype):
        return "timestamp with time zone"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "timestamp without time zone"
    return "text"


def _copy_text(series: pd.Series, column_type: str) -> pd.Series:
    """One column in COPY text format, vectorised (``\\N`` is NULL; text escaped)."""
    missing = series.isna().to_numpy()
    if column_type == "boolean":
        out = series.map({True: "t", False: "f"}).astype(object)
    elif column_type == "text":
        out = series.astype(object).where(~missing, "").astype(str)
        # PostgreSQL text cannot hold NUL; COPY text format escapes \\, tab, newline, CR.
        if out.str.contains(COPY_SPECIALS, regex=True).any():
            for raw, escaped in (("\x00", ""), ("\\", "\\\\"), ("\t", "\\t"),
                                 ("\n", "\\n"), ("\r", "\\r")):
                out = out.str.replace(raw, escaped, regex=False)
    elif column_type.startswith("timestamp"):
        out = series.dt.strftime("%Y-%m-%dT%H:%M:%S.%f%z") if column_type.endswith("zone") \
            else series.dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
    else:
        out = series.astype(object).where(~missing, 0).astype(str)
    out = out.astype(object)
    out[missing] = "\\N"
    return out.reset_index(drop=True)


# --- the table ---------------------------------------------------------------------------

def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def ewkb_hex(geoms: np.ndarray, srid: int = 4326) -> list[str]:
    """Hex EWKB with the SRID, as COPY into a ``geometry(…, 4326)`` column wants it.

    shapely's binary WKB with the SRID flag and value spliced in by hand: about 30% faster
    than its hex EWKB writer (0.2 s against 0.3 s for 100,000 points).
    """
    srid_bytes = struct.pack("<I", srid)
    out = []
    for wkb in shapely.to_wkb(geoms, byte_order=1):
        kind = struct.unpack_from("<I", wkb, 1)[0] | 0x20000000
        out.append((wkb[:1] + struct.pack("<I", kind) + srid_bytes + wkb[5:]).hex())
    return out


def write_table(conn: Connection, table: str, frame: gpd.GeoDataFrame, geometry_type: str
                ) -> list[dict]:
    """CREATE the version's table and COPY the rows in; returns the layer's fields."""
    attributes = [c for c in frame.columns if c != frame.geometry.name]
    if len(attributes) > MAX_ATTRIBUTES:
        raise SourceError(f"the file has {len(attributes)} attribute fields; a layer holds at "
                          f"most {MAX_ATTRIBUTES} (drop the fields the map does not need)")
    names = column_names(attributes)
    types = [_column_type(frame[c]) for c in attributes]
    declared = "".join(f", {quote(n)} {t}" for n, t in zip(names, types, strict=True))
    conn.execute(text(f"CREATE TABLE {quote(table)} (id bigint PRIMARY KEY, "
                      f"geom geometry({geometry_type}, 4326) NOT NULL{declared})"))
    columns = [pd.Series(np.arange(1, len(frame) + 1).astype(str)),
               pd.Series(ewkb_hex(frame.geometry.values))]
    columns += [_copy_text(frame[c], t) for c, t in zip(attributes, types, strict=True)]
    rows = columns[0].str.cat(columns[1:], sep="\t") if len(columns) > 1 else columns[0]
    target = ", ".join(quote(n) for n in ["id", "geom", *names])
    driver = conn.connection.driver_connection
    assert driver is not None  # a checked-out connection always has its driver's
    with driver.cursor() as cursor:
        with cursor.copy(f"COPY {quote(table)} ({target}) FROM STDIN") as copy:
            for start in range(0, len(rows), COPY_BATCH_ROWS):
                copy.write(("\n".join(rows.iloc[start:start + COPY_BATCH_ROWS]) + "\n").encode())
    conn.execute(text(f"CREATE INDEX {quote(table + '_geom_idx')} ON {quote(table)} "
                      "USING gist (geom)"))
    fields = [{"name": "id", "type": "bigint"}]
    fields += [{"name": n, "type": t, "source": str(a)}
               for n, t, a in zip(names, types, attributes, strict=True)]
    return fields


def table_bbox(conn: Connection, table: str) -> list[float]:
    row = conn.execute(text(f"SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) "
                            f"FROM (SELECT ST_Extent(geom) AS e FROM {quote(table)}) AS x")).one()
    return [float(v) for v in row]
