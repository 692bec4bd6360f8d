"""The pure parts of the jurisdiction rules (twin/core/scope.py): no database needed."""

from __future__ import annotations

import pytest

from twin.core.principal import CITY, parse_scope
from twin.core.scope import (
    code_in_scope,
    code_predicate,
    layer_visible,
    scopes_overlap,
    table_predicate,
)

YUBEI = parse_scope("district=500112")
YUBEI_STREET = parse_scope("street=500112002")
JIANGBEI = parse_scope("district=500105")


@pytest.mark.parametrize("code, inside", [
    ("500112", True), ("500112002", True), ("500112002003004", True), ("500113", False),
    ("500000", False), ("500105001", False)])
def test_codes_nest_by_prefix(code: str, inside: bool):
    assert code_in_scope(YUBEI, code) is inside
    assert code_in_scope(CITY, code)


def test_code_ranges_hold_exactly_the_codes_with_the_prefix():
    """The SQL range (>= prefix, < next prefix) agrees with startswith on digit strings."""
    scope = parse_scope("district=500119,999999;street=500112099")
    predicate = code_predicate(scope, "code", "s")
    ranges = []
    for i, prefix in enumerate(scope.prefixes):
        ranges.append((predicate.params[f"s_{i}"], predicate.params.get(f"s_{i}_end")))
        assert predicate.params[f"s_{i}"] == prefix
    codes = ["500119", "500119999999999", "500120", "500118999", "999999", "9999991",
             "500112099", "500112099001", "500112100", "500112098999"]
    for code in codes:
        in_range = any(code >= lo and (hi is None or code < hi) for lo, hi in ranges)
        assert in_range is code_in_scope(scope, code), code


def test_the_city_adds_no_predicate():
    for table in ("risk_points", "admin_units", "response_teams", "roads", None):
        assert table_predicate(CITY, table).sql == "TRUE"
        assert table_predicate(CITY, table).and_sql == ""


def test_values_are_bound_never_formatted():
    scope = parse_scope("district=500112;street=500103001")
    for table in ("risk_points", "admin_units", "response_teams", "buildings", "road_edges"):
        predicate = table_predicate(scope, table, "t")
        assert "500112" not in predicate.sql and "500103001" not in predicate.sql
        assert predicate.params


@pytest.mark.parametrize("viewer, owner, shared, visible", [
    (YUBEI, "500112", False, True),          # the uploader's own centre
    (YUBEI_STREET, "500112", False, True),   # a street of the uploading district
    (YUBEI, "500112002", False, True),       # the district above an uploading street
    (CITY, "500112", False, True),           # the city sees every upload
    (JIANGBEI, "500112", False, False),      # a neighbour does not
    (JIANGBEI, "500112", True, True),        # unless it is shared city-wide
    (JIANGBEI, None, False, True),           # an upload made city-wide
])
def test_uploaded_layers_follow_their_uploader(viewer, owner, shared, visible):
    assert layer_visible(viewer, owner, shared) is visible


def test_overlap_is_symmetric():
    pairs = [(YUBEI, YUBEI_STREET), (YUBEI, JIANGBEI), (CITY, JIANGBEI)]
    for a, b in pairs:
        assert scopes_overlap(a, b) is scopes_overlap(b, a)
