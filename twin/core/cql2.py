"""A small CQL2-text parser that turns a filter into a bound SQL predicate.

Covers basic CQL2 (comparisons, AND/OR/NOT, IS NULL), the advanced comparison operators
(LIKE, BETWEEN, IN) and the spatial functions (S_INTERSECTS and friends) with WKT or BBOX
literals. Property names are checked against the layer's fields and quoted; every literal
becomes a bound parameter, so no text of the filter is ever formatted into the SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import NoReturn

import shapely

from twin.core.errors import InvalidParameter

GEOMETRY_PROPERTIES = ("geometry", "geom")
WKT_TYPES = ("POINT", "LINESTRING", "POLYGON", "MULTIPOINT", "MULTILINESTRING",
             "MULTIPOLYGON", "GEOMETRYCOLLECTION")
SPATIAL_FUNCTIONS = {
    "S_INTERSECTS": "ST_Intersects", "S_DISJOINT": "ST_Disjoint", "S_CONTAINS": "ST_Contains",
    "S_WITHIN": "ST_Within", "S_TOUCHES": "ST_Touches", "S_CROSSES": "ST_Crosses",
    "S_OVERLAPS": "ST_Overlaps", "S_EQUALS": "ST_Equals",
}
COMPARISONS = ("=", "<>", "<", "<=", ">", ">=")

_NUMBER_TYPES = {"smallint", "integer", "bigint", "real", "double precision", "numeric"}
_TYPE_KIND = {"boolean": "boolean", "date": "date", "timestamp with time zone": "timestamp",
              "timestamp without time zone": "timestamp"}

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<quoted>"[^"]+")
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><>|<=|>=|=|<|>)
  | (?P<punct>[(),])
""", re.VERBOSE)


def value_kind(sql_type: str) -> str:
    """The CQL2 kind of a column type: number, string, boolean, date or timestamp."""
    if sql_type in _NUMBER_TYPES:
        return "number"
    return _TYPE_KIND.get(sql_type, "string")


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    start: int
    end: int


