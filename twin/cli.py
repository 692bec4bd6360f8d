"""twin's command line: ``twin db up|down|status|migrate``, ``twin broker up|down|status``,
``twin sample …``,
``twin keys add|list|revoke``, ``twin serve``, and ``twin run`` (everything ``make run``
needs, then serve, with anonymous demo access)."""

from __future__ import annotations

import argparse
import base64
import ctypes
import logging
import os
import pickle
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from twin import ratelimit
from twin.core.broker import ManagedBroker
from twin.core.cluster import ManagedCluster
from twin.core.errors import TwinError
from twin.core.settings import Settings, get_settings

log = logging.getLogger("twin")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def db_up(settings: Settings) -> None:
    if not settings.managed:
        log.info("TWIN_DATABASE_URL is set: using that PostGIS, nothing to start")
        return
    ManagedCluster(settings).up()


def db_down(settings: Settings) -> None:
    if settings.managed:
        ManagedCluster(settings).down()


def db_status(settings: Settings) -> None:
    if not settings.managed:
        log.info("external database (TWIN_DATABASE_URL)")
        return
    log.info("managed PostGIS: %s", ManagedCluster(settings).status().describe())


def broker_up(settings: Settings) -> None:
    if settings.mqtt.url:
        log.info("TWIN_MQTT_URL is set: using that broker (%s), nothing to start",
                 settings.mqtt.url)
        return
    log.info("managed MQTT broker: %s", ManagedBroker(settings).up().describe())


def broker_down(settings: Settings) -> None:
    if not settings.mqtt.url:
        ManagedBroker(settings).down()


def broker_status(settings: Settings) -> None:
    if settings.mqtt.url:
        log.info("external MQTT broker (TWIN_MQTT_URL): %s", settings.mqtt.url)
        return
    log.info("managed MQTT broker: %s", ManagedBroker(settings).status().describe())


def with_broker(settings: Settings) -> tuple[Settings, ManagedBroker | None]:
    """The settings `twin run` serves with: TWIN_MQTT_URL's broker, or else the managed
    broker, started if it is not running (returned then, so the caller stops it again)."""
    if settings.mqtt.url:
        log.info("readings over MQTT: subscribing to %s (TWIN_MQTT_URL)", settings.mqtt.url)
        return settings, None
    broker = ManagedBroker(settings)
    started = None if broker.status().running else broker
    broker.up()
    log.info("readings over MQTT: the managed broker on %s (topic %s; TWIN_MQTT_URL uses "
             "another broker)", broker.url, settings.mqtt.topic)
    mqtt = settings.mqtt.model_copy(update={"url": broker.url})
    return settings.model_copy(update={"mqtt": mqtt}), started


def cluster_up(settings: Settings, nodes: int, standbys: int) -> None:
    """The primary, its standbys, ``nodes`` `twin serve` nodes and nginx in front
    (twin/core/topology.py); the database migrated first."""
    from twin.core.topology import ManagedTopology

    topology = ManagedTopology(settings, nodes, standbys)
    topology.cluster.up()
    db_migrate(settings)
    log.info("twin cluster:\n%s", topology.up().describe())
    log.info("serving on http://%s:%d/ through nginx (`twin cluster down` stops it all)",
             settings.host, settings.port)


def cluster_down(settings: Settings) -> None:
    from twin.core.topology import ManagedTopology

    ManagedTopology(settings).down()


def cluster_status(settings: Settings) -> None:
    from twin.core.topology import ManagedTopology

    log.info("twin cluster:\n%s", ManagedTopology(settings).status().describe())


def db_migrate(settings: Settings) -> None:
    from twin.core.db import sync_engine
    from twin.migrate import current_revision, upgrade

    engine = sync_engine(settings)
    upgrade(engine)
    log.info("database schema at revision %s", current_revision(engine))


