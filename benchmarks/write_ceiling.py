"""One primary's write ceiling for sensor readings, and a hot standby's lag under it (issue
15, data growth).

Run on demand (never in ``make test``), on a throwaway home: it makes a hot standby of the
cluster (``pg_basebackup`` of all of it) and loads millions of readings:

    TWIN_HOME=/tmp/twin-live-bench TWIN_DB_PORT=55488 \\
        .venv/bin/python benchmarks/write_ceiling.py [--rows 3000000] [--sensors 100000] \\
        [--seconds 60] [--parts copy,http]

Parts, each printed with its figures:

* ``copy``: readings ``COPY``'d into the day-partitioned ``sensor_readings`` of a scratch
  database (``twin_bench_growth``, made afresh and migrated, dropped afterwards), in
  transactions of ``--copy-batch`` rows (encoded before the clock starts) from
  ``--writers`` connections at once, ``--sensors`` sensors reading
  once a minute and arriving in time order (as a city-wide feed does): rows/s, WAL MB/s
  (``pg_current_wal_lsn()`` before and after) and WAL bytes per reading.
* ``http``: the living twin's HTTP ingest (``twin serve``, 2 workers, ``POST
  /sensors/readings``, benchmarks/live.py's readings, bodies and clients) on the sample city
  for ``--seconds``: readings/s, WAL MB/s and bytes per reading (the ingest also keeps
  ``sensor_latest`` and evaluates alert rules).

During each part a sampler reads, every 100 ms, the primary's ``pg_current_wal_lsn()`` and
the standby's ``pg_last_wal_replay_lsn()``: the lag in bytes (their difference) and in seconds
(how long before the sample the primary had written what the standby has replayed, from the
primary's own samples, interpolated); p50/p99/max over the part, and how long the standby took
to catch up after it. The standby is ``twin.core.standby.ManagedStandby`` 1 of the home
(made if missing, and destroyed afterwards if this run made it); the cluster is stopped
again if this run started it. 2 cores: the writer, the primary's WAL writer and walsender,
the standby's replay and the sampler share them, so these are the figures of one small
machine, not of a primary with the standby on a host of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import live  # noqa: E402
from benchmarks.prerequisites import ROOT, prepare  # noqa: E402
from benchmarks.scratch import drop_database, scratch_database  # noqa: E402
from benchmarks.serving import serving  # noqa: E402
from twin.core.cluster import ManagedCluster  # noqa: E402
from twin.core.db import async_engine  # noqa: E402
from twin.core.settings import ReadingsSettings, Settings  # noqa: E402
from twin.core.standby import ManagedStandby  # noqa: E402
from twin.live import partitions  # noqa: E402

DATABASE = "twin_bench_growth"
PARTS = ("copy", "http")
CITY_RATE = 110_000  # readings/s: millions of devices at one reading a minute (issue 15)
SAMPLE_S = 0.1


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def wal_lsn(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


# --- lag ---------------------------------------------------------------------------------------

@dataclass
class Lag:
    """The sampler's series: (time, primary LSN) and (time, standby replay LSN)."""

    primary: list[tuple[float, int]] = field(default_factory=list)
    replayed: list[tuple[float, int]] = field(default_factory=list)

    def bytes_behind(self) -> list[int]:
        return [max(0, p - r) for (_, p), (_, r) in zip(self.primary, self.replayed,
                                                         strict=True)]

    def seconds_behind(self) -> list[float]:
        """For each sample: now minus the instant the primary's LSN reached what the standby
        has replayed (linear between the primary's samples)."""
        times = [t for t, _ in self.primary]
        lsns = [p for _, p in self.primary]
        out = []
        for (now, replayed), (_, written) in zip(self.replayed, self.primary, strict=True):
            if replayed >= written:
                out.append(0.0)
                continue
            k = bisect.bisect_left(lsns, replayed)
            if k == 0:
                out.append(now - times[0])
                continue
            (t0, l0), (t1, l1) = self.primary[k - 1], self.primary[k]
            reached = t1 if l1 == l0 else t0 + (t1 - t0) * (replayed - l0) / (l1 - l0)
            out.append(max(0.0, now - reached))
        return out


