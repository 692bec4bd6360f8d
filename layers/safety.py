"""Checks an uploaded file passes before GDAL, rasterio or any parser sees its contents.

Everything here looks at bytes (magic numbers, archive directories, XML prologues, glTF
headers); nothing opens the file with GDAL. A refusal raises ``UploadRefused`` (400),
``TooLarge`` (413) or ``UnsupportedFormat`` (415) with a reason a GIS person understands.
GDAL is only ever handed paths twin wrote itself, inside the job's own folder.
"""

from __future__ import annotations

import json
import re
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from twin.core.errors import InvalidParameter, TwinError
from twin.core.settings import UploadSettings


class UploadRefused(InvalidParameter):
    """The file is hostile, broken or not what its name says."""


class TooLarge(TwinError):
    status_code = 413


class UnsupportedFormat(TwinError):
    status_code = 415


# file suffix -> (format, layer kind)
FORMATS = {
    ".geojson": ("geojson", "vector"), ".json": ("geojson", "vector"),
    ".zip": ("shapefile", "vector"), ".gpkg": ("gpkg", "vector"),
    ".kml": ("kml", "vector"), ".kmz": ("kmz", "vector"), ".csv": ("csv", "vector"),
    ".tif": ("geotiff", "raster"), ".tiff": ("geotiff", "raster"),
    ".glb": ("glb", "3d"), ".gltf": ("gltf", "3d"),
}
SHAPEFILE_PARTS = (".shp", ".shx", ".dbf")
# Members a zipped Shapefile may hold; anything else (another archive, a VRT...) is refused.
SHAPEFILE_MEMBERS = {".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".xml",
                     ".qmd", ".txt", ".fix", ".aih", ".ain", ".atx", ".ixs", ".mxs", ".qpj"}
# Ratios are only judged past this size: a tiny, very repetitive member is no bomb.
RATIO_FLOOR_BYTES = 1024 * 1024
GDAL_VIRTUAL = re.compile(r"/vsi[a-z0-9_]+/|<VRTDataset|\bvrt://", re.IGNORECASE)
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
TEXT_FORMATS = {"geojson", "kml", "csv", "gltf", "cityjson"}
# CityJSON: named .city.json, or a .json file whose head says "type": "CityJSON" (or holds
# its "CityObjects").
CITYJSON_SUFFIX = ".city.json"
CITYJSON_TYPE = re.compile(rb'"type"\s*:\s*"CityJSON"|"CityObjects"\s*:')
SQLITE_MAGIC = b"SQLite format 3\x00"
# Top-level glTF 2.0 properties that are arrays of objects.
GLTF_ARRAYS = ("accessors", "animations", "buffers", "bufferViews", "cameras", "images",
               "materials", "meshes", "nodes", "samplers", "scenes", "skins", "textures")
GPKG_APPLICATION_ID = 0x47504B47  # "GPKG", at byte 68 of the SQLite header


@dataclass(frozen=True)
class Inspected:
    format: str
    kind: str
    # Archives: the members to extract (already checked) and the main one GDAL opens.
    members: tuple[str, ...] = ()
    main_member: str | None = None
    notes: list[str] = field(default_factory=list)


def format_of(file_name: str) -> tuple[str, str]:
    if file_name.lower().endswith(CITYJSON_SUFFIX):
        return "cityjson", "vector"
    suffix = PurePosixPath(file_name.lower()).suffix
    if suffix not in FORMATS:
        allowed = ", ".join(sorted([*FORMATS, CITYJSON_SUFFIX]))
        raise UnsupportedFormat(f"file: '{file_name}' is not a format twin reads; "
                                f"allowed suffixes: {allowed} (a Shapefile goes in a .zip)")
    return FORMATS[suffix]


