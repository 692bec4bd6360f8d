"""3D Tiles 1.1 of 3D layers, built on demand from the live tables: the 3D tile path.

``Tiles3D`` answers ``tileset.json``, subtree files, tile content (GLB) and the CIM4-6
models placed in a buildings tileset. It shares the tile service's versions, registry and
pool (tiles/service.py); routes parse and send its ``TileAnswer``.

Exact: everything is keyed by the data versions it reads (the buildings layer, the DEMs the
blocks stand on, the model layers), so the next request after a write sees it. An ETag is a
hash of the bytes, so an edit changes exactly the tiles and subtrees whose bytes it changes;
the others still answer 304. ``asset.tilesetVersion`` carries the versions too (CesiumJS
appends it to every request as ``v=``). Scoped: a principal's tileset, subtrees and tiles
are computed on the rows of its jurisdiction only, so availability tells nothing of the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass

import anyio.to_thread
from sqlalchemy.ext.asyncio import AsyncConnection

from tiles import buildings3d, dem, implicit, models3d
from tiles.buildings3d import Grades
from tiles.implicit import Placement, TileId
from tiles.service import TileAnswer, TileService
from tiles.sql import sql_text
from tiles.validators import CACHE_CONTROL, cache_control, not_modified
from twin.core.errors import InvalidParameter, NotFound
from twin.core.layer import Layer, LayerRegistry
from twin.core.principal import Scope
from twin.core.scope import layer_visible, table_predicate

GLB_MEDIA_TYPE = "model/gltf-binary"
SUBTREE_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"
# A model replaces its building's block nearer than ~1 km (the block tile's error, 16 px).
BLOCK_GEOMETRIC_ERROR = 16.0
PLACEMENTS_KEPT = 64


@dataclass(frozen=True)
class Request3D:
    layer_id: str
    scope: Scope
    cim: str | None = None
    if_none_match: str | None = None
    # The URL's ``v=`` (CesiumJS adds ``asset.tilesetVersion`` to every request it makes for
    # the tileset): subtrees and contents of that version are sent immutable.
    version: str | None = None


@dataclass(frozen=True)
class _State:
    """One tileset as a scope sees it at one set of data versions."""

    layer: Layer
    scope: Scope
    grades: Grades
    dems: tuple[Layer, ...]
    # Model layers shown in this tileset, and the buildings they replace.
    models: tuple[Layer, ...]
    replaced: tuple[int, ...]
    versions: tuple
    # The layers whose rows the tiles read, at the primary's data versions (as pushed): a
    # standby is read only when it holds exactly these (TileService.read).
    reads: tuple[tuple[str, int], ...] = ()

    @property
    def key(self) -> tuple:
        return (self.layer.id, self.scope.key, self.grades.key, self.versions)

    @property
    def tileset_version(self) -> str:
        return hashlib.blake2b(repr(self.versions).encode(), digest_size=6).hexdigest()


def _etag(content: bytes) -> str:
    return '"' + hashlib.blake2b(content, digest_size=16).hexdigest() + '"'


def _answer(content: bytes, media_type: str, if_none_match: str | None,
            etag: str | None = None, pinned_by: tuple[_State, Request3D] | None = None
            ) -> TileAnswer:
    """``pinned_by``: the state a tile was made in and its request, whose ``v`` may name that
    state's versions (then the answer is immutable); the tileset document itself never is."""
    etag = etag or _etag(content)
    control = CACHE_CONTROL
    if pinned_by is not None:
        state, request = pinned_by
        control = cache_control(state.tileset_version, request.version)
    headers = {"ETag": etag, "Cache-Control": control}
    if not_modified(etag, if_none_match):
        return TileAnswer(None, media_type, headers)
    return TileAnswer(content, media_type, headers)


