"""The floor: what every part of twin stands on, importing nothing of twin above it.

settings (the ``TWIN_`` environment), errors (the API's error shape), db (engines and pools),
models (the schema), datum (GCJ-02/BD-09 to WGS84), principal (roles, who is calling, their
jurisdiction), scope (jurisdiction as SQL), cql2 (filters as SQL), layer (the layer record and
registry), raster_facts (what a raster file holds). import-linter holds the line
(pyproject.toml; docs/architecture.md).
"""
