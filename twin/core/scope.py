"""Jurisdiction as SQL: the rows a principal's ``Scope`` may see, in one place.

Every function returns a predicate (SQL text) and its bound values; codes are always bound,
never formatted into the text. A city scope gives ``TRUE`` and no values, so callers add the
predicate unconditionally. ``name`` prefixes the bound values, so one statement can hold
several predicates.

The rules (issue 7):

* **Admin units, risk points and events by code.** Codes nest by prefix (district 6 digits,
  street 9, community 12, grid 15), so a unit lies in the scope when its code starts with a
  scope code and a risk point or an event when its ``grid_code`` does. A district principal
  sees its district's polygon and everything below it; a street principal its street and
  below. Nobody but the city sees the city polygon or a unit *above* their own (a street
  centre does not get its district's outline), and neighbours are never visible, even where
  they touch.
* **Supply depots and buildings by district code, streets by place.** Their
  ``district_code`` is where they stand (it matches their location everywhere in the sample
  city), so a district scope compares codes, which is exact at borders and needs no geometry;
  a street scope tests the location against the street polygons.
* **Response teams: stationed in the scope, or answering for a street in it.** A street has
  rarely a team of its own; the teams ``team_jurisdictions`` assigns to its streets are the
  ones its centre dispatches, even when one is stationed across a district border.
* **Everything else (roads, pipes, sensors, hazard sources, uploaded layers) by place:** rows
  whose geometry meets the union of the scope's admin polygons. The polygons are read by an
  uncorrelated scalar subquery, which PostgreSQL runs once per statement (an InitPlan), so
  the union is built once and PostGIS's prepared-geometry cache serves every row's test. One
  code reads the polygon as stored (a union of one costs ~10 ms for a district).
* **Uploaded layers as a whole** (listings, tiles, items) by ``layers.owner_scope`` (the
  uploader's ``Scope.key``; NULL for city-wide) and ``layers.shared``: see ``layer_visible``.
"""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import NotFound
from twin.core.layer import Layer, LayerRegistry
from twin.core.principal import CITY, Forbidden, Scope

DISTRICT_DIGITS, STREET_DIGITS = 6, 9


@dataclass(frozen=True)
class ScopeSql:
    sql: str
    params: dict

    @property
    def and_sql(self) -> str:
        """`` AND (predicate)``, or nothing for the city."""
        return "" if self.sql == "TRUE" else f" AND ({self.sql})"


EVERYTHING = ScopeSql("TRUE", {})


def _column(alias: str | None, name: str) -> str:
    return f"{alias}.{name}" if alias else name


def code_in_scope(scope: Scope, code: str) -> bool:
    """Whether an admin code (unit or grid) lies in the scope."""
    return scope.is_city or any(code.startswith(prefix) for prefix in scope.prefixes)


def _next_prefix(prefix: str) -> str | None:
    """The smallest digit string of the prefix's length above it; None past all nines."""
    if set(prefix) == {"9"}:
        return None
    return str(int(prefix) + 1).zfill(len(prefix))


def code_predicate(scope: Scope, column: str, name: str = "scope") -> ScopeSql:
    """Rows whose admin code ``column`` starts with a district or street code of the scope.

    Written as ranges (``code >= '500112' AND code < '500113'``), which the btree indexes on
    ``admin_units.code`` and ``risk_points.grid_code`` serve (ten times quicker than
    ``left(code, 6) = ...`` over 120,000 points). For strings of digits (admin codes are, by
    a check constraint, and grid codes reference them) the range holds exactly the codes
    with the prefix, in any collation.
    """
    if scope.is_city:
        return EVERYTHING
    clauses, params = [], {}
    for i, prefix in enumerate(scope.prefixes):
        params[f"{name}_{i}"] = prefix
        clause = f"{column} >= :{name}_{i}"
        upper = _next_prefix(prefix)
        if upper is not None:
            params[f"{name}_{i}_end"] = upper
            clause += f" AND {column} < :{name}_{i}_end"
        clauses.append(f"({clause})")
    return ScopeSql("(" + " OR ".join(clauses) + ")", params)