def _sample(action: str, *args: str) -> None:
    """``python -m data_samples <action>`` in a child process: the sample city is a tool beside
    twin, never imported by it (its generator and loader stay out of the server)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "data_samples", action, *args], check=False)
    if done.returncode != 0:
        raise TwinError(f"the sample city's '{action}' failed (exit {done.returncode}); "
                        "see the lines above")


def sample_generate(scale: str, out: Path | None) -> None:
    _sample("generate", "--scale", scale, *(["--out", str(out)] if out else []))


def sample_load(scale: str, force: bool) -> None:
    _sample("load", "--scale", scale, *(["--force"] if force else []))


@contextmanager
def _transaction(settings: Settings) -> Iterator[Connection]:
    from twin.core.db import sync_engine

    engine = sync_engine(settings)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def keys_add(settings: Settings, name: str, role: str, scope: str = "city") -> str:
    """Create an API key; prints it (the only time it is shown) and returns it."""
    from twin import apikeys

    with _transaction(settings) as conn:
        row, key = apikeys.add_key(conn, name, role, scope)
    log.info("key %d '%s' (%s, scope %s) created; it is shown only this once:", row["id"],
             row["name"], row["role"], row["scope"])
    print(key, flush=True)
    return key


def keys_list(settings: Settings) -> list[dict]:
    from twin import apikeys

    with _transaction(settings) as conn:
        rows = apikeys.list_keys(conn)
    print(f"{'id':>4}  {'name':<24} {'role':<10} {'prefix':<12}  {'created':<19}  "
          f"{'revoked':<19}  scope")
    for row in rows:
        revoked = row["revoked_at"].strftime("%Y-%m-%d %H:%M:%S") if row["revoked_at"] else "-"
        print(f"{row['id']:>4}  {row['name']:<24} {row['role']:<10} {row['prefix']:<12}  "
              f"{row['created_at'].strftime('%Y-%m-%d %H:%M:%S'):<19}  {revoked:<19}  "
              f"{row['scope']}")
    return rows


def keys_revoke(settings: Settings, ident: str) -> dict:
    from twin import apikeys

    with _transaction(settings) as conn:
        row = apikeys.revoke_key(conn, ident)
    log.info("key %d '%s' revoked at %s", row["id"], row["name"], row["revoked_at"])
    return row


def audit_prune(settings: Settings, days: int | None) -> int:
    """Delete audit rows older than ``days`` (default TWIN_AUDIT_RETENTION_DAYS; 0 keeps all)."""
    import asyncio

    from twin.audit import prune_database

    days = settings.audit.retention_days if days is None else days
    if days < 0:
        raise TwinError(f"--days: a number of days, 0 or more (0 keeps every row); got {days}")
    if days == 0:
        log.info("audit log: retention 0 days keeps every row; nothing pruned")
        return 0
    deleted = asyncio.run(prune_database(settings, days))
    log.info("audit log: %d rows older than %d days pruned", deleted, days)
    return deleted


EDITOR_KEY_COMMAND = ".venv/bin/twin keys add --name <who> --role gis-editor"


def demo_access(settings: Settings) -> Settings:
    """`twin run` is the demo: anonymous viewer + planner access unless
    TWIN_AUTH_ANONYMOUS_ROLE says otherwise (set it to '' to turn it off)."""
    if "anonymous_role" in settings.auth.model_fields_set:
        return settings
    auth = settings.auth.model_copy(update={"anonymous_role": "planner"})
    return settings.model_copy(update={"auth": auth})


def log_access(settings: Settings) -> None:
    role = settings.auth.anonymous_role
    if role:
        log.warning("anonymous access is ON: callers without a key may read as '%s' (the "
                    "demo; TWIN_AUTH_ANONYMOUS_ROLE='' turns it off). Uploads need a "
                    "gis-editor key: %s", role, EDITOR_KEY_COMMAND)
    else:
        log.info("anonymous access is off: every call but /, /healthz and /api needs a key "
                 "(%s) or a JWT", EDITOR_KEY_COMMAND.replace("gis-editor", "<role>"))


def log_workers(settings: Settings, rate_table: Path | None) -> None:
    limits = settings.limits
    log.info("serving the API and the web map on http://%s:%d/ with %d worker process%s "
             "(TWIN_WORKERS)", settings.host, settings.port, settings.workers,
             "" if settings.workers == 1 else "es")
    if not limits.rate_per_s or settings.workers == 1:
        return
    if rate_table:
        log.info("rate limits (TWIN_LIMITS_RATE_PER_S %g/s, TWIN_LIMITS_BURST %d per key) are "
                 "shared by the %d worker processes through %s", limits.rate_per_s,
                 limits.burst, settings.workers, rate_table)
    else:
        log.warning("rate limits are enforced per worker process: with %d workers a key may "
                    "get up to %d x TWIN_LIMITS_RATE_PER_S (%g/s) and %d x TWIN_LIMITS_BURST "
                    "(%d), as its connections land on different processes", settings.workers,
                    settings.workers, limits.rate_per_s, settings.workers, limits.burst)


def serve(settings: Settings) -> None:
    import uvicorn

    from twin.api.app import create_app

    log_access(settings)
    # Idle keep-alive connections stay open 75 s (nginx's default), not uvicorn's 5 s: under
    # load a busy event loop can run the idle timer before the next request on that
    # connection is read, and the client gets a closed connection instead of an answer.
    # A worker gets 60 s, not uvicorn's 5, to answer the supervisor's health check: on a
    # loaded 2-core machine importing the app alone can take longer, and a worker that does
    # not answer in time is killed and started again, over and over.
    options: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": "info",
                               "access_log": False, "timeout_keep_alive": 75,
                               "timeout_worker_healthcheck": 60}
    if settings.workers == 1:
        log_workers(settings, None)
        uvicorn.run(create_app(settings), **options)
        return
    # The workers share one set of rate-limit buckets, in a table made before they start.
    rate_table = (ratelimit.create_table(settings.home, settings.port)
                  if settings.limits.rate_per_s else None)
    log_workers(settings, rate_table)
    # Worker processes build their own app from an import string; the settings travel to
    # them whole (pickled: secrets included, overrides such as demo_access kept).
    os.environ[WORKER_SETTINGS_ENV] = base64.b64encode(pickle.dumps(settings)).decode()
    os.environ[SERVER_PID_ENV] = str(os.getpid())
    os.environ[RATE_TABLE_ENV] = str(rate_table or "")
    try:
        uvicorn.run("twin.cli:worker_app", factory=True, workers=settings.workers, **options)
    finally:  # (a server killed outright leaves it: the next start removes it)
        if rate_table:
            ratelimit.remove_table(rate_table)


WORKER_SETTINGS_ENV = "_TWIN_WORKER_SETTINGS"
SERVER_PID_ENV = "_TWIN_SERVER_PID"
RATE_TABLE_ENV = "_TWIN_RATE_TABLE"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_app():
    """The app of one ``twin serve`` worker process, with the settings ``serve`` was given."""
    from twin.api.app import create_app

    # A spawned process starts with logging unconfigured: twin's own lines would go out bare.
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    _die_with_server()
    settings = pickle.loads(base64.b64decode(os.environ[WORKER_SETTINGS_ENV]))
    app = create_app(settings)
    table = os.environ.get(RATE_TABLE_ENV)
    app.state.rate_buckets = ratelimit.open_buckets(
        Path(table) if table else None, settings.limits.rate_per_s, settings.limits.burst)
    return app


def _die_with_server() -> None:
    """End this worker process when the ``twin serve`` process that started it ends.

    uvicorn stops its workers when it is stopped (Ctrl-C, SIGTERM), but a server killed
    outright (SIGKILL, the OOM killer) would leave them serving on its port and running its
    upload jobs: a restart could not bind the port, and no starting process could fail those
    jobs (layers/jobs.py recovers only when no other process is alive). So the workers get
    SIGKILL too, as the server did, and the next start recovers what they were doing.
    """
    server = int(os.environ.get(SERVER_PID_ENV, "0"))
    if not server or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:  # the server was gone before the line above took effect
        os.kill(os.getpid(), signal.SIGKILL)


def run(settings: Settings, scale: str) -> None:
    db_up(settings)
    db_migrate(settings)
    sample_load(scale, force=False)
    settings, started_broker = with_broker(demo_access(settings))
    try:
        serve(settings)
    finally:  # the broker stops with the server if this run started it
        if started_broker is not None:
            started_broker.down()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db", help="the database").add_subparsers(dest="action",
                                                                       required=True)
    for action in ("up", "down", "status", "migrate"):
        db.add_parser(action)

    broker = commands.add_parser("broker", help="the managed MQTT broker").add_subparsers(
        dest="action", required=True)
    for action in ("up", "down", "status"):
        broker.add_parser(action)

    cluster = commands.add_parser(
        "cluster", help="several nodes: the primary, hot standbys, twin nodes and nginx"
    ).add_subparsers(dest="action", required=True)
    cluster_up_parser = cluster.add_parser("up")
    cluster_up_parser.add_argument("--nodes", type=int, default=2,
                                   help="twin serve nodes behind nginx (default 2)")
    cluster_up_parser.add_argument("--standbys", type=int, default=1,
                                   help="hot standbys of the primary (default 1)")
    for action in ("down", "status"):
        cluster.add_parser(action)

    sample = commands.add_parser("sample", help="the sample city").add_subparsers(
        dest="action", required=True)
    generate = sample.add_parser("generate")
    generate.add_argument("--scale", default=None, choices=("full", "small"))
    generate.add_argument("--out", type=Path)
    load = sample.add_parser("load")
    load.add_argument("--scale", default=None, choices=("full", "small"))
    load.add_argument("--force", action="store_true", help="reload even if already loaded")

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="action",
                                                                      required=True)
    add = keys.add_parser("add", help="create a key and print it (shown only this once)")
    add.add_argument("--name", required=True, help="who holds it (shown as 'uploaded by')")
    add.add_argument("--role", required=True,
                     choices=("viewer", "planner", "gis-editor", "admin"))
    add.add_argument("--scope", default="city",
                     help="city (default) | district=<adcodes> | street=<street codes>")
    keys.add_parser("list", help="every key (never the key itself)")
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key", help="the key's id or name")

    audit = commands.add_parser("audit", help="the audit log").add_subparsers(dest="action",
                                                                             required=True)
    prune = audit.add_parser("prune", help="delete rows older than the retention")
    prune.add_argument("--days", type=int, default=None,
                       help="keep this many days (default TWIN_AUDIT_RETENTION_DAYS; 0: all)")

    commands.add_parser("serve", help="serve the API and the web map")
    run_parser = commands.add_parser(
        "run", help="db up, migrate, load the sample, broker up, serve")
    run_parser.add_argument("--scale", default=None, choices=("full", "small"))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    args = build_parser().parse_args(argv)
    settings = get_settings()
    scale = getattr(args, "scale", None) or settings.sample_scale
    actions = {
        ("db", "up"): lambda: db_up(settings),
        ("db", "down"): lambda: db_down(settings),
        ("db", "status"): lambda: db_status(settings),
        ("db", "migrate"): lambda: db_migrate(settings),
        ("broker", "up"): lambda: broker_up(settings),
        ("broker", "down"): lambda: broker_down(settings),
        ("broker", "status"): lambda: broker_status(settings),
        ("cluster", "up"): lambda: cluster_up(settings, args.nodes, args.standbys),
        ("cluster", "down"): lambda: cluster_down(settings),
        ("cluster", "status"): lambda: cluster_status(settings),
        ("sample", "generate"): lambda: sample_generate(scale, args.out),
        ("sample", "load"): lambda: sample_load(scale, args.force),
        ("keys", "add"): lambda: keys_add(settings, args.name, args.role, args.scope),
        ("keys", "list"): lambda: keys_list(settings),
        ("keys", "revoke"): lambda: keys_revoke(settings, args.key),
        ("audit", "prune"): lambda: audit_prune(settings, args.days),
        ("serve", None): lambda: serve(settings),
        ("run", None): lambda: run(settings, scale),
    }
    try:
        actions[(args.command, getattr(args, "action", None))]()
    except TwinError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