class _Lru(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def keep(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class Tiles3D:
    def __init__(self, service: TileService):
        self.service = service
        self._placements: _Lru = _Lru(PLACEMENTS_KEPT)
        self._placing: dict[tuple, anyio.Lock] = {}
        # Content and subtrees by state and address: (bytes, ETag); off with the tile cache.
        self._answers: _Lru | None = _Lru(4096) if service.cache is not None else None

    # --- the tileset as this caller sees it now ----------------------------------------

    async def _state(self, request: Request3D) -> _State:
        service = self.service
        versions = await service.layer_versions()
        registry, (layer,) = await service.layers_for((request.layer_id,), request.scope,
                                                      versions)
        grades = Grades.parse(request.cim)
        data = registry.data_versions(versions)
        if layer.kind == "3d":  # a glTF upload: a tileset of its one model
            return _State(layer, request.scope, grades, (), (layer,), (),
                          (data.get(layer.id, 0),), ((layer.id, versions.get(layer.id, 0)),))
        if not buildings3d.is_buildings_layer(layer):
            raise InvalidParameter(
                f"layer '{layer.id}' has no 3D tiles: they are made of 3D buildings layers "
                "(the buildings, CityJSON uploads) and 3D models (glTF uploads)")
        dems = self._dems(registry, request.scope)
        models = tuple(model for model in registry
                       if model.kind == "3d" and model.meta.get("cim_level") in grades.models()
                       and layer.id == "buildings"
                       and layer_visible(request.scope, model.owner_scope, model.shared))
        state_versions = (data.get(layer.id, 0), tuple(data.get(d.id, 0) for d in dems),
                          tuple((m.id, data.get(m.id, 0)) for m in models))
        replaced = tuple(sorted({int(m.meta["building_id"]) for m in models
                                 if m.meta.get("building_id") is not None}))
        reads = tuple((read.id, versions.get(read.id, 0)) for read in (layer, *models))
        return _State(layer, request.scope, grades, dems, models, replaced, state_versions,
                      reads)

    def _dems(self, registry: LayerRegistry, scope: Scope) -> tuple[Layer, ...]:
        """The terrain the blocks stand on: the same DEM stack the caller's quantized-mesh
        terrain is made of (tiles/dem.py)."""
        try:
            terrain = registry.get(self.service.settings.terrain_3d)
            return tuple(dem.visible_stack(registry, terrain, scope))
        except (NotFound, InvalidParameter):
            return ()

    async def _placement(self, conn: AsyncConnection, state: _State, root: TileId
                         ) -> Placement:
        key = (state.key, root)
        placement = self._placements.get(key)
        if placement is not None:
            return placement
        # A client asks for many tiles of one subtree at once: one of them places it.
        async with self._placing.setdefault(key, anyio.Lock()):
            placement = self._placements.get(key)
            if placement is None:
                ids, boxes = await buildings3d.boxes_in(conn, state.layer, state.scope,
                                                        state.grades, state.replaced,
                                                        root.bounds())
                placement = self._placements.keep(key, await anyio.to_thread.run_sync(
                    implicit.place, root, ids, boxes[:, 0], boxes[:, 1], boxes[:, 2],
                    boxes[:, 3]))
            self._placing.pop(key, None)
        return placement

    async def _available_subtree(self, conn: AsyncConnection, state: _State, root: TileId
                                 ) -> Placement:
        """The placement of an available subtree, else 404 (the parent says which are)."""
        placement = await self._placement(conn, state, root)
        if root.level > 0:
            above = await self._placement(conn, state, root.parent().subtree_root)
            if not above.count(root) or above.is_leaf(root.parent()):
                raise NotFound(f"subtree {root.level}/{root.x}/{root.y} is not available "
                               "(see its parent subtree's childSubtreeAvailability)")
        return placement

    async def _cached(self, state: _State, address: tuple, make) -> tuple[bytes, str]:
        key = (state.key, address)
        if self._answers is not None and key in self._answers:
            return self._answers[key]
        content = await make()
        made = (content, _etag(content))
        if self._answers is not None:
            self._answers.keep(key, made)
        return made

    # --- the answers -------------------------------------------------------------------

    async def tileset(self, request: Request3D, base: str) -> TileAnswer:
        """``tileset.json``: the implicit quadtree of the blocks, and each selected model as
        an explicit tile (REPLACE: the block far, the model near)."""
        state = await self._state(request)
        if state.layer.kind == "3d":
            return self._model_tileset(state, request)
        async def work(conn: AsyncConnection) -> tuple[float, float, list[dict]]:
            low, high = await buildings3d.height_range(conn, state.layer, state.scope,
                                                       state.grades, state.dems)
            return low, high, await self._model_tiles(conn, state, base, low, high)

        low, high, model_tiles = await self.service.read(dict(state.reads), work)
        query = f"?cim={state.grades.key}"
        implicit_root = {
            "boundingVolume": {"region": implicit.root_region(low, high)},
            "geometricError": implicit.ROOT_GEOMETRIC_ERROR,
            "refine": "ADD",
            "content": {"uri": f"{base}/content/{{level}}/{{x}}/{{y}}.glb{query}"},
            "implicitTiling": {
                "subdivisionScheme": "QUADTREE",
                "subtreeLevels": implicit.SUBTREE_LEVELS,
                "availableLevels": implicit.MAX_LEVEL + 1,
                "subtrees": {"uri": f"{base}/subtrees/{{level}}/{{x}}/{{y}}.subtree{query}"},
            },
        }
        children = ([implicit_root] if state.grades.least_drawn else []) + model_tiles
        document = {
            "asset": {"version": "1.1", "tilesetVersion": state.tileset_version,
                      "generator": "twin"},
            "geometricError": 2 * implicit.ROOT_GEOMETRIC_ERROR,
            "root": {
                "boundingVolume": {"region": implicit.root_region(
                    min([low] + [t["boundingVolume"]["region"][4] for t in model_tiles]),
                    max([high] + [t["boundingVolume"]["region"][5] for t in model_tiles]))},
                "geometricError": 2 * implicit.ROOT_GEOMETRIC_ERROR,
                "refine": "ADD",
                "children": children,
            },
            "properties": {"cim": {"minimum": min(state.grades.values),
                                   "maximum": max(state.grades.values)}},
        }
        content = json.dumps(document, ensure_ascii=False).encode()
        return _answer(content, JSON_MEDIA_TYPE, request.if_none_match)

    def _model_tileset(self, state: _State, request: Request3D) -> TileAnswer:
        model = state.layer
        document = {
            "asset": {"version": "1.1", "tilesetVersion": state.tileset_version,
                      "generator": "twin"},
            "geometricError": BLOCK_GEOMETRIC_ERROR,
            "root": {"boundingVolume": {"region": models3d.model_region(model)},
                     "geometricError": 0.0, "refine": "REPLACE",
                     "transform": models3d.model_transform(model.meta),
                     "content": {"uri": f"./models/{model.id}.glb"}},
        }
        content = json.dumps(document, ensure_ascii=False).encode()
        return _answer(content, JSON_MEDIA_TYPE, request.if_none_match)

    async def _model_tiles(self, conn: AsyncConnection, state: _State, base: str,
                           low: float, high: float) -> list[dict]:
        visible = await self._visible_buildings(conn, state, state.replaced)
        tiles = []
        for model in state.models:
            building = model.meta.get("building_id")
            region = models3d.model_region(model)
            model_tile = {"boundingVolume": {"region": region}, "geometricError": 0.0,
                          "transform": models3d.model_transform(model.meta),
                          "content": {"uri": f"{base}/models/{model.id}.glb"}}
            if building is None:
                tiles.append(model_tile)
                continue
            if int(building) not in visible:
                continue
            block = visible[int(building)]
            west, south, east, north = block
            tiles.append({
                "boundingVolume": {"region": [
                    min(region[0], _rad(west)), min(region[1], _rad(south)),
                    max(region[2], _rad(east)), max(region[3], _rad(north)),
                    min(region[4], low), max(region[5], high)]},
                "geometricError": BLOCK_GEOMETRIC_ERROR,
                "refine": "REPLACE",
                "content": {"uri": f"{base}/blocks/{building}.glb?cim={state.grades.key}"},
                "children": [model_tile],
            })
        return tiles

    async def _visible_buildings(self, conn: AsyncConnection, state: _State, ids
                                 ) -> dict[int, tuple[float, float, float, float]]:
        if not ids:
            return {}
        where = table_predicate(state.scope, state.layer.source_table, alias="b")
        rows = (await conn.execute(sql_text(f"""
            SELECT b.id, ST_XMin(b.geom), ST_YMin(b.geom), ST_XMax(b.geom), ST_YMax(b.geom)
              FROM "{state.layer.source_table}" AS b
             WHERE b.id = ANY(:ids){where.and_sql}
        """), {**where.params, "ids": list(ids)})).all()
        return {int(row[0]): (row[1], row[2], row[3], row[4]) for row in rows}

    async def subtree(self, request: Request3D, level: int, x: int, y: int) -> TileAnswer:
        root = implicit.checked_tile(level, x, y, "subtree")
        state = await self._state(request)

        async def make() -> bytes:
            placement = await self.service.read(
                dict(state.reads), lambda conn: self._available_subtree(conn, state, root))
            return implicit.subtree_file(implicit.availability(placement))

        content, etag = await self._cached(state, ("subtree", root), make)
        return _answer(content, SUBTREE_MEDIA_TYPE, request.if_none_match, etag,
                       (state, request))

    async def content(self, request: Request3D, level: int, x: int, y: int) -> TileAnswer:
        tile = implicit.checked_tile(level, x, y)
        state = await self._state(request)

        async def work(conn: AsyncConnection) -> buildings3d.BuildingRows:
            placement = await self._available_subtree(conn, state, tile.subtree_root)
            ids = placement.ids[placement.holds(tile)]
            if not ids.size:
                raise NotFound(f"tile {level}/{x}/{y} has no content (see its subtree's "
                               "contentAvailability)")
            return await buildings3d.fetch_rows(conn, state.layer, ids.tolist())

        async def make() -> bytes:
            return await _glb(state, await self.service.read(dict(state.reads), work))

        content, etag = await self._cached(state, ("content", tile), make)
        return _answer(content, GLB_MEDIA_TYPE, request.if_none_match, etag, (state, request))

    async def block(self, request: Request3D, building_id: int) -> TileAnswer:
        """The block of a building a model replaces near the camera."""
        state = await self._state(request)
        if building_id not in state.replaced:
            raise NotFound(f"building {building_id} has no model in this tileset; its block "
                           "is in the implicit tiles")

        async def work(conn: AsyncConnection) -> buildings3d.BuildingRows:
            if building_id not in await self._visible_buildings(conn, state, (building_id,)):
                raise NotFound(f"unknown building {building_id}")
            return await buildings3d.fetch_rows(conn, state.layer, [building_id])

        async def make() -> bytes:
            return await _glb(state, await self.service.read(dict(state.reads), work))

        content, etag = await self._cached(state, ("block", building_id), make)
        return _answer(content, GLB_MEDIA_TYPE, request.if_none_match, etag, (state, request))

    async def model(self, request: Request3D, model_id: str) -> TileAnswer:
        """A CIM4-6 model as tile content, carrying its building's properties."""
        state = await self._state(request)
        model = next((m for m in state.models if m.id == model_id), None)
        if model is None:
            raise NotFound(f"model '{model_id}' is not in this tileset (a 3D model layer of a "
                           f"selected CIM grade: {state.grades.key})")

        async def make() -> bytes:
            row = await self._model_row(state, model)
            return await anyio.to_thread.run_sync(models3d.model_content, model, row)

        content, etag = await self._cached(state, ("model", model_id), make)
        return _answer(content, GLB_MEDIA_TYPE, request.if_none_match, etag, (state, request))

    async def _model_row(self, state: _State, model: Layer) -> dict:
        building = model.meta.get("building_id")
        row = {"id": int(building) if building is not None else 0,
               "name": model.title_zh, "cim_level": int(model.meta.get("cim_level", 4)),
               "model": model.id}
        if building is None:
            return row
        async def work(conn: AsyncConnection):
            return (await conn.execute(sql_text("""
                SELECT b.name, b.use, b.height_m, b.floors, b.district_code, b.street_code
                  FROM buildings AS b WHERE b.id = :id
            """), {"id": int(building)})).first()

        # The buildings' version is known when they are this tileset's layer; else (a glTF
        # tileset) 0, which no standby holds: the primary answers.
        found = await self.service.read({"buildings": 0, **dict(state.reads)}, work)
        if found is not None:
            row.update(name=found[0] or model.title_zh, use=found[1], height=found[2],
                       floors=found[3], district_code=found[4], street_code=found[5])
        return row


async def _glb(state: _State, rows: buildings3d.BuildingRows) -> bytes:
    """The GLB of the rows as the state draws them: meshes off the event loop, the pool's
    connection already given back."""
    return await anyio.to_thread.run_sync(buildings3d.content, rows, state.grades, state.dems)


def _rad(degrees: float) -> float:
    return math.radians(degrees)