def check_size(size: int, limits: UploadSettings) -> None:
    if size > limits.max_file_bytes:
        raise TooLarge(f"file: {size} bytes is over the upload limit of "
                       f"{limits.max_file_bytes} bytes (TWIN_UPLOADS_MAX_FILE_BYTES)")
    if size == 0:
        raise UploadRefused("file: the file is empty")


def inspect(path: Path, file_name: str, limits: UploadSettings, layer: str | None = None
            ) -> Inspected:
    """Refuse ``path`` (uploaded as ``file_name``) unless it is what it claims and within limits."""
    fmt, kind = format_of(file_name)
    check_size(path.stat().st_size, limits)
    head = _head(path, 4096)
    # Text formats only: binary formats are checked by their magic numbers instead.
    if fmt in TEXT_FORMATS and GDAL_VIRTUAL.search(head.decode("latin-1")):
        raise UploadRefused("file: contains a GDAL virtual path or VRT definition "
                            "(/vsi…/, <VRTDataset>); twin reads real files only")
    check = _CHECKS[fmt]
    return check(path, head, limits, layer)


def _head(path: Path, size: int) -> bytes:
    with path.open("rb") as stream:
        return stream.read(size)


# --- per format -------------------------------------------------------------------------

def _check_json(path: Path, head: bytes, limits: UploadSettings, layer: str | None) -> Inspected:
    if not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        raise UploadRefused("file: a GeoJSON file must hold a JSON object "
                            "(a FeatureCollection, Feature or geometry)")
    if CITYJSON_TYPE.search(head):
        return Inspected("cityjson", "vector")
    return Inspected("geojson", "vector")


def _check_cityjson(path: Path, head: bytes, limits: UploadSettings, layer: str | None
                    ) -> Inspected:
    if not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        raise UploadRefused("file: a CityJSON file must hold a JSON object "
                            '({"type": "CityJSON", ...})')
    return Inspected("cityjson", "vector")


def _check_gpkg(path: Path, head: bytes, limits: UploadSettings, layer: str | None) -> Inspected:
    if not head.startswith(SQLITE_MAGIC) or len(head) < 72:
        raise UploadRefused("file: not a GeoPackage (no SQLite header)")
    application_id = struct.unpack(">I", head[68:72])[0]
    if application_id != GPKG_APPLICATION_ID:
        raise UploadRefused("file: a SQLite database but not a GeoPackage "
                            "(application_id is not 'GPKG')")
    return Inspected("gpkg", "vector")


def _check_csv(path: Path, head: bytes, limits: UploadSettings, layer: str | None) -> Inspected:
    if b"\x00" in head:
        raise UploadRefused("file: a CSV file must be text; this one holds binary data")
    return Inspected("csv", "vector")


def check_kml_text(text: bytes) -> None:
    """KML never needs a DTD: a DOCTYPE or ENTITY is an XXE attempt; NetworkLink fetches URLs."""
    lowered = text.lower()
    if b"<!doctype" in lowered or b"<!entity" in lowered:
        raise UploadRefused("file: KML with a DOCTYPE/ENTITY declaration (external entities "
                            "are refused)")
    if b"<networklink" in lowered:
        raise UploadRefused("file: KML with a NetworkLink (links to other documents are "
                            "refused; upload the linked data itself)")
    if b"<kml" not in lowered:
        raise UploadRefused("file: not a KML document (no <kml> element)")


def _check_kml(path: Path, head: bytes, limits: UploadSettings, layer: str | None) -> Inspected:
    check_kml_text(path.read_bytes())
    return Inspected("kml", "vector")


def _check_tiff(path: Path, head: bytes, limits: UploadSettings, layer: str | None) -> Inspected:
    if not head.startswith(TIFF_MAGICS):
        what = "XML (a GDAL VRT?)" if head.lstrip().startswith(b"<") else "not a TIFF"
        raise UploadRefused(f"file: named .tif but the content is {what}; "
                            "only real GeoTIFF files are read")
    return Inspected("geotiff", "raster")


