"""Principals: API keys stored hashed in the database (``twin keys``) and JWTs verified locally
(HS256 with a secret, RS256/ES256 with a JWKS file made here)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy import Engine, text

from tests.servers import ADMIN, LiveServer, closed_settings
from twin import cli
from twin.core.errors import InvalidParameter, NotFound
from twin.core.settings import Settings

SECRET = "test-jwt-secret-with-at-least-32-bytes!!"
LOCATE = "/query/locate?lon=106.55&lat=29.56"


@pytest.fixture(scope="module")
def signing_keys() -> dict:
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "stranger": rsa.generate_private_key(public_exponent=65537, key_size=2048)}


@pytest.fixture(scope="module")
def jwks_file(signing_keys: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The public halves only, as an identity provider would publish them."""
    rsa_jwk = RSAAlgorithm.to_jwk(signing_keys["rsa"].public_key(), as_dict=True)
    ec_jwk = ECAlgorithm.to_jwk(signing_keys["ec"].public_key(), as_dict=True)
    document = {"keys": [{**rsa_jwk, "kid": "rsa-1", "alg": "RS256", "use": "sig"},
                         {**ec_jwk, "kid": "ec-1", "alg": "ES256", "use": "sig"}]}
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps(document))
    return path


@pytest.fixture(scope="module")
def token_server(engine: Engine, database_url: str, jwks_file: Path) -> Iterator[LiveServer]:
    settings = closed_settings(database_url, jwt_secret=SECRET, jwks_file=jwks_file)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture()
def api(token_server: LiveServer) -> Iterator[httpx.Client]:
    with token_server.client() as client:
        yield client


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# --- API keys in the database ---------------------------------------------------------------

def test_keys_are_stored_hashed_never_in_plain(database_url: str, engine: Engine, api):
    settings = Settings(database_url=database_url)
    key = cli.keys_add(settings, "hash-check", "viewer", "district=500103")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT row_to_json(k)::text AS doc, hash, prefix FROM "
                                 "api_keys k WHERE name = 'hash-check'")).one()
        dump = "\n".join(conn.execute(text(
            "SELECT row_to_json(k)::text FROM api_keys k")).scalars())
    secret = key.rsplit("_", 1)[1]
    assert key not in dump and secret not in dump
    assert rows.hash == hashlib.sha256(key.encode()).hexdigest()
    assert key.startswith(f"twin_{rows.prefix}_")
    assert api.get("/collections", headers=bearer(key)).status_code == 200


def test_add_list_and_revoke_through_the_cli(database_url: str, api, capsys):
    settings = Settings(database_url=database_url)
    key = cli.keys_add(settings, "cli-editor", "gis-editor")
    assert capsys.readouterr().out.strip() == key  # printed once, on stdout
    listed = {row["name"]: row for row in cli.keys_list(settings)}
    assert listed["cli-editor"]["role"] == "gis-editor"
    assert listed["cli-editor"]["scope"] == "city" and listed["cli-editor"]["revoked_at"] is None
    assert key not in capsys.readouterr().out
    assert api.post("/sensors/readings", json={"readings": []},
                    headers=bearer(key)).status_code == 200

    revoked = cli.keys_revoke(settings, "cli-editor")
    assert revoked["revoked_at"] is not None
    refused = api.post("/sensors/readings", json={"readings": []}, headers=bearer(key))
    assert refused.status_code == 401
    assert refused.json()["description"] == "unknown or revoked API key"
    again = cli.keys_add(settings, "cli-editor", "viewer")  # the name is free again
    assert api.get("/collections", headers=bearer(again)).status_code == 200


def test_the_cli_command_prints_a_working_key(database_url: str, api):
    env = {**os.environ, "TWIN_DATABASE_URL": database_url}
    add = subprocess.run([sys.executable, "-m", "twin.cli", "keys", "add", "--name",
                          "subprocess-planner", "--role", "planner", "--scope",
                          "street=500103001"], env=env, capture_output=True, text=True,
                         check=True)
    key = add.stdout.strip()
    assert "shown only this once" in add.stderr and key not in add.stderr
    assert api.get(LOCATE, headers=bearer(key)).status_code == 200
    listing = subprocess.run([sys.executable, "-m", "twin.cli", "keys", "list"], env=env,
                             capture_output=True, text=True, check=True).stdout
    assert "subprocess-planner" in listing and "street=500103001" in listing
    assert key.rsplit("_", 1)[1] not in listing
    subprocess.run([sys.executable, "-m", "twin.cli", "keys", "revoke", "subprocess-planner"],
                   env=env, capture_output=True, check=True)
    assert api.get(LOCATE, headers=bearer(key)).status_code == 401


