"""One error shape, bounds in the OpenAPI document: every 4xx answer is ``{code,
description}`` (FastAPI's own parameter checks and unknown paths included), the document says
so instead of FastAPI's ``HTTPValidationError``, every numeric query parameter declares its
bounds, and a value just past any declared bound is refused naming the parameter.

The cases come from the document itself (``create_app(...).openapi()``, what ``/api``
serves), so a parameter added later is checked without editing this file.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
from httpx import Client

from tests.servers import ADMIN
from twin.api.app import create_app
from twin.core.settings import Settings

DOCUMENT = create_app(Settings()).openapi()
OPERATIONS = [(method.upper(), path, operation)
              for path, operations in DOCUMENT["paths"].items()
              for method, operation in operations.items()]
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

def _alternatives(schema: dict) -> list[dict]:
    """The schemas a parameter may take (``x | None`` is an anyOf with null)."""
    return [alt for alt in schema.get("anyOf", [schema]) if alt.get("type") != "null"]


def _error_schema(response: dict) -> dict:
    schema = response["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = DOCUMENT["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def assert_error_shape(response: httpx.Response, status: int | None = None) -> dict:
    if status is not None:
        assert response.status_code == status, response.text
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert set(body) == {"code", "description"}, body
    assert isinstance(body["code"], str) and body["code"]
    assert isinstance(body["description"], str) and body["description"]
    return body


# --- answers ------------------------------------------------------------------------------------
def test_a_missing_parameter_is_400_naming_it_and_where_it_is(client: Client):
    body = assert_error_shape(client.get("/query/h3"), 400)
    assert body["code"] == "InvalidParameter"
    assert body["description"].startswith("res (query parameter): is required"), body


def test_a_value_past_its_bound_names_the_bound_and_the_value(client: Client):
    body = assert_error_shape(client.get("/query/h3", params={"res": 17}), 400)
    assert body["description"].startswith("res (query parameter): must be <= 9, got 17")


@pytest.mark.parametrize("path, params, words", [
    ("/query/locate", {"lon": "east", "lat": 29.5}, ["lon (query parameter)", "a number",
                                                     "east"]),
    ("/query/locate", {"lon": "nan", "lat": 29.5}, ["lon (query parameter)", "finite", "nan"]),
    ("/query/nearest-teams", {"lon": 106.5, "lat": 29.5, "mode": "helicopter"},
     ["mode (query parameter)", "'distance' or 'road'", "helicopter"]),
    ("/query/coverage", {"team_type": "fire", "minutes": 0},
     ["minutes (query parameter)", "must be > 0", "got 0"]),
    ("/emergency-plans/x", {}, ["plan_id (path parameter)", "an integer", "got x"]),
])
def test_malformed_values_are_400_saying_what_was_expected(client: Client, path, params, words):
    description = assert_error_shape(client.get(path, params=params), 400)["description"]
    assert all(word in description for word in words), description


def test_every_refused_parameter_of_a_request_is_named(client: Client):
    description = assert_error_shape(client.get("/query/reach", params={"lat": 91}),
                                     400)["description"]
    for part in ("lon (query parameter): is required", "lat (query parameter): must be <= 90",
                 "minutes (query parameter): is required"):
        assert part in description, description


def test_body_fields_are_named_as_body_fields(client: Client):
    answer = client.post("/keys", json={"name": "x" * 65, "role": "superuser"}, headers=ADMIN)
    description = assert_error_shape(answer, 400)["description"]
    assert "name (body field): must be at most 64 characters" in description
    assert "role (body field): must be 'viewer', 'planner', 'gis-editor' or 'admin'" in description
    broken = client.post("/keys", content=b'{"name": ', headers=ADMIN | {
        "Content-Type": "application/json"})
    assert assert_error_shape(broken, 400)["description"].startswith("body: is not valid JSON")


def test_unknown_paths_and_methods_have_the_shape_too(client: Client):
    missing = assert_error_shape(client.get("/no/such/thing"), 404)
    assert missing["code"] == "NotFound" and "/no/such/thing" in missing["description"]
    wrong = client.delete("/query/h3", headers=ADMIN)
    body = assert_error_shape(wrong, 405)
    assert body["code"] == "MethodNotAllowed" and "GET" in wrong.headers["allow"]
    assert "DELETE" in body["description"] and "GET" in body["description"]
    asset = assert_error_shape(client.get("/assets/no-such-bundle.js"), 404)
    assert asset["code"] == "NotFound"


# --- the document -------------------------------------------------------------------------------
def test_the_served_document_is_the_one_these_cases_come_from(client: Client):
    served = client.get("/api").json()
    assert served["paths"].keys() == DOCUMENT["paths"].keys()
    assert served["components"]["schemas"]["Error"] == DOCUMENT["components"]["schemas"]["Error"]


def test_every_4xx_of_every_operation_is_declared_as_code_and_description():
    assert "HTTPValidationError" not in str(DOCUMENT)
    for method, path, operation in OPERATIONS:
        responses = operation["responses"]
        # FastAPI's 422 is replaced by the 400 twin sends; a route's own 422 is twin's.
        assert "422" not in responses or "HTTPValidationError" not in str(responses["422"]), (
            method, path)
        if operation.get("parameters") or "requestBody" in operation:
            assert "400" in responses, (method, path)
        if operation["x-twin-role"] != "public":  # every call with a role is rate-limited
            assert "Retry-After" in responses["429"]["headers"], (method, path)
        for status, response in responses.items():
            if status.startswith("4"):
                schema = _error_schema(response)
                assert set(schema["required"]) == {"code", "description"}, (method, path, status)
                assert {schema["properties"][name]["type"] for name in schema["required"]} == {
                    "string"}


def test_every_numeric_query_parameter_declares_a_bound():
    unbounded = {(method, path, parameter["name"])
                 for method, path, operation in OPERATIONS
                 for parameter in operation.get("parameters", [])
                 if parameter["in"] == "query"
                 for alt in _alternatives(parameter["schema"])
                 if alt.get("type") in ("integer", "number") and not any(
                     bound in alt for bound in BOUNDS)}
    assert unbounded == set(), sorted(unbounded)


# --- every declared bound is enforced, and named when it is ---------------------------------------
def _valid(schema: dict) -> Any:
    """A value inside a parameter's declared schema (only validation has to pass it)."""
    alt = _alternatives(schema)[0]
    if "enum" in alt:
        return alt["enum"][0]
    kind = alt.get("type")
    if kind in ("integer", "number"):
        low = alt.get("minimum", alt.get("exclusiveMinimum", 0))
        high = alt.get("maximum", alt.get("exclusiveMaximum", low + 2))
        return (low + high) // 2 if kind == "integer" else (low + high) / 2
    if kind == "boolean":
        return "false"
    if alt.get("format") == "date-time":
        return "2026-11-20T08:00:00Z"
    return schema.get("default") or "x" * max(1, alt.get("minLength", 1))


