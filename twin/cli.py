"""twin's command line: ``twin db up|down|status|migrate``, ``twin sample …``, ``twin serve``,
and ``twin run`` (everything ``make run`` needs, then serve)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from twin.cluster import ManagedCluster
from twin.errors import TwinError
from twin.settings import Settings, get_settings

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


def db_migrate(settings: Settings) -> None:
    from twin.db import sync_engine
    from twin.migrate import current_revision, upgrade

    engine = sync_engine(settings)
    upgrade(engine)
    log.info("database schema at revision %s", current_revision(engine))


def sample_generate(settings: Settings, scale: str, out: Path | None) -> None:
    from data_samples.generate import generate

    generate(out or settings.samples_dir / scale, scale)


def sample_load(settings: Settings, scale: str, force: bool) -> None:
    from twin.db import sync_engine
    from twin.sample_city import ensure_generated, load_sample

    sample_dir = ensure_generated(settings.samples_dir, scale)
    load_sample(sync_engine(settings), sample_dir, force=force)


def serve(settings: Settings) -> None:
    import uvicorn

    from twin.api.app import create_app

    log.info("serving the API and the web map on http://%s:%d/", settings.host, settings.port)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", access_log=False)


def run(settings: Settings, scale: str) -> None:
    db_up(settings)
    db_migrate(settings)
    sample_load(settings, scale, force=False)
    serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db", help="the database").add_subparsers(dest="action",
                                                                       required=True)
    for action in ("up", "down", "status", "migrate"):
        db.add_parser(action)

    sample = commands.add_parser("sample", help="the sample city").add_subparsers(
        dest="action", required=True)
    generate = sample.add_parser("generate")
    generate.add_argument("--scale", default=None, choices=("full", "small"))
    generate.add_argument("--out", type=Path)
    load = sample.add_parser("load")
    load.add_argument("--scale", default=None, choices=("full", "small"))
    load.add_argument("--force", action="store_true", help="reload even if already loaded")

    commands.add_parser("serve", help="serve the API and the web map")
    run_parser = commands.add_parser("run", help="db up, migrate, load the sample, serve")
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
        ("sample", "generate"): lambda: sample_generate(settings, scale, args.out),
        ("sample", "load"): lambda: sample_load(settings, scale, args.force),
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
