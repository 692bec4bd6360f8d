"""3D Tiles 1.1 of 3D layers (buildings, CIM models). Parsing and HTTP only; tiles/ builds them."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["3d"])
