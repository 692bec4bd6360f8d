"""Upload jobs: state, progress and, on failure, the reasons."""

from __future__ import annotations

from fastapi import APIRouter, Request

from layers.jobs import job_document
from twin.api.deps import ConnDep

router = APIRouter(tags=["layers"])


@router.get("/jobs/{job_id}", summary="An upload job: queued, running, succeeded or failed")
async def get_job(job_id: str, request: Request, conn: ConnDep) -> dict:
    job = await job_document(conn, job_id)
    base = str(request.base_url).rstrip("/")
    job["links"] = [{"href": f"{base}/jobs/{job_id}", "rel": "self"},
                    {"href": f"{base}/layers/{job['layer_id']}", "rel": "layer"}]
    return job
