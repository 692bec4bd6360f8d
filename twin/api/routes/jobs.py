"""Upload jobs: state, progress and, on failure, the reasons."""

from __future__ import annotations

from fastapi import APIRouter, Request

from layers.job_liveness import reap_if_dead
from layers.jobs import job_document
from twin.api.deps import ConnDep, SettingsDep

router = APIRouter(tags=["layers"])


@router.get("/jobs/{job_id}", summary="An upload job: queued, running, succeeded or failed")
async def get_job(job_id: str, request: Request, conn: ConnDep, settings: SettingsDep) -> dict:
    job = await job_document(conn, job_id)
    # The worker process running (or holding) an unfinished job may have died: a poller sees
    # the job failed at once, not at the next look of a live process.
    if job["state"] in ("queued", "running") and await reap_if_dead(conn, job_id,
                                                                     settings.uploads_dir):
        job = await job_document(conn, job_id)
    base = str(request.base_url).rstrip("/")
    job["links"] = [{"href": f"{base}/jobs/{job_id}", "rel": "self"},
                    {"href": f"{base}/layers/{job['layer_id']}", "rel": "layer"}]
    return job
