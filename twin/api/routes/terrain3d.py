"""quantized-mesh-1.0 terrain of DEM layers. Parsing and HTTP only; tiles/ builds it."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["3d"])