class Sampler(threading.Thread):
    """Every ``SAMPLE_S``: the primary's WAL position, then the standby's replay position."""

    def __init__(self, primary_url: str, standby_url: str):
        super().__init__(daemon=True, name="lag-sampler")
        self.primary_url, self.standby_url = primary_url, standby_url
        self.lag = Lag()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.primary_url, autocommit=True) as primary, \
                    psycopg.connect(self.standby_url, autocommit=True) as standby:
                tick = time.monotonic()
                while not self.stop.is_set():
                    at = time.monotonic()
                    written = wal_lsn(primary)
                    row = standby.execute(
                        "SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn").fetchone()
                    assert row is not None and row[0] is not None
                    self.lag.primary.append((at, written))
                    self.lag.replayed.append((time.monotonic(), int(row[0])))
                    tick += SAMPLE_S
                    time.sleep(max(0.0, tick - time.monotonic()))
        except BaseException as error:  # reported by the part
            self.error = error


def pct(values: list[float], q: float) -> float:
    return live.pct(values, q)


def catch_up(primary_url: str, standby_url: str, timeout_s: float = 600) -> float:
    """Seconds until the standby has replayed everything the primary had written when this
    was called."""
    began = time.monotonic()
    with psycopg.connect(primary_url, autocommit=True) as primary, \
            psycopg.connect(standby_url, autocommit=True) as standby:
        target = wal_lsn(primary)
        while time.monotonic() - began < timeout_s:
            row = standby.execute("SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn").fetchone()
            if row is not None and row[0] is not None and int(row[0]) >= target:
                break
            time.sleep(0.02)
    return time.monotonic() - began


def report_lag(name: str, sampler: Sampler, primary_url: str, standby_url: str) -> dict:
    if sampler.error is not None:
        raise SystemExit(f"lag sampler failed: {sampler.error}")
    lag_b = [float(b) for b in sampler.lag.bytes_behind()]
    lag_s = sampler.lag.seconds_behind()
    behind = catch_up(primary_url, standby_url)
    mb = 1024 * 1024
    print(f"  standby lag during {name} ({len(lag_b)} samples every {SAMPLE_S * 1000:.0f} ms): "
          f"bytes p50 {pct(lag_b, 50) / mb:.2f} MB, p99 {pct(lag_b, 99) / mb:.2f} MB, "
          f"max {max(lag_b, default=0) / mb:.2f} MB; seconds p50 {pct(lag_s, 50):.2f}, "
          f"p99 {pct(lag_s, 99):.2f}, max {max(lag_s, default=0):.2f}; caught up "
          f"{behind:.2f} s after the load", flush=True)
    return {"samples": len(lag_b), "bytes_p50": pct(lag_b, 50), "bytes_p99": pct(lag_b, 99),
            "bytes_max": max(lag_b, default=0), "s_p50": pct(lag_s, 50),
            "s_p99": pct(lag_s, 99), "s_max": max(lag_s, default=0), "catch_up_s": behind}


def sampled(primary_url: str, standby_url: str) -> Sampler:
    sampler = Sampler(primary_url, standby_url)
    sampler.start()
    time.sleep(3 * SAMPLE_S)
    return sampler


def finish(sampler: Sampler) -> None:
    sampler.stop.set()
    sampler.join(10)


def roll_up(url: str) -> tuple[float, int, int]:
    """The partition keeper's rollup (twin/live/partitions.py ``roll_up_due``) run until no
    day partition is due: (seconds, day partitions rolled up, sensor-hours)."""
    async def run() -> tuple[float, int, int]:
        engine = async_engine(Settings(database_url=url), pool_size=1)
        try:
            async with engine.connect() as conn:
                began = time.perf_counter()
                report = await partitions.roll_up_due(conn, ReadingsSettings())
                return time.perf_counter() - began, len(report.partitions), report.hours
        finally:
            await engine.dispose()

    return asyncio.run(run())


def rows_in(url: str) -> int:
    with psycopg.connect(libpq(url)) as conn:
        row = conn.execute("SELECT count(*) FROM sensor_readings").fetchone()
    assert row is not None
    return int(row[0])


# --- parts -------------------------------------------------------------------------------------

def city_feed(sensors: int, rows: int, start: datetime):
    """``rows`` readings of ``sensors`` sensors, each once a minute (its own second in the
    minute), in time order; values a smooth function of the sensor and the minute."""
    minute = 0
    made = 0
    while made < rows:
        base = start + timedelta(minutes=minute)
        for sensor in range(1, sensors + 1):
            if made == rows:
                return
            yield (sensor, base + timedelta(seconds=sensor % 60, microseconds=sensor % 997),
                   0.3 + (sensor % 17) * 0.01 + (minute % 60) * 0.001)
            made += 1
        minute += 1