def _check_glb(path: Path, head: bytes, limits: UploadSettings, layer: str | None) -> Inspected:
    data = path.read_bytes()
    if len(data) < 20 or data[:4] != b"glTF":
        raise UploadRefused("file: not a GLB file (no 'glTF' magic)")
    version, length = struct.unpack("<II", data[4:12])
    if version != 2:
        raise UploadRefused(f"file: glTF container version {version}; only glTF 2.0 is read")
    if length != len(data):
        raise UploadRefused(f"file: GLB header says {length} bytes but the file has "
                            f"{len(data)} (truncated or padded)")
    chunk_length, chunk_type = struct.unpack("<II", data[12:20])
    if chunk_type != 0x4E4F534A or 20 + chunk_length > len(data):
        raise UploadRefused("file: the first GLB chunk must be the JSON chunk")
    check_gltf_json(data[20:20 + chunk_length], embedded_buffer=True)
    return Inspected("glb", "3d")


def _check_gltf(path: Path, head: bytes, limits: UploadSettings, layer: str | None
                ) -> Inspected:
    check_gltf_json(path.read_bytes(), embedded_buffer=False)
    return Inspected("gltf", "3d")


def check_gltf_json(raw: bytes, embedded_buffer: bool) -> dict:
    try:
        document = json.loads(raw.decode("utf-8").rstrip(" \x00"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UploadRefused(f"file: the glTF JSON does not parse ({error})") from None
    if not isinstance(document, dict):
        raise UploadRefused("file: the glTF JSON must be an object")
    # The glTF 2.0 schema's shapes, checked before anything reads the document.
    if not isinstance(document.get("asset"), dict):
        raise UploadRefused("file: glTF 'asset' must be an object with a 'version'")
    for kind in GLTF_ARRAYS:
        items = document.get(kind)
        if items is not None and not (isinstance(items, list)
                                      and all(isinstance(item, dict) for item in items)):
            raise UploadRefused(f"file: glTF '{kind}' must be an array of objects")
    version = str(document["asset"].get("version", ""))
    if not version.startswith("2."):
        raise UploadRefused(f"file: glTF asset.version is {version or 'missing'}; "
                            "only glTF 2.0 is read")
    for kind in ("buffers", "images"):
        for i, item in enumerate(document.get(kind) or []):
            uri = item.get("uri")
            if uri is None:
                if kind == "buffers" and not (embedded_buffer and i == 0):
                    raise UploadRefused(f"file: glTF {kind}[{i}] has no uri and no GLB chunk")
            elif not str(uri).startswith("data:"):
                raise UploadRefused(f"file: glTF {kind}[{i}] refers to an external file "
                                    f"({str(uri)[:60]!r}); pack the model as one .glb")
    return document


# --- archives ----------------------------------------------------------------------------

def _zip_members(path: Path, limits: UploadSettings) -> list[zipfile.ZipInfo]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UploadRefused("file: not a readable ZIP archive") from None
    with archive:
        infos = archive.infolist()
    if len(infos) > limits.max_archive_members:
        raise TooLarge(f"file: the archive has {len(infos)} members; the limit is "
                       f"{limits.max_archive_members} (TWIN_UPLOADS_MAX_ARCHIVE_MEMBERS)")
    total = 0
    for info in infos:
        _check_member(info, limits)
        total += info.file_size
    if total > limits.max_uncompressed_bytes:
        raise TooLarge(f"file: the archive unpacks to {total} bytes; the limit is "
                       f"{limits.max_uncompressed_bytes} (TWIN_UPLOADS_MAX_UNCOMPRESSED_BYTES)")
    return [info for info in infos if not info.is_dir() and not _is_noise(info.filename)]


def _check_member(info: zipfile.ZipInfo, limits: UploadSettings) -> None:
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise UploadRefused(f"file: archive member '{name}' has an absolute path or '..' "
                            "(zip slip); refused")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UploadRefused(f"file: archive member '{name}' is a symbolic link; refused")
    if info.flag_bits & 0x1:
        raise UploadRefused(f"file: archive member '{name}' is encrypted")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_FLOOR_BYTES and ratio > limits.max_compression_ratio:
        raise TooLarge(f"file: archive member '{name}' expands {ratio:.0f}:1 (a zip bomb?); "
                       f"the limit is {limits.max_compression_ratio:.0f}:1")


def _is_noise(name: str) -> bool:
    # macOS Finder adds these; they are never data.
    return name.startswith("__MACOSX/") or PurePosixPath(name).name.startswith("._")


def _check_shapefile_zip(path: Path, head: bytes, limits: UploadSettings, layer: str | None
                         ) -> Inspected:
    members = _zip_members(path, limits)
    for info in members:
        suffix = PurePosixPath(info.filename.lower()).suffix
        if suffix not in SHAPEFILE_MEMBERS:
            raise UploadRefused(f"file: archive member '{info.filename}' is not part of a "
                                f"Shapefile; allowed: {', '.join(sorted(SHAPEFILE_MEMBERS))}")
    names = [info.filename for info in members]
    shps = [name for name in names if name.lower().endswith(".shp")]
    if not shps:
        raise UploadRefused("file: the archive holds no .shp file (non-spatial or empty)")
    stems = {name[:-4]: name for name in shps}
    if len(shps) > 1:
        choice = {PurePosixPath(stem).name: name for stem, name in stems.items()}
        if layer not in choice:
            raise UploadRefused(f"layer: the archive holds {len(shps)} Shapefiles; choose one "
                                f"with layer= ({', '.join(sorted(choice))})")
        main = choice[layer]
    else:
        main = shps[0]
    lowered = {name.lower() for name in names}
    for part in SHAPEFILE_PARTS:
        if (main[:-4] + part).lower() not in lowered:
            raise UploadRefused(f"file: the Shapefile '{PurePosixPath(main).name}' has no "
                                f"{part} beside it")
    stem = main[:-4].lower()
    keep = tuple(name for name in names if name.lower().rsplit(".", 1)[0] == stem)
    return Inspected("shapefile", "vector", keep, main)


def _check_kmz(path: Path, head: bytes, limits: UploadSettings, layer: str | None
               ) -> Inspected:
    members = _zip_members(path, limits)
    kmls = [info for info in members if info.filename.lower().endswith(".kml")]
    if not kmls:
        raise UploadRefused("file: the KMZ archive holds no .kml document")
    main = next((info for info in kmls if info.filename.lower() == "doc.kml"), kmls[0])
    with zipfile.ZipFile(path) as archive, archive.open(main) as stream:
        check_kml_text(stream.read(limits.max_uncompressed_bytes + 1))
    return Inspected("kmz", "vector", (main.filename,), main.filename)


_CHECKS = {
    "geojson": _check_json, "gpkg": _check_gpkg, "csv": _check_csv, "kml": _check_kml,
    "kmz": _check_kmz, "shapefile": _check_shapefile_zip, "geotiff": _check_tiff,
    "glb": _check_glb, "gltf": _check_gltf, "cityjson": _check_cityjson,
}


def extract(path: Path, members: tuple[str, ...], out_dir: Path,
            limits: UploadSettings) -> dict[str, Path]:
    """Unpack checked members flat into ``out_dir``, never trusting the sizes they declare."""
    out: dict[str, Path] = {}
    budget = limits.max_uncompressed_bytes
    with zipfile.ZipFile(path) as archive:
        for name in members:
            target = out_dir / PurePosixPath(name.replace("\\", "/")).name
            with archive.open(name) as source, target.open("wb") as sink:
                while chunk := source.read(1024 * 1024):
                    budget -= len(chunk)
                    if budget < 0:
                        raise TooLarge("file: the archive unpacks to more than "
                                       f"{limits.max_uncompressed_bytes} bytes")
                    sink.write(chunk)
            out[name] = target
    return out