def units_geometry(codes: frozenset[str], name: str) -> ScopeSql:
    """A scalar subquery: the polygon (or the union of the polygons) of admin units ``codes``.

    An unknown code has no polygon, so it adds nothing (and alone it meets nothing).
    """
    if len(codes) == 1:
        return ScopeSql(f"(SELECT u.geom FROM admin_units AS u WHERE u.code = :{name}_u)",
                        {f"{name}_u": next(iter(codes))})
    return ScopeSql(f"(SELECT ST_Union(u.geom) FROM admin_units AS u "
                    f"WHERE u.code = ANY(CAST(:{name}_u AS text[])))",
                    {f"{name}_u": sorted(codes)})


def spatial_predicate(scope: Scope, geom: str, name: str = "scope") -> ScopeSql:
    """Rows whose geometry ``geom`` meets the scope's admin polygons."""
    if scope.is_city:
        return EVERYTHING
    units = units_geometry(scope.districts | scope.streets, name)
    return ScopeSql(f"ST_Intersects({geom}, {units.sql})", units.params)


def district_predicate(scope: Scope, district: str, geom: str,
                       name: str = "scope") -> ScopeSql:
    """Rows with a ``district_code`` where they stand: the code for districts, the place for
    streets."""
    if scope.is_city:
        return EVERYTHING
    clauses, params = [], {}
    if scope.districts:
        clauses.append(f"{district} = ANY(CAST(:{name}_d AS text[]))")
        params[f"{name}_d"] = sorted(scope.districts)
    if scope.streets:
        streets = units_geometry(scope.streets, f"{name}_st")
        clauses.append(f"ST_Intersects({geom}, {streets.sql})")
        params |= streets.params
    return ScopeSql("(" + " OR ".join(clauses) + ")", params)


def team_predicate(scope: Scope, alias: str | None = None, name: str = "scope") -> ScopeSql:
    """Response teams stationed in the scope or answering for one of its streets."""
    if scope.is_city:
        return EVERYTHING
    stationed = district_predicate(scope, _column(alias, "district_code"),
                                   _column(alias, "geom"), name)
    assigned = code_predicate(scope, "j.admin_code", f"{name}_j")
    return ScopeSql(f"({stationed.sql} OR {_column(alias, 'id')} IN "
                    f"(SELECT j.team_id FROM team_jurisdictions AS j WHERE {assigned.sql}))",
                    stationed.params | assigned.params)


# Tables with a rule other than "by place"; the column holding their admin code.
_BY_CODE = {"risk_points": "grid_code", "admin_units": "code", "events": "grid_code"}
_BY_DISTRICT = ("supply_depots", "buildings")


def table_predicate(scope: Scope, table: str | None, alias: str | None = None,
                    name: str = "scope") -> ScopeSql:
    """The rows of ``table`` in the scope, by the rules in the module docstring.

    ``alias`` qualifies the table's columns (None: unqualified, for a FROM of one table).
    """
    if scope.is_city or table is None:
        return EVERYTHING
    if table in _BY_CODE:
        return code_predicate(scope, _column(alias, _BY_CODE[table]), name)
    if table == "response_teams":
        return team_predicate(scope, alias, name)
    if table in _BY_DISTRICT:
        return district_predicate(scope, _column(alias, "district_code"),
                                  _column(alias, "geom"), name)
    return spatial_predicate(scope, _column(alias, "geom"), name)


# --- whole layers ------------------------------------------------------------------------

def _owner(owner_scope: str) -> Scope:
    """``layers.owner_scope``: a ``Scope.key`` (comma-separated 6- and 9-digit codes)."""
    codes = {code.strip() for code in owner_scope.split(",") if code.strip()}
    return Scope(frozenset(c for c in codes if len(c) == DISTRICT_DIGITS),
                 frozenset(c for c in codes if len(c) != DISTRICT_DIGITS))