def _past(alt: dict) -> list[tuple[str, Any]]:
    """(bound, value just past it) for every bound a schema declares."""
    integer = alt.get("type") == "integer"
    cases: list[tuple[str, Any]] = []
    if "maximum" in alt:
        cases.append(("maximum", alt["maximum"] + 1 if integer
                      else math.nextafter(alt["maximum"], math.inf)))
    if "minimum" in alt:
        cases.append(("minimum", alt["minimum"] - 1 if integer
                      else math.nextafter(alt["minimum"], -math.inf)))
    for bound in ("exclusiveMaximum", "exclusiveMinimum"):
        if bound in alt:
            cases.append((bound, alt[bound]))
    if "maxLength" in alt:
        cases.append(("maxLength", "x" * (alt["maxLength"] + 1)))
    if "enum" in alt:
        cases.append(("enum", "no-such-choice"))
    return cases


def _bound_cases() -> list:
    cases = []
    for method, path, operation in OPERATIONS:
        # Query and path parameters: a header's bound (Last-Event-ID) is not sent from here.
        for parameter in (p for p in operation.get("parameters", [])
                          if p["in"] in ("query", "path")):
            for alt in _alternatives(parameter["schema"]):
                for bound, value in _past(alt):
                    cases.append(pytest.param(method, path, operation, parameter, value,
                                              id=f"{method} {path} {parameter['name']} {bound}"))
    return cases


@pytest.mark.parametrize("method, path, operation, parameter, value", _bound_cases())
def test_a_value_just_past_a_declared_bound_is_refused_naming_the_parameter(
        client: Client, method, path, operation, parameter, value):
    name = parameter["name"]
    values = {p["name"]: _valid(p["schema"]) for p in operation.get("parameters", [])
              if p["required"] or p["name"] == name}
    values[name] = value
    url = path
    for p in operation["parameters"]:
        if p["in"] == "path":
            url = url.replace("{" + p["name"] + "}", str(values.pop(p["name"])))
    query = {p["name"]: values[p["name"]] for p in operation["parameters"]
             if p["in"] == "query" and p["name"] in values}
    # The admin key: every route runs its checks instead of stopping at 401/403.
    # Streamed: a request that wrongly passed would open the never-ending push stream.
    with client.stream(method, url, params=query, headers=ADMIN) as answer:
        assert answer.status_code == 400, (method, url, answer.status_code)
        answer.read()
    body = assert_error_shape(answer, 400)
    assert name in body["description"], body
