"""Tile filters (``sector=``, ``level=``): checked here, applied in SQL by the builders."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.errors import InvalidParameter

RISK_LEVELS = (1, 2, 3, 4)

_SECTOR_CODES = text("SELECT code FROM sectors ORDER BY sort_order, code")


@dataclass(frozen=True)
class TileFilters:
    """Empty tuples mean "no filter". Sorted, so equal filters give equal cache keys."""

    sectors: tuple[str, ...] = ()
    levels: tuple[int, ...] = ()

    def applies_to(self, field_names: set[str]) -> bool:
        return (not self.sectors or "sector_code" in field_names) and (
            not self.levels or "level" in field_names)

    @property
    def active(self) -> bool:
        return bool(self.sectors or self.levels)


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


async def parse_filters(conn: AsyncConnection, sector: str | None,
                        level: str | None) -> TileFilters:
    """Comma lists from the query string, checked against the sectors table and levels 1-4."""
    sectors = _split(sector)
    if sectors:
        known = (await conn.execute(_SECTOR_CODES)).scalars().all()
        unknown = sorted(set(sectors) - set(known))
        if unknown:
            raise InvalidParameter(f"unknown sector {', '.join(unknown)}; "
                                   f"known sectors: {', '.join(known)}")
    levels = _split(level)
    bad = [value for value in levels if value not in {str(n) for n in RISK_LEVELS}]
    if bad:
        raise InvalidParameter(f"unknown level {', '.join(bad)}; levels are 1 (major) to 4 (low)")
    return TileFilters(tuple(sorted(set(sectors))), tuple(sorted({int(v) for v in levels})))


def filter_sql(filters: TileFilters, suffix: str) -> tuple[str, dict]:
    """The predicate (starting with AND) and its bound values, named uniquely per layer."""
    clauses, params = [], {}
    if filters.sectors:
        clauses.append(f"sector_code = ANY(:sectors_{suffix})")
        params[f"sectors_{suffix}"] = list(filters.sectors)
    if filters.levels:
        clauses.append(f"level = ANY(:levels_{suffix})")
        params[f"levels_{suffix}"] = list(filters.levels)
    return "".join(f" AND {clause}" for clause in clauses), params
