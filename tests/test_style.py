"""The one-map style: valid by MapLibre's own validator, and every source served by twin."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from httpx import Client

VALIDATOR = Path(__file__).parent / "js" / "node_modules" / ".bin" / "gl-style-validate"
LEVEL_COLOURS = {1: "#e53935", 2: "#fb8c00", 3: "#fdd835", 4: "#1e88e5"}


def test_style_passes_the_maplibre_validator(client: Client, tmp_path: Path):
    assert VALIDATOR.exists(), "install the validator first: npm ci --prefix tests/js"
    response = client.get("/styles/risk-map.json")
    assert response.status_code == 200
    style_file = tmp_path / "risk-map.json"
    style_file.write_text(response.text)
    result = subprocess.run([str(VALIDATOR), str(style_file)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in (result.stdout + result.stderr).lower()


def test_every_style_source_is_a_tilejson_twin_serves(client: Client):
    style = client.get("/styles/risk-map.json").json()
    assert style["version"] == 8 and style["sources"]
    for source_id, source in style["sources"].items():
        assert source["url"].startswith(str(client.base_url).rstrip("/") + "/tiles/"), source_id
        # Absolute URLs: fetched as given, not joined to the client's base.
        tilejson = client.get(source["url"])
        assert tilejson.status_code == 200, (source_id, tilejson.text)
        doc = tilejson.json()
        assert doc["tilejson"] == "3.0.0" and doc["tiles"]
        served = {layer["id"] for layer in doc["vector_layers"]}
        used = {layer["source-layer"] for layer in style["layers"]
                if layer.get("source") == source_id}
        assert used and used <= served, source_id


def test_style_draws_what_the_one_map_needs(client: Client):
    style = client.get("/styles/risk-map.json").json()
    layers = {layer["id"]: layer for layer in style["layers"]}
    minzoom = {layer["source-layer"]: layer.get("minzoom", 0) for layer in style["layers"]
               if layer["type"] == "line" and layer.get("source") == "admin"}
    assert minzoom == {"districts": 0, "streets": 8, "communities": 11, "grids": 13}
    points, hexagons = layers["risk-points"], layers["risk-hexagons"]
    assert points["type"] == "circle" and hexagons["type"] == "fill"
    assert hexagons["maxzoom"] == points["minzoom"] == 12
    colour = points["paint"]["circle-color"]
    assert dict(zip(colour[2:-1:2], colour[3:-1:2], strict=True)) | {4: colour[-1]} == \
        LEVEL_COLOURS
    assert layers["risk-hexagons-worst-level"]["paint"]["line-color"][1] == ["get", "worst_level"]
    # Dense point tiles send clusters (count, worst level as "level"): they grow with count.
    assert '["get", "count"]' in json.dumps(points["paint"]["circle-radius"])
    buildings = layers["buildings-3d"]
    assert buildings["type"] == "fill-extrusion"
    assert ["get", "height"] in buildings["paint"]["fill-extrusion-height"]
    assert ["get", "base_height"] in buildings["paint"]["fill-extrusion-base"]
    assert layers["pipe-segments"]["paint"]["line-color"][1] == ["get", "network"]
    assert layers["response-teams"]["type"] == "circle"
    assert not any(source["type"] == "raster-dem" for source in style["sources"].values())
    # Nothing served to the style is JSON that only Python could read.
    json.dumps(style, allow_nan=False)