def encoded_batches(sensors: int, rows: int, batch: int, start: datetime) -> list[bytes]:
    """The feed as COPY text, ``batch`` rows a piece, encoded before the clock starts (so
    the client's Python is not what is measured)."""
    pieces: list[bytes] = []
    lines: list[str] = []
    for sensor, ts, value in city_feed(sensors, rows, start):
        lines.append(f"{sensor}\t{ts.isoformat()}\t{value!r}\n")
        if len(lines) == batch:
            pieces.append("".join(lines).encode())
            lines = []
    if lines:
        pieces.append("".join(lines).encode())
    return pieces


def copy_all(url: str, pieces: list[bytes], writers: int) -> float:
    """Seconds to COPY every piece (one transaction each) from ``writers`` connections at
    once, piece k by writer k % writers."""
    failures: list[BaseException] = []

    def writer(mine: list[bytes]) -> None:
        try:
            with psycopg.connect(url) as conn:
                for piece in mine:
                    with conn.cursor().copy(
                            "COPY sensor_readings (sensor_id, ts, value) FROM STDIN") as copy:
                        copy.write(piece)
                    conn.commit()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=writer, args=(pieces[k::writers],))
               for k in range(writers)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"COPY failed: {failures[0]}")
    return time.perf_counter() - began


def part_copy(cluster: ManagedCluster, standby: ManagedStandby, rows: int, sensors: int,
              batch: int, writers: int) -> dict:
    url = libpq(scratch_database(cluster, DATABASE))
    # Positions are the cluster's: the standby is read in its postgres database.
    standby_url = libpq(standby.url("postgres"))
    minutes = rows // sensors + 1
    # Closed hours only (before the current one): the rollup below reads all of them.
    start = (datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
             - timedelta(minutes=minutes))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT twin_readings_make_partitions(%s, %s)",
                     (start, start + timedelta(minutes=minutes + 1)))
        settings = dict(conn.execute("""
            SELECT name, setting || coalesce(unit, '') FROM pg_settings
             WHERE name IN ('max_wal_size', 'checkpoint_timeout', 'wal_compression',
                            'synchronous_commit', 'full_page_writes', 'shared_buffers',
                            'wal_level')""").fetchall())
    pieces = encoded_batches(sensors, rows, batch, start)
    catch_up(url, standby_url)
    print(f"copy: {rows:,} readings of {sensors:,} sensors (once a minute, {minutes} minutes "
          f"of data), COPY transactions of {batch:,} from {writers} connection(s); primary "
          f"settings {settings}", flush=True)
    sampler = sampled(url, standby_url)
    with psycopg.connect(url, autocommit=True) as conn:
        wal_before = wal_lsn(conn)
        took = copy_all(url, pieces, writers)
        wal = wal_lsn(conn) - wal_before
        row = conn.execute("""
            SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits
             WHERE inhparent = 'sensor_readings'::regclass""").fetchone()
        stored = int(row[0]) if row and row[0] else 0
    finish(sampler)
    mb = 1024 * 1024
    figures = {"rows": rows, "seconds": took, "rows_per_s": rows / took,
               "wal_mb_per_s": wal / mb / took, "wal_bytes_per_row": wal / rows,
               "disk_bytes_per_row": stored / rows}
    print(f"  COPY: {rows / took:,.0f} readings/s ({took:.1f} s); WAL {wal / mb:,.0f} MB = "
          f"{wal / mb / took:.1f} MB/s, {wal / rows:.0f} bytes per reading; on disk (table, "
          f"primary key, BRIN) {stored / rows:.0f} bytes per reading", flush=True)
    figures["lag"] = report_lag("copy", sampler, url, standby_url)
    sqlalchemy_url = "postgresql+psycopg://" + url.split("://", 1)[1]
    took, days, hours = roll_up(sqlalchemy_url)
    figures["rollup_rows_per_s"] = rows / took
    print(f"  hourly rollup of those readings (one pass of the partition keeper, {days} day "
          f"partition(s), {hours:,} sensor-hours): {took:.1f} s = {rows / took:,.0f} "
          "readings/s", flush=True)
    return figures


