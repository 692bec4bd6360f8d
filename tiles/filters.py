"""Tile filters (``sector=``, ``level=``, ``filter=``): checked here, applied in SQL.

``sector`` and ``level`` apply to the requested layers that have those fields. A CQL2-text
``filter`` applies to every requested layer and may name only fields each of them has: a
composite tile cannot say which layer a property was meant for, so it refuses to guess.

The caller's jurisdiction (``scope``, issue 7) travels with the filters, so every tile path
(features, budgeted points, H3 hexagons) that applies ``filter_sql`` keeps to it; a tile
outside the scope is then simply a tile with nothing in it. The tile cache key carries the
scope separately (``tiles.cache.tile_key``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.cql2 import compile_filter
from twin.core.errors import InvalidParameter
from twin.core.layer import Layer
from twin.core.principal import CITY, Scope
from twin.core.scope import table_predicate

RISK_LEVELS = (1, 2, 3, 4)

_SECTOR_CODES = text("SELECT code FROM sectors ORDER BY sort_order, code")


@dataclass(frozen=True)
class TileFilters:
    """Empty tuples mean "no filter". Sorted, so equal filters give equal cache keys."""

    sectors: tuple[str, ...] = ()
    levels: tuple[int, ...] = ()
    # CQL2-text as sent (stripped); None for no filter.
    cql: str | None = None
    # The caller's jurisdiction; the whole city by default.
    scope: Scope = CITY

    def applies_to(self, field_names: set[str]) -> bool:
        return (not self.sectors or "sector_code" in field_names) and (
            not self.levels or "level" in field_names)

    @property
    def active(self) -> bool:
        return bool(self.sectors or self.levels)

    def for_layer(self, layer: Layer) -> TileFilters:
        """The filters that apply to the layer: sector and level only where it has them."""
        names = {f["name"] for f in layer.fields}
        return TileFilters(self.sectors if "sector_code" in names else (),
                           self.levels if "level" in names else (), self.cql, self.scope)


def quote(identifier: str) -> str:
    """A SQL identifier, double-quoted."""
    return '"' + identifier.replace('"', '""') + '"'


def split_ids(value: str | None) -> list[str]:
    """A comma list from the query string, blanks dropped."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class SectorCodes:
    """The sector codes (the ``sectors`` table), read once per process: reference data that
    ``sector=`` is checked against and hexagons are counted by. Read again when a client
    names a sector not known yet (one added since)."""

    def __init__(self) -> None:
        self._codes: tuple[str, ...] | None = None

    @property
    def known(self) -> tuple[str, ...] | None:
        """The codes as last read, None before the first read."""
        return self._codes

    async def get(self, connect: Callable[[], Awaitable[AsyncConnection]],
                  refresh: bool = False) -> tuple[str, ...]:
        if self._codes is None or refresh:
            conn = await connect()
            self._codes = tuple((await conn.execute(_SECTOR_CODES)).scalars().all())
        return self._codes


async def read_filters(codes: SectorCodes, connect: Callable[[], Awaitable[AsyncConnection]],
                       sector: str | None, level: str | None, cql: str | None = None,
                       scope: Scope = CITY) -> TileFilters:
    """``parse_filters`` against the sector codes, read again if ``sector`` names one that
    is not among them (``connect`` is called only when the codes are read)."""
    known = await codes.get(connect)
    if set(split_ids(sector)) - set(known):
        known = await codes.get(connect, refresh=True)
    return parse_filters(known, sector, level, cql, scope)


def parse_filters(known: Sequence[str], sector: str | None, level: str | None,
                  cql: str | None = None, scope: Scope = CITY) -> TileFilters:
    """Comma lists from the query string, checked against the ``known`` sector codes and
    levels 1-4.

    The CQL2 filter is checked against each layer's fields when the tile is built.
    """
    sectors = split_ids(sector)
    unknown = sorted(set(sectors) - set(known))
    if unknown:
        raise InvalidParameter(f"unknown sector {', '.join(unknown)}; "
                               f"known sectors: {', '.join(known)}")
    levels = split_ids(level)
    bad = [value for value in levels if value not in {str(n) for n in RISK_LEVELS}]
    if bad:
        raise InvalidParameter(f"unknown level {', '.join(bad)}; levels are 1 (major) to 4 (low)")
    if cql is not None and not cql.strip():
        raise InvalidParameter("filter: the filter is empty")
    return TileFilters(tuple(sorted(set(sectors))), tuple(sorted({int(v) for v in levels})),
                       cql.strip() if cql else None, scope)


def cql_sql(cql: str, layer: Layer, prefix: str) -> tuple[str, dict]:
    """The CQL2 filter as a predicate over the layer's fields; names the layer on error."""
    try:
        return compile_filter(cql, {f["name"]: f["type"] for f in layer.fields}, prefix)
    except InvalidParameter as error:
        raise InvalidParameter(f"{error} (in layer '{layer.id}')") from None


def filter_sql(filters: TileFilters, layer: Layer, suffix: str) -> tuple[str, dict]:
    """The predicate (starting with AND) and its bound values, named uniquely per layer.

    Columns are unqualified: the layer's table is the only one in scope that has them.
    """
    filters = filters.for_layer(layer)
    clauses: list[str] = []
    params: dict[str, object] = {}
    if filters.sectors:
        clauses.append(f"sector_code = ANY(:sectors_{suffix})")
        params[f"sectors_{suffix}"] = list(filters.sectors)
    if filters.levels:
        clauses.append(f"level = ANY(:levels_{suffix})")
        params[f"levels_{suffix}"] = list(filters.levels)
    if filters.cql:
        predicate, cql_params = cql_sql(filters.cql, layer, f"cql_{suffix}_")
        clauses.append(predicate)
        params.update(cql_params)
    scope = table_predicate(filters.scope, layer.source_table, name=f"scope_{suffix}")
    if scope.params:
        clauses.append(scope.sql)
        params.update(scope.params)
    return "".join(f" AND {clause}" for clause in clauses), params
