"""The web map's API types come from twin's OpenAPI document, made without a database.

``python -m twin.api.openapi_dump`` writes the document the web build generates its types from
(the Makefile's ``web`` target, ``npm run types``); the oracle for the dump is the document a
live server serves at /api. tsc then compiles tests/js/api_drift.ts, whose wrong calls must
each be a type error against those types.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
GENERATED = WEB / "src" / "generated" / "openapi.ts"
TSC = WEB / "node_modules" / ".bin" / "tsc"


def _dump(out: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # No database anywhere: a closed port and a home with no cluster.
    env = {**os.environ, "TWIN_DATABASE_URL": "postgresql+psycopg://nobody:x@127.0.0.1:9/none",
           "TWIN_HOME": str(tmp_path / "no-cluster")}
    return subprocess.run([sys.executable, "-m", "twin.api.openapi_dump", str(out)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def _without_security(document: dict) -> dict:
    """The document less what depends on the server's auth settings (who may call what)."""
    document = json.loads(json.dumps(document))
    document.get("components", {}).pop("securitySchemes", None)
    for operations in document["paths"].values():
        for operation in operations.values():
            operation.pop("security", None)
    return document


def test_the_openapi_dump_needs_no_database_and_is_what_the_server_serves(
        client: httpx.Client, tmp_path: Path):
    out = tmp_path / "openapi.json"
    first = _dump(out, tmp_path)
    assert first.returncode == 0, first.stderr
    assert not (tmp_path / "no-cluster").exists()  # no cluster was started for it
    dumped = json.loads(out.read_text())
    assert _without_security(dumped) == _without_security(client.get("/api").json())
    # An unchanged document leaves the file alone (make and tsc see no change).
    before = out.stat().st_mtime_ns
    second = _dump(out, tmp_path)
    assert second.returncode == 0 and "unchanged" in second.stdout
    assert out.stat().st_mtime_ns == before


def test_tsc_refuses_calls_the_server_would_not_understand(tmp_path: Path):
    if not GENERATED.exists() or not TSC.exists():
        pytest.fail("the web types are not generated: run `make web` (npm run --prefix web build)")
    config = {
        "extends": str(WEB / "tsconfig.json"),
        "compilerOptions": {"noEmit": True, "typeRoots": [str(WEB / "node_modules" / "@types")],
                            "types": ["geojson"]},
        "include": [],
        "files": [str(ROOT / "tests" / "js" / "api_drift.ts")],
    }
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    result = subprocess.run([str(TSC), "-p", str(tmp_path / "tsconfig.json")],
                            capture_output=True, text=True, timeout=300, check=False)
    # Exit 0: the right calls compile and every @ts-expect-error line is an error.
    assert result.returncode == 0, result.stdout + result.stderr
