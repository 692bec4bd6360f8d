"""Pipe-network questions under /query: trace a network from a segment, anomaly zones."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from twin.api.deps import ConnDep, ScopeDep
from twin.core.models import NETWORKS
from twin.queries.anomalies import MAX_WINDOW
from twin.queries.anomalies import pipe_anomalies as find_anomaly_zones
from twin.queries.pipes import DIRECTIONS, MAX_SEGMENT_ID
from twin.queries.pipes import pipe_trace as trace_network

router = APIRouter(tags=["pipes"])

# Bounds: the query modules' constants (see twin/api/routes/queries.py).
Network = Query(description="pipe network")
# Literals from the domain's tuples (see twin/api/routes/queries.py).
NetworkName = Literal[NETWORKS]  # type: ignore[valid-type]
Direction = Literal[DIRECTIONS]  # type: ignore[valid-type]
DirectionQuery = Query("downstream", description="'downstream' (with the flow) or 'upstream' "
                       "(against it); drainage only, water and gas are traced both ways up "
                       "to the valves")
# An ISO 8601 timestamp with an offset is ~32 characters; the query parses it.
INSTANT_MAX_LENGTH = 64


@router.get("/query/pipe-trace", summary="The pipe segments and nodes reached from a segment "
            "(drainage: with or against the flow; water and gas: connected, up to valves)",
            response_class=JSONResponse)
async def pipe_trace(
    conn: ConnDep, scope: ScopeDep,
    segment_id: int = Query(..., ge=1, le=MAX_SEGMENT_ID,
                            description="id of the pipe segment to start from"),
    network: NetworkName = Network,
    direction: Direction = DirectionQuery,
) -> JSONResponse:
    body = await trace_network(conn, segment_id, direction, network, scope)
    return JSONResponse(body, media_type="application/geo+json")


@router.get("/query/pipe-anomalies", summary="Anomaly zones found in the sensor readings of "
            "a pipe network, with their likely source and what they affect",
            response_class=JSONResponse)
async def pipe_anomalies(
    conn: ConnDep, scope: ScopeDep,
    network: NetworkName = Network,
    since: str | None = Query(None, max_length=INSTANT_MAX_LENGTH,
                              description="start, ISO 8601 with a UTC offset; default 24 "
                              f"hours before until; at most {MAX_WINDOW.days} days before it"),
    until: str | None = Query(None, max_length=INSTANT_MAX_LENGTH,
                              description="end, ISO 8601 with a UTC offset; default the "
                              "network's newest reading"),
) -> JSONResponse:
    body = await find_anomaly_zones(conn, network, since, until, scope)
    return JSONResponse(body, media_type="application/geo+json")
