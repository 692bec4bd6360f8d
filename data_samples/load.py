"""Generate the sample city once and bulk-load it (COPY) in a single transaction.

The whole sample is one dataset: if any file fails to load, the transaction rolls back and
the database is exactly as it was, and the error names the file, the line and the reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy import Connection, Engine, text

from data_samples.output import MANIFEST, TABLE_ORDER, file_sha256, read_manifest
from data_samples.scales import SCALES
from data_samples.sensors import READINGS_START
from layers.registry import register_builtin_layers
from tiles import outlines
from twin.core.errors import LoadError

log = logging.getLogger("twin.sample")

DATASET = "sample_city"
COPY_BLOCK = 1 << 20
# The stored H3 counts rewritten in the order of place (as migration 0006 does), so a tile's
# rows are read from few pages.
COUNTS_ORDER_SQL = """
-- Rewrites risk_point_h3_counts in the order of place (a 5-character geohash, ~5 km), so the
-- rows a hexagon tile reads lie in a few hundred pages instead of one page each (the
-- statement-level triggers insert a bulk load's rows in hash order: 2,490 pages for a
-- zoom-10 tile's 4,721 rows; 161 once ordered). Not ordered by the primary key: rows of one
-- resolution packed together make the planner prefer a primary-key range scan over the
-- tile's GiST index, which reads every cell of that resolution in the city.
CREATE TEMP TABLE risk_point_h3_counts_ordered ON COMMIT DROP AS
SELECT * FROM risk_point_h3_counts ORDER BY ST_GeoHash(anchor, 5), res, cell;
DELETE FROM risk_point_h3_counts;
INSERT INTO risk_point_h3_counts SELECT * FROM risk_point_h3_counts_ordered;
"""


@dataclass(frozen=True)
class LoadReport:
    skipped: bool
    seconds: float
    rows: dict[str, int]


def ensure_generated(samples_root: Path, scale: str) -> Path:
    """The sample directory for ``scale``, generated first if it has no manifest."""
    sample_dir = samples_root / scale
    if not (sample_dir / MANIFEST).exists():
        from data_samples.generate import generate  # heavy: only when generating

        log.info("generating the %s sample city into %s", scale, sample_dir)
        generate(sample_dir, scale)
    return sample_dir


def verify_files(sample_dir: Path) -> dict:
    """Check every file against the manifest before anything touches the database."""
    try:
        manifest = read_manifest(sample_dir)
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"{sample_dir / MANIFEST}: cannot read the manifest ({exc})") from exc
    for name, expected in manifest["files"].items():
        path = sample_dir / name
        if not path.exists():
            raise LoadError(f"{path}: file listed in the manifest is missing")
        if file_sha256(path) != expected:
            raise LoadError(
                f"{path}: contents differ from the manifest (corrupted or edited); "
                "regenerate the sample with `twin sample generate`"
            )
    return manifest


def _manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def load_sample(engine: Engine, sample_dir: Path, verify: bool = True,
                force: bool = False) -> LoadReport:
    """Load ``sample_dir`` unless the same sample is already loaded (or ``force``)."""
    manifest = verify_files(sample_dir) if verify else read_manifest(sample_dir)
    digest = _manifest_hash(manifest)
    started = time.perf_counter()
    with engine.begin() as conn:
        loaded = conn.execute(text("SELECT sha256 FROM dataset_loads WHERE name = :name"),
                              {"name": DATASET}).scalar()
        if loaded == digest and not force:
            log.info("sample city already loaded (%s), reusing it", sample_dir.name)
            # This twin's built-in layer list may differ from the one that loaded the data.
            register_builtin_layers(conn, sample_dir)
            return LoadReport(True, 0.0, manifest["tables"])
        conn.execute(text(f"TRUNCATE {', '.join(TABLE_ORDER)} CASCADE"))
        _make_reading_partitions(conn, manifest)
        rows = {table: _copy_table(conn, sample_dir / f"{table}.csv", table)
                for table in TABLE_ORDER}
        _settle_readings(conn)
        _advance_sequences(conn)
        # The triggers counted the points per H3 cell; hexagon tiles draw those cells and
        # read their counts in the order of place.
        outlines.store_missing(conn)
        conn.execute(text(COUNTS_ORDER_SQL))
        register_builtin_layers(conn, sample_dir)
        conn.execute(text("""
            INSERT INTO dataset_loads (name, sha256, row_count) VALUES (:name, :sha, :rows)
            ON CONFLICT (name) DO UPDATE
               SET sha256 = EXCLUDED.sha256, row_count = EXCLUDED.row_count, loaded_at = now()
        """), {"name": DATASET, "sha": digest, "rows": sum(rows.values())})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    seconds = time.perf_counter() - started
    log.info("loaded the %s sample city in %.1fs (%d rows)", manifest["scale"], seconds,
             sum(rows.values()))
    return LoadReport(False, seconds, rows)


def _make_reading_partitions(conn: Connection, manifest: dict) -> None:
    """The day partitions the sample's readings fall in, made before their COPY (readings
    are partitioned by UTC day, migration 0011); otherwise they would all land in the
    default partition."""
    scale = SCALES.get(manifest.get("scale", ""))
    hours = scale.reading_hours if scale is not None else 24
    conn.execute(text("SELECT twin_readings_make_partitions(CAST(:start AS timestamptz), "
                      "CAST(:start AS timestamptz) + make_interval(hours => :hours))"),
                 {"start": READINGS_START.isoformat(), "hours": hours})


def _settle_readings(conn: Connection) -> None:
    """Readings outside the expected days (a hand-edited sample) moved from the default
    partition into day partitions of their own; ``sensor_latest`` rebuilt from the readings."""
    conn.execute(text("""
        SELECT twin_readings_make_partitions(min(ts), max(ts)) FROM sensor_readings_default
        HAVING count(*) > 0
    """))
    conn.execute(text("""
        TRUNCATE sensor_latest;
        INSERT INTO sensor_latest (sensor_id, ts, value)
        SELECT DISTINCT ON (sensor_id) sensor_id, ts, value FROM sensor_readings
         ORDER BY sensor_id, ts DESC
    """))


def _advance_sequences(conn: Connection) -> None:
    """The files carry their ids: each id sequence moves past them, so the next row written
    through SQL or the API (a new building, a reported risk point) gets a fresh id."""
    serial = conn.execute(text("""
        SELECT table_name, pg_get_serial_sequence(table_name, 'id') FROM information_schema.columns
         WHERE table_schema = 'public' AND column_name = 'id' AND table_name = ANY(:tables)
    """), {"tables": list(TABLE_ORDER)}).all()
    for table, sequence in serial:
        if sequence:
            conn.execute(text(f'SELECT setval(:sequence, coalesce(max(id), 0) + 1, false) '
                              f'FROM "{table}"'), {"sequence": sequence})


def _copy_table(conn: Connection, path: Path, table: str) -> int:
    """COPY one CSV (header = column names) into ``table`` inside the open transaction."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            columns = next(csv.reader(handle))
    except (OSError, StopIteration, UnicodeDecodeError) as exc:
        raise LoadError(f"{path}: cannot read the header ({exc or 'empty file'})") from exc
    column_list = ", ".join(f'"{column}"' for column in columns)
    raw = conn.connection.driver_connection
    try:
        with raw.cursor() as cursor, path.open("rb") as handle:
            statement = f'COPY "{table}" ({column_list}) FROM STDIN WITH (FORMAT csv, HEADER true)'
            with cursor.copy(statement) as copy:
                while block := handle.read(COPY_BLOCK):
                    copy.write(block)
            return cursor.rowcount
    except psycopg.Error as exc:
        diag = exc.diag
        where = f" ({diag.context.strip()})" if diag.context else ""
        raise LoadError(f"{path}: {diag.message_primary or exc}{where}") from exc