def tokenize(source: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            raise InvalidParameter(f"filter: unexpected character {source[pos]!r} at position "
                                   f"{pos}")
        if match.lastgroup != "space":
            tokens.append(Token(match.lastgroup or "", match.group(), pos, match.end()))
        pos = match.end()
    return tokens


@dataclass
class _Operand:
    sql: str
    kind: str
    label: str


@dataclass
class Cql2Parser:
    """Recursive descent over the tokens; builds SQL text and the parameters it binds."""

    source: str
    fields: dict[str, str]
    prefix: str = "cql"
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        self.tokens = tokenize(self.source)
        self.index = 0

    def compile(self) -> tuple[str, dict]:
        if not self.tokens:
            raise InvalidParameter("filter: the filter is empty")
        sql = self._or()
        if self.index < len(self.tokens):
            self._fail("AND, OR or the end of the filter")
        return sql, self.params

    # --- tokens -------------------------------------------------------------------------

    def _peek(self, offset: int = 0) -> Token | None:
        at = self.index + offset
        return self.tokens[at] if at < len(self.tokens) else None

    def _is_word(self, *words: str, offset: int = 0) -> bool:
        token = self._peek(offset)
        return token is not None and token.kind == "word" and token.text.upper() in words

    def _next(self) -> Token:
        token = self._peek()
        if token is None:
            self._fail("more input")
        self.index += 1
        return token

    def _expect(self, text: str) -> Token:
        token = self._peek()
        if token is None or token.text.upper() != text:
            self._fail(repr(text))
        self.index += 1
        return token

    def _fail(self, expected: str) -> NoReturn:
        token = self._peek()
        where = (f"near {token.text!r} at position {token.start}" if token
                 else "at the end of the filter")
        raise InvalidParameter(f"filter: expected {expected} {where}")

    def _bind(self, value) -> str:
        name = f"{self.prefix}{len(self.params)}"
        self.params[name] = value
        return f":{name}"

    # --- boolean structure --------------------------------------------------------------

    def _or(self) -> str:
        parts = [self._and()]
        while self._is_word("OR"):
            self.index += 1
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def _and(self) -> str:
        parts = [self._not()]
        while self._is_word("AND"):
            self.index += 1
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def _not(self) -> str:
        if self._is_word("NOT"):
            self.index += 1
            return f"(NOT {self._not()})"
        return self._predicate()

    def _predicate(self) -> str:
        token = self._peek()
        if token is not None and token.text == "(":
            self.index += 1
            inner = self._or()
            self._expect(")")
            return f"({inner})"
        if token is not None and token.kind == "word" and token.text.upper() in SPATIAL_FUNCTIONS:
            return self._spatial()
        return self._comparison()

    # --- predicates ---------------------------------------------------------------------

    def _comparison(self) -> str:
        left = self._scalar()
        negate = "NOT " if self._is_word("NOT") else ""
        if negate:
            self.index += 1
        if self._is_word("LIKE"):
            self.index += 1
            pattern = self._scalar()
            self._same_kind(left, pattern, only=("string",), operator="LIKE")
            return f"({left.sql} {negate}LIKE {pattern.sql})"
        if self._is_word("BETWEEN"):
            self.index += 1
            low = self._scalar()
            self._expect("AND")
            high = self._scalar()
            self._same_kind(left, low, operator="BETWEEN")
            self._same_kind(left, high, operator="BETWEEN")
            return f"({left.sql} {negate}BETWEEN {low.sql} AND {high.sql})"
        if self._is_word("IN"):
            self.index += 1
            return self._in_list(left, negate)
        if negate:
            self._fail("LIKE, BETWEEN or IN after NOT")
        if self._is_word("IS"):
            self.index += 1
            is_not = self._is_word("NOT")
            self.index += is_not
            self._expect("NULL")
            return f"({left.sql} IS {'NOT ' if is_not else ''}NULL)"
        token = self._peek()
        if token is None or token.kind != "op":
            self._fail("a comparison (=, <>, <, <=, >, >=, LIKE, BETWEEN, IN, IS NULL)")
        self.index += 1
        right = self._scalar()
        self._same_kind(left, right, operator=token.text)
        return f"({left.sql} {token.text} {right.sql})"

    def _in_list(self, left: _Operand, negate: str) -> str:
        self._expect("(")
        items = [self._scalar()]
        while (comma := self._peek()) is not None and comma.text == ",":
            self.index += 1
            items.append(self._scalar())
        self._expect(")")
        for item in items:
            self._same_kind(left, item, operator="IN")
        return f"({left.sql} {negate}IN ({', '.join(item.sql for item in items)}))"

    def _spatial(self) -> str:
        function = SPATIAL_FUNCTIONS[self._next().text.upper()]
        self._expect("(")
        first = self._geometry()
        self._expect(",")
        second = self._geometry()
        self._expect(")")
        return f"{function}({first}, {second})"

    # --- operands -----------------------------------------------------------------------

    def _scalar(self) -> _Operand:
        token = self._peek()
        if token is None:
            self._fail("a property name or a literal")
        if token.kind == "string":
            self.index += 1
            text = token.text[1:-1].replace("''", "'")
            return _Operand(self._bind(text), "string", token.text)
        if token.kind == "number":
            self.index += 1
            value = float(token.text) if re.search(r"[.eE]", token.text) else int(token.text)
            return _Operand(self._bind(value), "number", token.text)
        if self._is_word("TRUE", "FALSE"):
            self.index += 1
            return _Operand(self._bind(token.text.upper() == "TRUE"), "boolean", token.text)
        after = self._peek(1)
        if self._is_word("DATE", "TIMESTAMP") and after is not None and after.text == "(":
            return self._temporal()
        if token.kind in ("word", "quoted"):
            return self._property()
        self._fail("a property name or a literal")

    def _property(self) -> _Operand:
        token = self._next()
        name = token.text.strip('"')
        if name in GEOMETRY_PROPERTIES:
            raise InvalidParameter(f"filter: the geometry '{name}' can only be used in a "
                                   f"spatial function such as S_INTERSECTS")
        if name not in self.fields:
            known = ", ".join(self.fields)
            raise InvalidParameter(f"filter: unknown property '{name}' at position "
                                   f"{token.start}; queryable properties are: {known}")
        return _Operand(quote_identifier(name), value_kind(self.fields[name]), name)

    def _temporal(self) -> _Operand:
        keyword = self._next().text.upper()
        self._expect("(")
        token = self._next()
        self._expect(")")
        text = token.text[1:-1] if token.kind == "string" else ""
        parse = date.fromisoformat if keyword == "DATE" else datetime.fromisoformat
        try:
            parse(text.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidParameter(f"filter: {keyword}({token.text}) is not an ISO 8601 "
                                   f"{keyword.lower()}") from None
        cast = "date" if keyword == "DATE" else "timestamptz"
        return _Operand(f"CAST({self._bind(text)} AS {cast})", keyword.lower(), token.text)

    def _geometry(self) -> str:
        token = self._peek()
        if token is not None and token.text.strip('"') in GEOMETRY_PROPERTIES:
            self.index += 1
            return "geom"
        if self._is_word("BBOX"):
            return self._bbox()
        if self._is_word(*WKT_TYPES):
            return self._wkt()
        self._fail("the geometry property, a WKT geometry or BBOX(...)")

    def _bbox(self) -> str:
        self.index += 1
        self._expect("(")
        values = [self._number()]
        for _ in range(3):
            self._expect(",")
            values.append(self._number())
        self._expect(")")
        bound = ", ".join(self._bind(v) for v in values)
        return f"ST_MakeEnvelope({bound}, 4326)"

    def _number(self) -> float:
        token = self._next()
        if token.kind != "number":
            self.index -= 1
            self._fail("a number")
        return float(token.text)

    def _wkt(self) -> str:
        # The WKT literal is cut from the source between balanced parentheses and checked
        # by GEOS before it is bound, so a malformed one is a 400, not a database error.
        start = self._next().start
        while self._is_word("Z", "M", "ZM"):
            self.index += 1
        depth, end = 0, start
        while True:
            token = self._next()
            depth += {"(": 1, ")": -1}.get(token.text, 0)
            end = token.end
            if depth == 0:
                break
        text = self.source[start:end]
        try:
            shapely.from_wkt(text)
        except shapely.errors.GEOSException as error:
            raise InvalidParameter(f"filter: invalid WKT geometry {text!r}: {error}") from None
        return f"ST_GeomFromText({self._bind(text)}, 4326)"

    def _same_kind(self, left: _Operand, right: _Operand, operator: str,
                   only: tuple[str, ...] | None = None) -> None:
        if only and left.kind not in only:
            raise InvalidParameter(f"filter: {operator} needs a {' or '.join(only)} operand; "
                                   f"'{left.label}' is a {left.kind}")
        if left.kind != right.kind:
            raise InvalidParameter(f"filter: cannot compare '{left.label}' ({left.kind}) with "
                                   f"{right.label} ({right.kind}) using {operator}")


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def compile_filter(source: str, fields: dict[str, str], prefix: str = "cql") -> tuple[str, dict]:
    """``(sql, params)`` for a CQL2-text filter over ``fields`` (name -> column type)."""
    return Cql2Parser(source, fields, prefix).compile()
