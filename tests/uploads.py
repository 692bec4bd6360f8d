"""Shared pieces of the upload tests: the upload server's keys and tight limits, fixture files
made by code, and helpers to upload and wait. The upload server itself is a fixture of
conftest.py (``upload_server``, ``api``)."""

from __future__ import annotations

import io
import json
import struct
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import rasterio
from rasterio.transform import from_origin

from twin.core.settings import AuthSettings, Settings, UploadSettings

EDITOR_KEY = "test-editor-key-0123456789"
VIEWER_KEY = "test-viewer-key-0123456789"
EDITOR = {"Authorization": f"Bearer {EDITOR_KEY}"}
# A gis-editor whose jurisdiction is Yuzhong district only.
DISTRICT_EDITOR_KEY = "test-district-editor-key-0123456789"
DISTRICT_EDITOR_SCOPE = "500103"
DISTRICT_EDITOR = {"Authorization": f"Bearer {DISTRICT_EDITOR_KEY}"}
VIEWER = {"Authorization": f"Bearer {VIEWER_KEY}"}
LIMITS = UploadSettings(max_file_bytes=3_000_000, max_archive_members=20,
                        max_uncompressed_bytes=4_000_000, max_compression_ratio=200,
                        max_raster_pixels=1_000_000, max_features=50_000)

# Known WGS84 places in Chongqing (lon, lat): Jiefangbei, Chaotianmen, the Grand Theatre.
PLACES = [(106.5770, 29.5576), (106.5866, 29.5653), (106.5785, 29.5690)]
NAMES_ZH = ["解放碑", "朝天门", "重庆大剧院"]


def upload_settings(database_url: str, uploads_dir: Path) -> Settings:
    limits = LIMITS.model_copy(update={"dir": uploads_dir})
    keys = {EDITOR_KEY: "gis-editor:alice", VIEWER_KEY: "viewer",
            DISTRICT_EDITOR_KEY: f"gis-editor:bob:district={DISTRICT_EDITOR_SCOPE}"}
    return Settings(database_url=database_url, uploads=limits, auth=AuthSettings(keys=keys))


def post_layer(api: httpx.Client, name: str, content: bytes, **data) -> httpx.Response:
    return api.post("/layers", files={"file": (name, content)}, data=data, headers=EDITOR)


def put_layer(api: httpx.Client, layer_id: str, name: str, content: bytes, **data
              ) -> httpx.Response:
    return api.put(f"/layers/{layer_id}", files={"file": (name, content)}, data=data,
                   headers=EDITOR)