def part_http(settings: Settings, standby: ManagedStandby, seconds: float, batch: int,
              clients: int, scale: str) -> dict:
    url = prepare(settings, scale)
    standby_url = libpq(standby.url("postgres"))
    rate_guess = 30_000
    readings = live.Readings(url, datetime.now(UTC) - timedelta(hours=2))
    rows = readings.take(int(rate_guess * seconds))
    bodies = [live.body(rows[i:i + batch]) for i in range(0, len(rows), batch)]
    # The keeper of the server started below rolls up what is due at start-up: the history
    # of this database the first time (after the upgrade to 0017). Done here, untimed by the
    # ingest figures, and timed on its own.
    held = rows_in(url)
    took, days, hours = roll_up(url)
    print(f"http: rollup of the database's {held:,} readings before the load: {days} day "
          f"partition(s), {hours:,} sensor-hours, {took:.1f} s", flush=True)
    catch_up(libpq(url), standby_url)
    with live.managed_broker(settings) as mqtt_url:
        env = {**os.environ, "TWIN_DATABASE_URL": url, "TWIN_WORKERS": "2",
               "TWIN_MQTT_URL": mqtt_url, "TWIN_AUTH_KEYS": json.dumps(live.KEYS)}
        argv = [sys.executable, "-m", "twin.cli", "serve"]
        with serving("twin", argv, env, "/healthz", ROOT, uvicorn_cli=False) as base:
            print(f"http: twin serve, 2 workers, {clients} clients, batches of {batch:,}, "
                  f"{len(rows):,} readings", flush=True)
            sampler = sampled(libpq(url), standby_url)
            with psycopg.connect(libpq(url), autocommit=True) as conn:
                wal_before = wal_lsn(conn)
                accepted, took = asyncio.run(live.post_batches(base, bodies, clients))
                wal = wal_lsn(conn) - wal_before
            finish(sampler)
    mb = 1024 * 1024
    figures = {"rows": accepted, "seconds": took, "rows_per_s": accepted / took,
               "wal_mb_per_s": wal / mb / took, "wal_bytes_per_row": wal / max(1, accepted)}
    print(f"  HTTP ingest: {accepted / took:,.0f} readings/s ({accepted:,} in {took:.1f} s); "
          f"WAL {wal / mb:,.0f} MB = {wal / mb / took:.1f} MB/s, "
          f"{wal / max(1, accepted):.0f} bytes per reading", flush=True)
    figures["lag"] = report_lag("http", sampler, libpq(url), standby_url)
    return figures


def extrapolate(results: dict[str, dict]) -> None:
    for name, figures in results.items():
        need_mb = CITY_RATE * figures["wal_bytes_per_row"] / 1024 / 1024
        print(f"city scale ({CITY_RATE:,} readings/s) by {name}: {need_mb:.0f} MB/s of WAL "
              f"and {CITY_RATE / figures['rows_per_s']:.1f}x this machine's {name} rate",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--sensors", type=int, default=100_000)
    parser.add_argument("--copy-batch", type=int, default=50_000)
    parser.add_argument("--writers", type=int, default=1,
                        help="COPY connections at once")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--scale", default="small")
    options = parser.parse_args()
    parts = [p for p in options.parts.split(",") if p]
    if set(parts) - set(PARTS):
        raise SystemExit(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {PARTS}")
    settings = Settings()
    if not settings.managed or settings.db.port == 55432:
        raise SystemExit("this benchmark makes a standby of the cluster: use a throwaway "
                         "TWIN_HOME and TWIN_DB_PORT (e.g. TWIN_HOME=/tmp/twin-live-bench "
                         "TWIN_DB_PORT=55488)")
    cluster = ManagedCluster(settings)
    started_cluster = not cluster.status().running
    cluster.up()
    standby = ManagedStandby(settings, 1)
    made_standby = not standby.status().initialised
    started_standby = not standby.status().running
    results: dict[str, dict] = {}
    try:
        began = time.monotonic()
        standby.up()
        print(f"standby 1 on 127.0.0.1:{standby.port} "
              f"({'made' if made_standby else 'started'} in {time.monotonic() - began:.0f} s)",
              flush=True)
        if "copy" in parts:
            try:
                results["copy"] = part_copy(cluster, standby, options.rows, options.sensors,
                                            options.copy_batch, options.writers)
            finally:
                drop_database(cluster, DATABASE)
        if "http" in parts:
            results["http"] = part_http(settings, standby, options.seconds, options.batch,
                                        options.clients, options.scale)
        extrapolate(results)
    finally:
        if made_standby:
            standby.destroy()
        elif started_standby:
            standby.down()
        if started_cluster:
            cluster.down()


if __name__ == "__main__":
    main()
