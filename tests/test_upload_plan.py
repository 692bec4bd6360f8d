"""An upload job's row holds a typed plan, not a bag of private keys: the form as sent (what
GET /jobs shows), the plan (source CRS as its EPSG code, datum, file, owner) and the runner's
marks. Oracles: pyproj (the CRS the form named), the form the test sent."""

from __future__ import annotations

from pyproj import CRS
from sqlalchemy import Engine, text

from layers.crs import Datum
from layers.plan import JobPlan
from tests.uploads import PLACES, post_layer, wait

# The upload server and its client (fixtures shared by the upload tests).


def keys(value) -> set[str]:
    """Every key of a JSON document, at any depth."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys(v)}
    return set()


def test_the_job_row_holds_the_form_and_a_typed_plan(api, engine: Engine):
    rows = ["name,lon,lat"] + [f"p{i},{lon},{lat}" for i, (lon, lat) in enumerate(PLACES)]
    sent = {"title": "planned", "source_crs": "epsg:4490", "datum": "GCJ-02"}
    response = post_layer(api, "planned.csv", "\n".join(rows).encode(), **sent)
    assert response.status_code == 202, response.text
    job = wait(api, response.json())
    assert job["state"] == "succeeded", job
    assert job["params"] == sent
    with engine.connect() as conn:
        params = conn.execute(text("SELECT params FROM upload_jobs WHERE id = :id"),
                              {"id": job["id"]}).scalar_one()
    assert set(params) == {"form", "plan", "runner"}
    assert not any(key.startswith("_") for key in keys(params)), params
    assert params["runner"]["claimed"] is True
    plan = JobPlan.from_row(params)
    assert plan.source_crs == CRS.from_epsg(4490) and plan.datum is Datum.GCJ02
    assert (plan.kind, plan.format, plan.title) == ("vector", "csv", "planned")
    assert plan.owner_scope is None and plan.shared  # an editor of the city
    assert JobPlan.from_row(plan.to_row()) == plan
    layer = api.get(f"/layers/{job['layer_id']}").json()
    assert layer["source_crs"] == "EPSG:4490" and layer["source_datum"] == "gcj02"
