"""Rate-limit benchmark: the cost of one ``take`` (one request's rate limit) in each store, in
the same run: in-process (``TokenBuckets``), the shared-memory table of one server's workers
(``SharedTokenBuckets``) and the database's table shared by cluster nodes
(``PostgresTokenBuckets``, one upsert per take on its own pool), besides a bare ``SELECT 1`` on
the same kind of pool (the round trip every database take pays at least).

Run on demand (never in ``make test``); it writes only to a scratch database of its own
(``twin_bench_ratelimit`` in the managed cluster, dropped and created afresh, dropped after):

    .venv/bin/python benchmarks/ratelimit.py [--takes 20000] [--keys 1000]

Each line: ``--takes`` takes spread over ``--keys`` keys (or one hot key, whose row lock every
take waits for), from 1 or 4 asyncio tasks at once; takes per second (wall clock) and the
latency of one take (p50, p99, in microseconds). For the database, afterwards: the rows
left, the table's size and persistence (UNLOGGED: no WAL), and the share of HOT updates
(fillfactor 70). The cluster is shared with whatever else runs: on a busy machine the
database lines measure the machine as much as the limiter.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks.scratch import drop_database, scratch_database  # noqa: E402
from twin import ratelimit  # noqa: E402
from twin.core.cluster import ManagedCluster  # noqa: E402
from twin.core.settings import LimitsSettings, Settings  # noqa: E402
from twin.ratelimit import PostgresTokenBuckets, SharedTokenBuckets, TokenBuckets  # noqa: E402

DATABASE = "twin_bench_ratelimit"
# The shipped defaults: nearly every take is granted (the common case, and the one that
# writes: a refused take in the database writes too, the same row).
RATE, BURST = 50_000.0, 100_000


async def measure(take: Callable[[str], Awaitable[float] | float], keys: list[str],
                  takes: int, tasks: int) -> tuple[float, float, float, int]:
    """(takes/s, p50 µs, p99 µs, granted) of ``takes`` takes over ``keys`` from ``tasks``
    tasks at once. (A synchronous store's take never yields: its tasks run one after the
    other, as requests on one event loop would.)"""
    latencies: list[int] = []
    granted = 0
    per_task = takes // tasks

    async def run(offset: int) -> None:
        nonlocal granted
        clock = time.perf_counter_ns
        for i in range(per_task):
            key = keys[(offset + i * tasks) % len(keys)]
            started = clock()
            wait = take(key)
            if not isinstance(wait, float):
                wait = await wait
            latencies.append(clock() - started)
            granted += wait == 0.0

    started = time.perf_counter()
    await asyncio.gather(*(run(t) for t in range(tasks)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return (len(latencies) / elapsed, statistics.median(latencies) / 1000, p99 / 1000,
            granted)


class SelectOne:
    """A bare round trip on the limiter's pool, as a take makes it (the driver's connection,
    prepared): the floor of a database take."""

    def __init__(self, buckets: PostgresTokenBuckets):
        self._engine = buckets.engine

    async def take(self, key: str) -> float:
        async with self._engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            await (await driver.execute("SELECT 1", prepare=True)).fetchone()
        return 0.0


def table_facts(url: str) -> str:
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql", 1)) as conn:
        row = conn.execute(
            "SELECT count(*), pg_total_relation_size('rate_buckets'), "
            "(SELECT relpersistence FROM pg_class WHERE relname = 'rate_buckets'), "
            "(SELECT n_tup_hot_upd::float8 / greatest(n_tup_upd, 1) FROM pg_stat_user_tables "
            " WHERE relname = 'rate_buckets') FROM rate_buckets").fetchone()
    assert row is not None
    count, size, persistence, hot = row
    return (f"{count:,} rows, {size / 1024:,.0f} KiB, "
            f"{'UNLOGGED' if persistence == 'u' else 'LOGGED'}, "
            f"{(hot or 0) * 100:.0f}% of updates HOT")


async def bench(url: str, takes: int, n_keys: int) -> list[tuple[str, ...]]:
    keys = [f"key:bench-{i}" for i in range(n_keys)]
    settings = Settings(database_url=url, limits=LimitsSettings(rate_per_s=RATE, burst=BURST))
    rows: list[tuple[str, ...]] = []

    def line(store: str, keyset: str, tasks: int, figures: tuple[float, float, float, int],
             extra: str = "") -> None:
        rate, p50, p99, granted = figures
        rows.append((store, keyset, str(tasks), f"{rate:,.0f}", f"{p50:,.1f}", f"{p99:,.1f}",
                     f"{granted:,}", extra))
        print("  ".join(rows[-1]), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        table = ratelimit.create_table(Path(tmp), port=1)
        if table is None:
            raise SystemExit("no shared-memory table could be made")
        shared = SharedTokenBuckets(table, RATE, BURST)
        try:
            for tasks in (1, 4):
                for keyset, chosen in ((f"{n_keys:,} keys", keys), ("1 key", keys[:1])):
                    line("TokenBuckets", keyset, tasks,
                         await measure(TokenBuckets(RATE, BURST).take, chosen, takes, tasks))
                    line("SharedTokenBuckets", keyset, tasks,
                         await measure(shared.take, chosen, takes, tasks))
        finally:
            shared.close()
            ratelimit.remove_table(table)

    for tasks in (1, 4):
        buckets = ratelimit.open_postgres_buckets(settings, pool_size=2, max_overflow=2)
        try:
            await measure(buckets.take, keys, 500, tasks)  # connect and prepare first
            line("SELECT 1 (floor)", "-", tasks,
                 await measure(SelectOne(buckets).take, keys, takes, tasks))
            for keyset, chosen in ((f"{n_keys:,} keys", keys), ("1 key", keys[:1])):
                figures = await measure(buckets.take, chosen, takes, tasks)
                assert not buckets.falling_back, "the database did not answer"
                line("PostgresTokenBuckets", keyset, tasks, figures)
        finally:
            await buckets.close()
    rows.append(("rate_buckets after the run:", "", "", "", "", "", "", table_facts(url)))
    return rows


def table(rows: list[tuple[str, ...]]) -> str:
    header = ("store", "keys", "tasks", "takes/s", "p50 µs", "p99 µs", "granted", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 2 or i == 7 else cell.rjust(widths[i])
                       for i, cell in enumerate(r)).rstrip() for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--takes", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=1_000)
    args = parser.parse_args()
    cluster = ManagedCluster(Settings())
    url = scratch_database(cluster, DATABASE)
    try:
        rows = asyncio.run(bench(url, args.takes, args.keys))
    finally:
        drop_database(cluster, DATABASE)
    print(f"rate limits: {args.takes:,} takes per line (limits {RATE:g}/s, burst {BURST:,})")
    print(table(rows))


if __name__ == "__main__":
    main()
