"""SQL statements of the tile builders, as SQLAlchemy text clauses made once."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import TextClause, text


@lru_cache(maxsize=512)
def sql_text(query: str) -> TextClause:
    """``text(query)``, made once per distinct query: a tile's SQL comes in few shapes, and
    text() scans the whole statement for bind parameters every time (~0.3 ms a tile)."""
    return text(query)