def wait(api: httpx.Client, job: dict, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/jobs/{job['id']}").json()
        if job["state"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, f"job still {job['state']}: {job}"
        time.sleep(0.1)


def upload_ok(api: httpx.Client, name: str, content: bytes, **data) -> dict:
    response = post_layer(api, name, content, **data)
    assert response.status_code == 202, response.text
    job = wait(api, response.json())
    assert job["state"] == "succeeded", job
    return job


def poll_job(url: str, job_id: str, timeout: float, headers: dict) -> dict:
    """GET /jobs/{id} of the server at ``url``, on new connections (which land on any worker
    process), until the job has ended or ``timeout`` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{url}/jobs/{job_id}", headers=headers, timeout=30).json()
        if job["state"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


# --- fixture files, made by code -------------------------------------------------------

def geojson_points(places=PLACES, names=NAMES_ZH) -> bytes:
    features = [{"type": "Feature", "properties": {"name": n, "rank": i},
                 "geometry": {"type": "Point", "coordinates": list(p)}}
                for i, (p, n) in enumerate(zip(places, names, strict=True))]
    return json.dumps({"type": "FeatureCollection", "features": features},
                      ensure_ascii=False).encode()


def points_csv(count: int, seed: int) -> tuple[bytes, np.ndarray]:
    """``count`` random points over central Chongqing as a CSV (id, name, lon, lat, value)
    and their coordinates: 200,000 take several seconds to ingest, so a kill or a timeout
    lands while the job is still writing its table."""
    rng = np.random.default_rng(seed)
    lon = rng.uniform(106.30, 106.80, count).round(6)
    lat = rng.uniform(29.35, 29.75, count).round(6)
    out = io.StringIO()
    out.write("id,name,lon,lat,value\n")
    for i, (x, y) in enumerate(zip(lon, lat, strict=True)):
        out.write(f"{i},point {i},{x},{y},{i % 97}\n")
    return out.getvalue().encode(), np.column_stack([lon, lat])


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def shapefile_zip(tmp: Path, frame, encoding: str, keep_cpg: bool = False,
                  keep_prj: bool = True) -> bytes:
    """A zipped Shapefile written by GDAL, optionally without its .cpg or .prj."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "data.shp"
    frame.to_file(path, engine="pyogrio", encoding=encoding)
    members = {}
    for part in sorted(tmp.iterdir()):
        if (part.suffix == ".cpg" and not keep_cpg) or (part.suffix == ".prj" and not keep_prj):
            continue
        members[part.name] = part.read_bytes()
    return zip_bytes(members)


def geotiff(values: np.ndarray, transform, crs: str | None, dtype="float32",
            nodata=None) -> bytes:
    profile = {"driver": "GTiff", "width": values.shape[-1], "height": values.shape[-2],
               "count": 1 if values.ndim == 2 else values.shape[0], "dtype": dtype,
               "transform": transform, "nodata": nodata}
    if crs:
        profile["crs"] = crs
    with rasterio.MemoryFile() as memory:
        with memory.open(**profile) as dst:
            dst.write(values.astype(dtype), 1) if values.ndim == 2 else dst.write(
                values.astype(dtype))
        return memory.read()


def dem_values(rows: int = 200, cols: int = 200) -> tuple[np.ndarray, object]:
    """A smooth, made-up DEM over central Chongqing, in EPSG:4326 (0.0005 deg cells)."""
    transform = from_origin(106.50, 29.60, 0.0005, 0.0005)
    yy, xx = np.mgrid[0:rows, 0:cols]
    values = 200 + 150 * np.sin(xx / 23.0) * np.cos(yy / 31.0) + 0.37 * xx
    return values.astype("float32"), transform


def minimal_glb(extra_json: dict | None = None, version: int = 2) -> bytes:
    """One triangle: positions in a BIN chunk, glTF 2.0 JSON chunk."""
    positions = np.array([[0, 0, 0], [10, 0, 0], [0, 0, 10]], dtype="<f4").tobytes()
    document = {
        "asset": {"version": "2.0", "generator": "twin tests"},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}}]}],
        "accessors": [{"bufferView": 0, "componentType": 5126, "count": 3, "type": "VEC3",
                       "min": [0, 0, 0], "max": [10, 0, 10]}],
        "bufferViews": [{"buffer": 0, "byteLength": len(positions)}],
        "buffers": [{"byteLength": len(positions)}],
    }
    document.update(extra_json or {})
    raw = json.dumps(document).encode()
    raw += b" " * (-len(raw) % 4)
    chunks = (struct.pack("<II", len(raw), 0x4E4F534A) + raw
              + struct.pack("<II", len(positions), 0x004E4942) + positions)
    return struct.pack("<4sII", b"glTF", version, 12 + len(chunks)) + chunks


# --- CityJSON buildings, made by code -------------------------------------------------------

def _rectangle(lon: float, lat: float, width_m: float, depth_m: float, bearing_deg: float
               ) -> list[tuple[float, float]]:
    """Four corners (lon, lat), counter-clockwise, of a width x depth rectangle centred at
    (lon, lat) whose first side runs ``bearing_deg`` clockwise from north."""
    from pyproj import Geod

    geod = Geod(ellps="WGS84")
    corners = []
    for along, across in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
        x, y = along * width_m / 2, across * depth_m / 2
        b = np.radians(bearing_deg)
        east = x * np.sin(b) - y * np.cos(b)
        north = x * np.cos(b) + y * np.sin(b)
        azimuth = float(np.degrees(np.arctan2(east, north)))
        c_lon, c_lat, _ = geod.fwd(lon, lat, azimuth, float(np.hypot(east, north)))
        corners.append((c_lon, c_lat))
    return corners


def city_building(lon: float, lat: float, ground: float, height: float, roof: str = "flat",
                  width_m: float = 30.0, depth_m: float = 16.0, bearing_deg: float = 70.0,
                  attributes: dict | None = None) -> dict:
    """A building for ``cityjson``: corners, ground and roof heights, roof form."""
    return {"corners": _rectangle(lon, lat, width_m, depth_m, bearing_deg), "ground": ground,
            "height": height, "roof": roof, "attributes": attributes or {}}


