"""3D Tiles 1.1 of the buildings (issue 13): structure, geometry, metadata, freshness, scope.

A client's walk (tests/tiles3d.py) requests the tileset, every subtree and every available
tile; the checks hold them against the spec, against PostGIS (footprints, counts) and against
the DEM files read with rasterio (the ground a block stands on).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import shapely
from sqlalchemy import Engine, text

from tests.servers import LiveServer
from tests.tiles3d import Walk, decode_glb, dem_ground, walk
from tiles.implicit import TileId
from twin.core.settings import AuthSettings, Settings
from twin.core.versions import announce

BASE = "/collections/buildings/3dtiles"
DISTRICT = "500112"
KEYS = {"tiles3d-district-viewer-0123456789": f"viewer:yubei-3d:district={DISTRICT}",
        "tiles3d-city-viewer-0123456789": "viewer:city-3d:city"}


@pytest.fixture(scope="module")
def city(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tileset(city: httpx.Client) -> Walk:
    return walk(city, BASE)


def replaced_buildings(walked: Walk) -> set[int]:
    """Buildings a model replaces: blocks of their own outside the implicit tiles."""
    out = set()
    for tile in walked.tileset["root"]["children"]:
        uri = tile.get("content", {}).get("uri", "")
        if "/blocks/" in uri:
            out.add(int(uri.split("/blocks/")[1].split(".glb")[0]))
    return out


def test_tileset_document_follows_3d_tiles_1_1(tileset: Walk):
    document = tileset.tileset
    assert document["asset"]["version"] == "1.1"
    assert document["asset"]["tilesetVersion"]
    root = document["root"]
    assert root["refine"] == "ADD" and len(root["boundingVolume"]["region"]) == 6
    assert document["geometricError"] >= root["geometricError"]
    implicit_root = tileset.implicit_root
    scheme = implicit_root["implicitTiling"]
    assert scheme["subdivisionScheme"] == "QUADTREE"
    assert scheme["availableLevels"] > scheme["subtreeLevels"] >= 1
    assert "{level}" in scheme["subtrees"]["uri"] and "{x}" in implicit_root["content"]["uri"]
    # Errors shrink downwards: the implicit levels halve it (the spec derives each level's
    # from the implicit root), explicit children stay below their parent.
    assert 0 < implicit_root["geometricError"] <= root["geometricError"]
    for child in root["children"]:
        assert child["geometricError"] <= root["geometricError"]
        for grandchild in child.get("children", []):
            assert grandchild["geometricError"] < child["geometricError"]
    w, s, e, n, low, high = root["boundingVolume"]["region"]
    assert -math.pi <= w < e <= math.pi and -math.pi / 2 <= s < n <= math.pi / 2
    assert low < high


def test_every_unavailable_tile_is_404_and_addresses_outside_name_the_range(
        tileset: Walk, city: httpx.Client):
    assert tileset.content, "the sample's tileset has content"
    for tile in tileset.missing[:40]:
        response = city.get(f"{BASE}/content/{tile.level}/{tile.x}/{tile.y}.glb")
        assert response.status_code == 404, tile
        assert "no content" in response.json()["description"]
    for path, words in ((f"{BASE}/content/15/0/0.glb", "level must be 0-14"),
                        (f"{BASE}/content/3/9/0.glb", "x and y must be 0-7"),
                        (f"{BASE}/subtrees/3/0/0.subtree", "multiples of 5"),
                        (f"{BASE}/subtrees/5/0/0.subtree", "not available")):
        response = city.get(path)
        assert response.status_code == 404, path
        body = response.json()
        assert body["code"] and words in body["description"], body


def test_bad_requests_are_clear(city: httpx.Client):
    response = city.get(f"{BASE}/tileset.json", params={"cim": "9"})
    assert response.status_code == 400 and "CIM grades 2-6" in response.json()["description"]
    response = city.get("/collections/roads/3dtiles/tileset.json")
    assert response.status_code == 400 and "no 3D tiles" in response.json()["description"]
    assert city.get("/collections/nope/3dtiles/tileset.json").status_code == 404


def test_every_vertex_lies_in_its_tile_region_and_footprints_match(tileset: Walk,
                                                                    engine: Engine):
    tolerance_rad = 1e-9  # ~6 mm: float32 vertices about the tile centre
    checked = 0
    for tile, data in tileset.content.items():
        glb = decode_glb(data)
        w, s, e, n, low, high = tileset.tile_region(tile)
        lon, lat = np.radians(glb.lon), np.radians(glb.lat)
        assert (lon >= w - tolerance_rad).all() and (lon <= e + tolerance_rad).all(), tile
        assert (lat >= s - tolerance_rad).all() and (lat <= n + tolerance_rad).all(), tile
        assert (glb.height >= low - 0.01).all() and (glb.height <= high + 0.01).all(), tile
        ids = glb.feature_ids()
        with engine.connect() as conn:
            rows = conn.execute(text("""
                SELECT id, ST_AsBinary(geom), height_m, base_height FROM buildings
                 WHERE id = ANY(:ids)"""), {"ids": ids.tolist()}).all()
        assert len(rows) == len(ids)
        by_id = {row[0]: row for row in rows}
        corners_lon, corners_lat, owner = [], [], []
        for row_index, building in enumerate(ids.tolist()):
            ring = np.asarray(shapely.from_wkb(bytes(by_id[building][1])).exterior.coords)[:-1]
            corners_lon += ring[:, 0].tolist()
            corners_lat += ring[:, 1].tolist()
            owner += [row_index] * len(ring)
        corners_lon, corners_lat = np.array(corners_lon), np.array(corners_lat)
        owner = np.array(owner)
        ground = np.full(len(ids), np.inf)
        np.minimum.at(ground, owner, dem_ground(engine, corners_lon, corners_lat))
        metres = 111_320.0
        for row_index, building in enumerate(ids.tolist()):
            mine = glb.feature == row_index
            assert mine.any(), f"building {building} has no vertices"
            top = glb.height[mine].max()
            expected = ground[row_index] + by_id[building][2]
            assert abs(top - expected) <= 0.1, (building, top, expected)
            cos = math.cos(math.radians(glb.lat[mine][0]))
            for cx, cy in zip(corners_lon[owner == row_index], corners_lat[owner == row_index],
                              strict=True):
                gap = np.hypot((glb.lon[mine] - cx) * metres * cos,
                               (glb.lat[mine] - cy) * metres).min()
                assert gap <= 0.5, (building, gap)
            checked += 1
    assert checked > 100


def test_metadata_counts_equal_sql_per_tile_and_per_grade(tileset: Walk, city: httpx.Client,
                                                          engine: Engine):
    replaced = replaced_buildings(tileset)
    tile_of: dict[int, TileId] = {}
    grade_count = {2: 0, 3: 0}
    for tile, data in tileset.content.items():
        glb = decode_glb(data)
        for building, grade in zip(glb.feature_ids().tolist(), glb.properties["drawn_grade"],
                                   strict=True):
            assert building not in tile_of, f"building {building} in two tiles"
            tile_of[building] = tile
            grade_count[grade] += 1
    with engine.connect() as conn:
        counts = dict(conn.execute(text("""
            SELECT cim_level >= 3, count(*) FROM buildings WHERE id <> ALL(:replaced)
             GROUP BY 1"""), {"replaced": list(replaced)}).all())
        assert grade_count == {2: counts.get(False, 0), 3: counts.get(True, 0)}
        # Per tile: what lies in its region is held by it or by a tile below it.
        for tile in tileset.content:
            w, s, e, n = (math.degrees(v) for v in tileset.tile_region(tile)[:4])
            inside = conn.execute(text("""
                SELECT count(*) FROM buildings
                 WHERE ST_CoveredBy(geom, ST_MakeEnvelope(:w, :s, :e, :n, 4326))
                   AND id <> ALL(:replaced)"""),
                {"w": w, "s": s, "e": e, "n": n, "replaced": list(replaced)}).scalar_one()
            below = sum(1 for held in tile_of.values()
                        if held.level >= tile.level
                        and (held.x >> (held.level - tile.level)) == tile.x
                        and (held.y >> (held.level - tile.level)) == tile.y)
            assert below == inside, tile
    # One grade only: the same buildings, all blocks (CIM2) or only CIM3+ as roofs.
    lod1 = walk(city, BASE, "?cim=2")
    drawn = [g for data in lod1.content.values()
             for g in decode_glb(data).properties["drawn_grade"]]
    with engine.connect() as conn:
        total, roofed = conn.execute(text(
            "SELECT count(*), count(*) FILTER (WHERE cim_level >= 3) FROM buildings")).one()
    # No models drawn at CIM2 alone: the buildings they replace are blocks again.
    assert drawn and set(drawn) == {2} and len(drawn) == total
    lod2 = walk(city, BASE, "?cim=3")
    drawn = [g for data in lod2.content.values()
             for g in decode_glb(data).properties["drawn_grade"]]
    assert set(drawn) == {3} and len(drawn) == roofed


def test_every_glb_passes_the_khronos_validator(tileset: Walk):
    from tests.gltf_validator import validate_all

    tiles = list(tileset.content)
    for tile, report in zip(tiles, validate_all([tileset.content[t] for t in tiles]),
                            strict=True):
        errors = [m for m in report["issues"]["messages"] if m["severity"] == 0]
        assert report["issues"]["numErrors"] == 0, (tile, errors[:5])


@contextmanager
def written(engine: Engine) -> Iterator:
    """A transaction written beside twin (as a loader would), then announced: returns once
    every twin process has applied its data-version change (twin.core.versions.announce), so
    the next request sees it, as after a write through twin."""
    with engine.begin() as conn:
        yield conn
    assert announce(engine.url.render_as_string(hide_password=False)) == set()


def test_an_edit_changes_exactly_the_tiles_it_touches(city: httpx.Client, engine: Engine,
                                                      tileset: Walk):
    before = walk(city, BASE)
    assert before.etags.keys() == tileset.etags.keys()
    tile, data = next(iter(before.content.items()))
    building = int(decode_glb(data).feature_ids()[0])
    content_uri = next(uri for uri in before.etags
                       if uri.startswith(f"./content/{tile.level}/{tile.x}/{tile.y}.glb"))
    try:
        with written(engine) as conn:
            conn.execute(text("UPDATE buildings SET height_m = height_m + 7 WHERE id = :id"),
                         {"id": building})
        after = walk(city, BASE)
        changed = {uri for uri in before.etags if before.etags[uri] != after.etags.get(uri)}
        assert changed == {"tileset", content_uri}, changed
        again = city.get(f"{BASE}/{content_uri.removeprefix('./')}",
                         headers={"If-None-Match": after.etags[content_uri]})
        assert again.status_code == 304
        # A new building in empty country: new tiles (and subtrees) appear, nothing else.
        with written(engine) as conn:
            new_id = conn.execute(text("""
                INSERT INTO buildings (name, use, height_m, floors, cim_level, district_code,
                                       geom)
                SELECT 'test tower', 'office', 50, 16, 2, district_code,
                       ST_Translate(geom, 0.25, 0.0) FROM buildings WHERE id = :id
                RETURNING id"""), {"id": building}).scalar_one()
        inserted = walk(city, BASE)
        grew = {uri for uri in inserted.etags if after.etags.get(uri) != inserted.etags[uri]}
        new_tiles = [t for t, d in inserted.content.items()
                     if new_id in decode_glb(d).feature_ids().tolist()]
        assert len(new_tiles) == 1
        assert all(not uri.startswith("./content/") or
                   uri.startswith(f"./content/{new_tiles[0].level}/{new_tiles[0].x}/")
                   for uri in grew), grew
        with written(engine) as conn:
            conn.execute(text("DELETE FROM buildings WHERE id = :id"), {"id": new_id})
        deleted = walk(city, BASE)
        assert {u: e for u, e in deleted.etags.items() if u != "tileset"} == \
            {u: e for u, e in after.etags.items() if u != "tileset"}
    finally:
        with written(engine) as conn:
            conn.execute(text("UPDATE buildings SET height_m = height_m - 7 WHERE id = :id"),
                         {"id": building})
            conn.execute(text("DELETE FROM buildings WHERE name = 'test tower'"))


@pytest.fixture(scope="module")
def scoped(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    settings = Settings(database_url=database_url,
                        auth=AuthSettings(keys=KEYS, anonymous_role=""))
    with LiveServer(settings) as live:
        yield live


def test_a_district_receives_only_its_buildings(scoped: LiveServer, engine: Engine):
    district_key, city_key = list(KEYS)
    with httpx.Client(base_url=scoped.url, timeout=120) as client:
        mine = walk(client, BASE, headers={"Authorization": f"Bearer {district_key}"})
        everyone = walk(client, BASE, headers={"Authorization": f"Bearer {city_key}"})
    replaced = replaced_buildings(mine)
    ids = {int(b) for data in mine.content.values() for b in decode_glb(data).feature_ids()}
    with engine.connect() as conn:
        expected = set(conn.execute(text(
            "SELECT id FROM buildings WHERE district_code = :d AND id <> ALL(:r)"),
            {"d": DISTRICT, "r": list(replaced)}).scalars())
    assert expected and ids == expected
    # Availability is the district's own: fewer tiles than the city's, none empty.
    assert len(mine.content) < len(everyone.content)


def test_the_tileset_is_linked_from_collection_tilejson_and_landing(city: httpx.Client):
    def hrefs(document: dict) -> list[str]:
        return [link["href"] for link in document["links"]]

    tileset_url = f"{str(city.base_url).rstrip('/')}/collections/buildings/3dtiles/tileset.json"
    assert tileset_url in hrefs(city.get("/collections/buildings").json())
    assert city.get("/tiles/buildings/tilejson.json").json()["tiles3d"] == [tileset_url]
    assert tileset_url in hrefs(city.get("/", headers={"Accept": "application/json"}).json())
    assert "tiles3d" not in city.get("/tiles/roads/tilejson.json").json()
    terrain = hrefs(city.get("/collections/terrain").json())
    assert any(h.endswith("/collections/terrain/quantized-mesh/layer.json") for h in terrain)


def test_a_cityjson_upload_is_served_as_3d_tiles_with_its_own_surfaces(api: httpx.Client):
    from tests.gltf_validator import validate_all
    from tests.uploads import EDITOR, city_building, cityjson, upload_ok

    buildings = [
        city_building(106.5772, 29.5578, 251.5, 24.0, "gable", width_m=32.0, depth_m=14.0),
        city_building(106.5332, 29.5752, 262.0, 96.0, "flat", width_m=40.0, depth_m=36.0)]
    job = upload_ok(api, "twin3d.city.json", cityjson(buildings), title="CityJSON 3D")
    base = f"/collections/{job['layer_id']}/3dtiles"
    for query, lod in (("", 2), ("?cim=2", 1)):
        walked = walk(api, base, query, headers=EDITOR)
        decoded = [decode_glb(data) for data in walked.content.values()]
        assert sum(len(glb.feature_ids()) for glb in decoded) == 2
        assert all(r["issues"]["numErrors"] == 0
                   for r in validate_all(list(walked.content.values())))
        for glb in decoded:
            for row, grade in enumerate(glb.properties["drawn_grade"]):
                assert grade == lod + 1
                mine = glb.feature == row
                lon, lat, height = glb.lon[mine], glb.lat[mine], glb.height[mine]
                building = min(buildings, key=lambda b: abs(b["corners"][0][0] - lon[0]))
                # Its own heights, as the file gives them: no DEM under an upload's surfaces.
                assert height.min() == pytest.approx(building["ground"], abs=0.1)
                assert height.max() == pytest.approx(building["ground"] + building["height"],
                                                     abs=0.1)
                cos = math.cos(math.radians(lat[0]))
                for cx, cy in building["corners"]:
                    gap = np.hypot((lon - cx) * 111_320.0 * cos, (lat - cy) * 111_320.0).min()
                    assert gap <= 0.5
