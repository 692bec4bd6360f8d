"""The upload service: the one entry point of the layer-writing routes.

Built once in the app's lifespan (``start_uploads``), it holds the settings, the background job
runner and what to call when a layer changes (the registry's invalidation). Each route parses
its request, calls one method with typed values (the body's chunks, the caller, the registry it
resolved) and wraps the answer: receiving the body, the form (layers.plan), the checks
(layers.intake), the job row (layers.jobs), publishing, rolling back and deleting
(layers.versions) all happen behind it.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from layers import intake, versions
from layers.blobs import drop_grace_s
from layers.crs import point_to_wgs84
from layers.job_liveness import reap_if_dead
from layers.jobs import JobRunner, create_job, job_document, start_runner
from layers.plan import FORM_FIELDS, JobPlan, UploadForm
from layers.receive import Received, boundary_of, content_length_check, receive_upload
from layers.versions import job_dir
from twin.core import local_files
from twin.core.errors import InvalidParameter
from twin.core.layer import Layer, LayerRegistry
from twin.core.principal import Principal
from twin.core.scope import check_layer_writable, table_predicate, visible_layer
from twin.core.settings import Settings


@dataclass(frozen=True)
class IncomingUpload:
    """A multipart request body as it arrives, with the headers that frame it."""

    chunks: AsyncIterator[bytes]
    content_type: str
    content_length: str | None


class UploadService:
    def __init__(self, settings: Settings, runner: JobRunner,
                 on_change: Callable[[str], None]):
        self._settings, self._runner, self._on_change = settings, runner, on_change

    # --- uploads -------------------------------------------------------------------------

    async def create(self, conn: AsyncConnection, upload: IncomingUpload, who: Principal
                     ) -> dict:
        """POST /layers: a new layer; returns the queued job."""
        async with self._received(upload) as (job_id, received):
            form = UploadForm.parse(received.fields)
            if not form.title:
                raise InvalidParameter("title: required (the layer's name as shown on the map)")
            taken = set((await conn.execute(text("SELECT id FROM layers"))).scalars().all())
            if form.layer_id:
                layer_id = versions.check_layer_id(form.layer_id)
                if layer_id in taken:
                    raise versions.Conflict(f"id: layer '{layer_id}' exists; PUT "
                                            f"/layers/{layer_id} uploads a new version of it")
            else:
                layer_id = intake.suggested_id(form.title, received.file_name, taken)
            return await self._queue(conn, job_id, layer_id, "create", received, form, who)

    async def replace(self, conn: AsyncConnection, layer_id: str, upload: IncomingUpload,
                      who: Principal, registry: LayerRegistry) -> dict:
        """PUT /layers/{id}: a new version of an uploaded layer, of the same kind."""
        check_layer_writable(who.scope, visible_layer(who.scope, registry, layer_id))
        kind = (await conn.execute(text("SELECT kind FROM layers WHERE id = :id AND origin = "
                                        "'upload'"), {"id": layer_id})).scalar()
        await conn.rollback()
        if kind is None:
            await conn.run_sync(versions.uploaded_layer, layer_id)  # names why: 404 or built-in
        async with self._received(upload) as (job_id, received):
            form = UploadForm.parse(received.fields)
            return await self._queue(conn, job_id, layer_id, "replace", received, form, who,
                                     kind)

    async def _queue(self, conn: AsyncConnection, job_id: str, layer_id: str, action: str,
                     received: Received, form: UploadForm, who: Principal,
                     kind: str | None = None) -> dict:
        # A layer is seen where its uploader's jurisdiction reaches; a city upload by everyone.
        plan = await asyncio.to_thread(
            intake.prepare, job_dir(self._settings.uploads_dir, job_id), received.file_name,
            form, self._settings.uploads, who.scope.key, who.scope.is_city)
        if kind is not None and plan.kind != kind:
            raise InvalidParameter(f"file: layer '{layer_id}' is a {kind} layer; a new version "
                                   f"must be {kind} too, got a {plan.kind} file")
        if plan.anchor is not None:
            await _check_anchor(conn, plan, who)
        await create_job(conn, job_id, layer_id, action, received.file_name, plan, who.name)
        self._runner.submit(job_id, layer_id)
        return await job_document(conn, job_id)

    @asynccontextmanager
    async def _received(self, upload: IncomingUpload
                        ) -> AsyncIterator[tuple[str, Received]]:
        """The upload streamed into a fresh job folder (limits counted as it arrives); the
        folder goes again when anything after it fails. Auth ran before: not a byte is read
        for a caller without a gis-editor key."""
        boundary_of(upload.content_type)
        content_length_check(upload.content_length, self._settings.uploads)
        job_id = uuid.uuid4().hex
        folder = job_dir(self._settings.uploads_dir, job_id)
        folder.mkdir(parents=True)
        try:
            received = await receive_upload(upload.chunks, upload.content_type, folder,
                                            FORM_FIELDS, self._settings.uploads,
                                            intake.stored_name)
            yield job_id, received
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    # --- versions --------------------------------------------------------------------------

    async def rollback(self, conn: AsyncConnection, layer_id: str, version: object,
                       who: Principal, registry: LayerRegistry) -> dict:
        """Publish an earlier version again (``version`` as the caller sent it)."""
        check_layer_writable(who.scope, visible_layer(who.scope, registry, layer_id))
        if not isinstance(version, int) or isinstance(version, bool):
            raise InvalidParameter("version: required, the integer version to publish again "
                                   "(query ?version= or JSON body {\"version\": n})")
        result = await conn.run_sync(versions.rollback, layer_id, version,
                                     drop_grace_s(self._settings))
        await conn.commit()
        self._on_change(layer_id)
        return result

    async def delete(self, conn: AsyncConnection, layer_id: str, who: Principal,
                     registry: LayerRegistry) -> None:
        """Delete an uploaded layer: gone from the API at once; its versions' tables and files
        a drop grace later (layers/blobs.py)."""
        check_layer_writable(who.scope, visible_layer(who.scope, registry, layer_id))
        folders = await conn.run_sync(versions.delete, layer_id, self._settings.uploads_dir,
                                      drop_grace_s(self._settings))
        await conn.commit()
        self._on_change(layer_id)
        await asyncio.to_thread(versions.remove_paths, folders)

    # --- jobs ------------------------------------------------------------------------------

    async def job(self, conn: AsyncConnection, job_id: str) -> dict:
        """A job's state. The worker process running (or holding) an unfinished job may have
        died: a poller sees the job failed at once, not at the next look of a live process."""
        job = await job_document(conn, job_id)
        if job["state"] in ("queued", "running") and await reap_if_dead(
                conn, job_id, self._settings.uploads_dir):
            job = await job_document(conn, job_id)
        return job

    def local_path(self, layer: Layer) -> Path:
        """The layer's file on this node, fetched from the database first when missing (in a
        thread: a first fetch reads the whole file)."""
        return self._runner.local_files(layer)

    def shutdown(self) -> None:
        local_files.uninstall(self._runner.local_files)
        self._runner.shutdown()


# A model's origin may sit at a corner or beside its building, but not across town.
ANCHOR_REACH_M = 200.0


async def _check_anchor(conn: AsyncConnection, plan: JobPlan, who: Principal) -> None:
    """400 when a model's building_id names no building in the uploader's jurisdiction, or
    one far from the anchor (the anchor's bounds were checked by layers.intake)."""
    anchor = plan.anchor
    assert anchor is not None
    if anchor.building_id is None:
        return
    lon, lat = point_to_wgs84(anchor.lon, anchor.lat, plan.datum)
    scope = table_predicate(who.scope, "buildings")
    distance = (await conn.execute(text(
        "SELECT ST_Distance(geom::geography, ST_SetSRID(ST_MakePoint(:lon, :lat), 4326)"
        "::geography) FROM buildings WHERE id = :id" + scope.and_sql),
        {"id": anchor.building_id, "lon": lon, "lat": lat, **scope.params})).scalar()
    await conn.rollback()
    if distance is None:
        where = "" if who.scope.is_city else " in your jurisdiction"
        raise InvalidParameter(f"building_id: there is no building {anchor.building_id}{where} "
                               "(the buildings layer lists their ids)")
    if distance > ANCHOR_REACH_M:
        raise InvalidParameter(f"building_id: the anchor lies {distance:.0f} m from building "
                               f"{anchor.building_id}'s footprint; a model that replaces a "
                               f"building is anchored within {ANCHOR_REACH_M:.0f} m of it")


async def start_uploads(settings: Settings, on_change: Callable[[str], None]) -> UploadService:
    """The app's upload service, with its job runner started (jobs a killed server left are
    failed first). ``on_change(layer_id)`` runs after a layer is published, rolled back or
    deleted, from any thread. Tiles and routes of this app read uploaded files through
    twin.core.local_files, which asks this service's node-local copies."""
    runner = await start_runner(settings, on_change)
    local_files.install(runner.local_files)
    return UploadService(settings, runner, on_change)