def cityjson(buildings: list[dict], epsg: int | None = 4545, lod: str = "2",
             version: str = "2.0", scale: float = 0.001, object_type: str = "Building",
             geometry_type: str = "Solid") -> bytes:
    """A CityJSON file of ``buildings`` (city_building), corners projected to ``epsg`` with
    pyproj (x easting, y northing), integer vertices with a transform. LOD1: blocks; LOD2: the
    roof form (flat, gable or hip, ridge along the first side, eaves at 70 % of the height), with
    Ground/Wall/RoofSurface semantics."""
    from pyproj import Transformer

    to_crs = Transformer.from_crs(4326, epsg or 4326, always_xy=True)
    vertices: list[list[float]] = []
    objects = {}
    for k, building in enumerate(buildings):
        corners = [to_crs.transform(lon, lat) for lon, lat in building["corners"]]
        z0, top = building["ground"], building["ground"] + building["height"]
        gable = building["roof"] == "gable" and lod.startswith("2")
        hip = building["roof"] == "hip" and lod.startswith("2")
        eave = z0 + 0.7 * building["height"] if gable or hip else top
        base = len(vertices)
        vertices += [[x, y, z0] for x, y in corners] + [[x, y, eave] for x, y in corners]
        g, e = list(range(base, base + 4)), list(range(base + 4, base + 8))
        surfaces = [[[g[0], g[3], g[2], g[1]]]]
        kinds = [0]
        if gable:
            (x0, y0), (x1, y1), (x2, y2), (x3, y3) = corners
            r0, r1 = base + 8, base + 9
            vertices += [[(x3 + x0) / 2, (y3 + y0) / 2, top], [(x1 + x2) / 2, (y1 + y2) / 2, top]]
            surfaces += [[[g[0], g[1], e[1], e[0]]], [[g[1], g[2], e[2], r1, e[1]]],
                         [[g[2], g[3], e[3], e[2]]], [[g[3], g[0], e[0], r0, e[3]]],
                         [[e[0], e[1], r1, r0]], [[e[2], e[3], r0, r1]]]
            kinds += [1, 1, 1, 1, 2, 2]
        elif hip:
            c = np.array(corners)
            along = (c[1] - c[0]) / np.linalg.norm(c[1] - c[0])
            inset = np.linalg.norm(c[3] - c[0]) / 2
            r0, r1 = base + 8, base + 9
            vertices += [[*((c[3] + c[0]) / 2 + along * inset), top],
                         [*((c[1] + c[2]) / 2 - along * inset), top]]
            surfaces += [[[g[i], g[(i + 1) % 4], e[(i + 1) % 4], e[i]]] for i in range(4)]
            surfaces += [[[e[0], e[1], r1, r0]], [[e[1], e[2], r1]], [[e[2], e[3], r0, r1]],
                         [[e[3], e[0], r0]]]
            kinds += [1, 1, 1, 1, 2, 2, 2, 2]
        else:
            surfaces += [[[g[i], g[(i + 1) % 4], e[(i + 1) % 4], e[i]]] for i in range(4)]
            surfaces += [[[e[0], e[1], e[2], e[3]]]]
            kinds += [1, 1, 1, 1, 2]
        geometry = {"type": geometry_type, "lod": lod,
                    "boundaries": [surfaces] if geometry_type == "Solid" else surfaces,
                    "semantics": {"surfaces": [{"type": "GroundSurface"},
                                               {"type": "WallSurface"},
                                               {"type": "RoofSurface"}],
                                  "values": [kinds] if geometry_type == "Solid" else kinds}}
        objects[f"building-{k + 1}"] = {"type": object_type, "geometry": [geometry],
                                        "attributes": building["attributes"]}
    points = np.array(vertices)
    translate = points.min(axis=0)
    document: dict = {"type": "CityJSON", "version": version, "CityObjects": objects,
                      "transform": {"scale": [scale] * 3, "translate": translate.tolist()},
                      "vertices": np.round((points - translate) / scale).astype(int).tolist()}
    if epsg is not None:
        document["metadata"] = {
            "referenceSystem": f"https://www.opengis.net/def/crs/EPSG/0/{epsg}"}
    return json.dumps(document, ensure_ascii=False).encode()


def node_settings(database_url: str, home: Path, drop_grace_s: float | None = None
                  ) -> Settings:
    """The upload server's settings for one twin node of a cluster: a TWIN_HOME (and so an
    uploads folder) of its own over the shared database; ``drop_grace_s`` sets
    TWIN_UPLOADS_DROP_GRACE_S."""
    settings = upload_settings(database_url, home / "uploads")
    uploads = settings.uploads
    if drop_grace_s is not None:
        uploads = uploads.model_copy(update={"drop_grace_s": drop_grace_s})
    return settings.model_copy(update={"home": home, "uploads": uploads})
