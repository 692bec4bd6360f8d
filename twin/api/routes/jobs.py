"""Upload jobs: state, progress and, on failure, the reasons."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from twin.api.deps import ConnDep
from twin.api.routes.layers import UploadsDep

router = APIRouter(tags=["layers"])

JobId = Annotated[str, Path(max_length=32, description="the job id a POST/PUT /layers answered "
                                                       "with (32 hex digits)")]


@router.get("/jobs/{job_id}", summary="An upload job: queued, running, succeeded or failed")
async def get_job(job_id: JobId, request: Request, conn: ConnDep, uploads: UploadsDep) -> dict:
    job = await uploads.job(conn, job_id)
    base = str(request.base_url).rstrip("/")
    job["links"] = [{"href": f"{base}/jobs/{job_id}", "rel": "self"},
                    {"href": f"{base}/layers/{job['layer_id']}", "rel": "layer"}]
    return job
