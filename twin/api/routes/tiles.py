from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["tiles"])

# OGC conformance classes this module implements, collected by /conformance.
CONFORMANCE: list[str] = []