def scopes_overlap(a: Scope, b: Scope) -> bool:
    """Whether two jurisdictions share ground: one holds (part of) the other."""
    if a.is_city or b.is_city:
        return True
    return any(p.startswith(q) or q.startswith(p) for p in a.prefixes for q in b.prefixes)


def layer_visible(scope: Scope, owner_scope: str | None, shared: bool | None) -> bool:
    """Built-in layers, layers shared city-wide and layers uploaded city-wide (no owner scope)
    are everyone's. An unshared upload is seen by the principals whose jurisdiction overlaps
    its uploader's: the uploader's own centre, the centres above it (its district, the city)
    and those below it (a district's upload is its streets' too)."""
    if shared is not False or not owner_scope or scope.is_city:
        return True
    return scopes_overlap(scope, _owner(owner_scope))


def visible_layer(scope: Scope, registry: LayerRegistry, layer_id: str) -> Layer:
    """The layer, or NotFound as if it did not exist (its existence is not the caller's),
    naming only the layers the caller may see."""
    try:
        layer = registry.get(layer_id)
    except NotFound:
        layer = None
    if layer is None or not layer_visible(scope, layer.owner_scope, layer.shared):
        known = ", ".join(sorted(layer.id for layer in visible_layers(scope, registry)))
        raise NotFound(f"unknown layer '{layer_id}'; available layers: {known}")
    return layer


def visible_layers(scope: Scope, registry: LayerRegistry) -> list[Layer]:
    return [layer for layer in registry
            if layer_visible(scope, layer.owner_scope, layer.shared)]


def scope_holds(outer: Scope, inner: Scope) -> bool:
    """Whether ``outer`` holds all of ``inner``: each of inner's codes lies under one of
    outer's (a district holds its streets; the city holds everything)."""
    if outer.is_city:
        return True
    if inner.is_city:
        return False
    return all(any(q.startswith(p) for p in outer.prefixes) for q in inner.prefixes)


def check_layer_writable(scope: Scope, layer: Layer) -> None:
    """Replacing, rolling back or deleting an upload is for a centre whose jurisdiction holds
    the uploader's: the uploader's own, the district above a street, the city. Seeing a layer
    (shared, or a district's seen by its streets) is not enough to change it."""
    if layer.origin != "upload" or scope.is_city:
        return
    if not layer.owner_scope or not scope_holds(scope, _owner(layer.owner_scope)):
        owner = layer.owner_scope or "the city"
        raise Forbidden(f"layer '{layer.id}' was uploaded for {owner}; only a centre whose "
                        "jurisdiction holds that may change or delete it")


# --- feature counts in a scope -----------------------------------------------------------

# (layer id, data version, scope key) -> count, per registry (a publish resolves a new one).
_COUNTS: WeakKeyDictionary[LayerRegistry, dict[tuple, int]] = WeakKeyDictionary()
MAX_CACHED_COUNTS = 10_000


async def feature_count(conn: AsyncConnection, registry: LayerRegistry, layer: Layer,
                        version: int, scope: Scope = CITY) -> int | None:
    """The layer's features in the scope, computed once per data version and scope."""
    if scope.is_city or layer.kind != "vector":
        return await registry.feature_count(conn, layer, version)
    counts = _COUNTS.setdefault(registry, {})
    key = (layer.id, version, scope.key)
    if key not in counts:
        predicate = table_predicate(scope, layer.source_table, "t")
        # source_table and source_filter come from the registry, never from a client.
        query = (f'SELECT count(*) FROM "{layer.source_table}" AS t '
                 f"WHERE ({layer.where}){predicate.and_sql}")
        if len(counts) >= MAX_CACHED_COUNTS:
            counts.clear()
        counts[key] = (await conn.execute(text(query), predicate.params)).scalar_one()
    return counts[key]