def test_bad_key_requests_are_refused_naming_the_problem(database_url: str):
    settings = Settings(database_url=database_url)
    with pytest.raises(InvalidParameter, match="role: expected one of"):
        cli.keys_add(settings, "x", "root")
    with pytest.raises(InvalidParameter, match="scope: expected"):
        cli.keys_add(settings, "x", "viewer", "district=5001")
    cli.keys_add(settings, "twice", "viewer")
    with pytest.raises(InvalidParameter, match="live key named 'twice' exists"):
        cli.keys_add(settings, "twice", "viewer")
    with pytest.raises(NotFound, match="no key with id or live name"):
        cli.keys_revoke(settings, "nobody")


def test_admins_manage_keys_over_http(api):
    created = api.post("/keys", json={"name": "http-viewer", "role": "viewer"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert api.get("/collections", headers=bearer(key)).status_code == 200
    assert api.get("/keys", headers=bearer(key)).status_code == 403
    listed = api.get("/keys", headers=ADMIN).json()["keys"]
    assert all("key" not in row and "hash" not in row for row in listed)
    assert api.delete(f"/keys/{created.json()['id']}", headers=ADMIN).status_code == 200
    assert api.get("/collections", headers=bearer(key)).status_code == 401
    bad = api.post("/keys", json={"name": "x", "role": "superuser"}, headers=ADMIN)
    assert bad.status_code == 400 and "role" in bad.json()["description"]


# --- JWT --------------------------------------------------------------------------------------

def claims(role: str = "planner", **extra) -> dict:
    return {"sub": "hall-7", "role": role, "scope": "district=500103",
            "exp": int(time.time()) + 300, **extra}


def test_hs256_token_with_the_secret_is_accepted(api):
    token = jwt.encode(claims("gis-editor"), SECRET, algorithm="HS256")
    assert api.get(LOCATE, headers=bearer(token)).status_code == 200
    posted = api.post("/sensors/readings", json={"readings": []}, headers=bearer(token))
    assert posted.status_code == 200
    wrong = jwt.encode(claims(), "another-secret-of-at-least-32-bytes!!!", algorithm="HS256")
    refused = api.get(LOCATE, headers=bearer(wrong))
    assert refused.status_code == 401 and "signature" in refused.json()["description"]


def test_rs256_and_es256_tokens_verify_against_the_jwks_file(api, signing_keys):
    viewer = jwt.encode(claims("viewer"), signing_keys["rsa"], algorithm="RS256",
                        headers={"kid": "rsa-1"})
    assert api.get("/collections", headers=bearer(viewer)).status_code == 200
    refused = api.get(LOCATE, headers=bearer(viewer))
    assert refused.status_code == 403 and "'planner'" in refused.json()["description"]
    planner = jwt.encode(claims(), signing_keys["ec"], algorithm="ES256",
                         headers={"kid": "ec-1"})
    assert api.get(LOCATE, headers=bearer(planner)).status_code == 200


def test_forged_tokens_are_401(api, signing_keys):
    stranger = jwt.encode(claims(), signing_keys["stranger"], algorithm="RS256",
                          headers={"kid": "rsa-1"})
    response = api.get(LOCATE, headers=bearer(stranger))
    assert response.status_code == 401 and "signature" in response.json()["description"]
    unsigned = jwt.encode(claims(), None, algorithm="none")
    response = api.get(LOCATE, headers=bearer(unsigned))
    assert response.status_code == 401 and "'none' is not accepted" in response.text
    # The RSA public key used as an HMAC secret: the HS256 check only ever uses the secret.
    public_pem = signing_keys["rsa"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert api.get(LOCATE, headers=bearer(hs256_by_hand(claims(), public_pem))).status_code == 401


def hs256_by_hand(payload: dict, secret: bytes) -> str:
    """PyJWT refuses to HMAC with a PEM key, so an attacker's token is made by hand."""
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + part(json.dumps(payload).encode()))
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{part(signature)}"


def test_expired_and_incomplete_tokens_are_401_with_the_reason(api, signing_keys):
    expired = jwt.encode(claims(exp=int(time.time()) - 3600), SECRET, algorithm="HS256")
    response = api.get(LOCATE, headers=bearer(expired))
    assert response.status_code == 401
    assert response.json()["description"] == "bearer token: expired ('exp' is in the past)"
    no_role = claims()
    del no_role["role"]
    response = api.get(LOCATE, headers=bearer(jwt.encode(no_role, SECRET, algorithm="HS256")))
    assert response.status_code == 401 and "'role' claim is required" in response.text
    no_exp = claims()
    del no_exp["exp"]
    response = api.get(LOCATE, headers=bearer(jwt.encode(no_exp, SECRET, algorithm="HS256")))
    assert response.status_code == 401 and "'exp' claim is required" in response.text
    bad_scope = jwt.encode(claims(scope="district=12"), SECRET, algorithm="HS256")
    response = api.get(LOCATE, headers=bearer(bad_scope))
    assert response.status_code == 401 and "scope: expected" in response.text
    bad_role = jwt.encode(claims("root"), SECRET, algorithm="HS256")
    assert api.get(LOCATE, headers=bearer(bad_role)).status_code == 401
