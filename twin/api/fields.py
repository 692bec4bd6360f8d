"""Body fields shared by routes: text PostgreSQL can store.

JSON may carry a NUL character (``\\u0000``) or a lone UTF-16 surrogate (``\\ud910``);
PostgreSQL text can hold neither (psycopg refuses to send them), so a field that goes into
the database is refused up front with a 400 naming it, never a 500 from the database.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL (U+0000) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate such as \\ud910 is "
                         "not)") from None
    return value


Text = Annotated[str, AfterValidator(_storable)]
