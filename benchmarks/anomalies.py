"""Pipe anomaly zones against the injected ground truth: precision, recall and time.

Run on demand against the full sample city (database ``twin``, read only):

    .venv/bin/python benchmarks/anomalies.py [--truth PATH] [--repeat N]

A zone **matches** a truth anomaly when both are on the same network, their times overlap,
and they share sensors that make up at least half of the zone's sensors (so a zone that
merely brushes an anomaly, or lumps two together, does not count twice). Matching is one to
one, largest overlap first. Precision = matched zones / zones; recall = matched anomalies /
anomalies. The detector never sees the truth file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.prerequisites import libpq_or_exit, require  # noqa: E402
from twin.core.models import NETWORKS  # noqa: E402
from twin.core.settings import get_settings  # noqa: E402

TRUTH = "anomalies_truth.json"  # written by the generator beside the sample's tables


def _overlaps(zone: dict, anomaly: dict) -> bool:
    """Zone times are inclusive (first and last anomalous reading); truth end is exclusive."""
    start, end = (datetime.fromisoformat(zone["properties"][k]) for k in ("start", "end"))
    return (start < datetime.fromisoformat(anomaly["end"])
            and datetime.fromisoformat(anomaly["start"]) <= end)


def match_zones(zones: list[dict], anomalies: list[dict]) -> list[tuple[int, int]]:
    """(zone index, anomaly index) pairs, one to one, largest shared sensor set first."""
    candidates = []
    for z, zone in enumerate(zones):
        sensors = set(zone["properties"]["sensor_ids"])
        for a, anomaly in enumerate(anomalies):
            shared = len(sensors & set(anomaly["affected_sensor_ids"]))
            if (anomaly["network"] == zone["properties"]["network"] and shared
                    and 2 * shared >= len(sensors) and _overlaps(zone, anomaly)):
                candidates.append((-shared, z, a))
    pairs, used_z, used_a = [], set(), set()
    for _, z, a in sorted(candidates):
        if z not in used_z and a not in used_a:
            pairs.append((z, a))
            used_z.add(z)
            used_a.add(a)
    return pairs


def score(zones: list[dict], anomalies: list[dict]) -> dict:
    pairs = match_zones(zones, anomalies)
    source_hits = sum(zones[z]["properties"]["source_segment_id"]
                      in anomalies[a]["affected_segment_ids"] for z, a in pairs)
    return {
        "zones": len(zones),
        "anomalies": len(anomalies),
        "matched": len(pairs),
        "precision": len(pairs) / len(zones) if zones else 1.0,
        "recall": len(pairs) / len(anomalies) if anomalies else 1.0,
        # Informational: the likely source lies on the anomaly's affected segments.
        "source_on_affected": source_hits / len(pairs) if pairs else None,
        "exact_source": sum(zones[z]["properties"]["source_segment_id"]
                            == anomalies[a]["source_segment_id"] for z, a in pairs),
    }


async def run(truth_path: Path, repeat: int) -> None:
    from twin.core.db import async_engine
    from twin.queries.anomalies import pipe_anomalies

    truth = json.loads(truth_path.read_text())["anomalies"]
    engine = async_engine(get_settings())
    try:
        async with engine.connect() as conn:
            print(f"{'network':9} {'zones':>5} {'truth':>5} {'match':>5} {'precision':>9} "
                  f"{'recall':>6} {'src on path':>11} {'exact src':>9} {'p50 s':>6} {'max s':>6}")
            for network in NETWORKS:
                timings = []
                for _ in range(repeat):
                    began = time.perf_counter()
                    answer = await pipe_anomalies(conn, network)
                    timings.append(time.perf_counter() - began)
                    await conn.rollback()
                result = score(answer["features"], [a for a in truth if a["network"] == network])
                src = result["source_on_affected"]
                print(f"{network:9} {result['zones']:5d} {result['anomalies']:5d} "
                      f"{result['matched']:5d} {result['precision']:9.3f} {result['recall']:6.3f} "
                      f"{'-' if src is None else f'{src:.2f}':>11} {result['exact_source']:9d} "
                      f"{statistics.median(timings):6.3f} {max(timings):6.3f}")
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--truth", type=Path,
                        help=f"default: TWIN_HOME/samples/full/{TRUTH}")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    settings = get_settings()
    require(libpq_or_exit(settings), "full")
    args.truth = args.truth or settings.samples_dir / "full" / TRUTH
    if not args.truth.exists():
        raise SystemExit(f"no ground truth at {args.truth}: run `.venv/bin/twin sample load "
                         "--scale full` (it generates the sample there) or pass --truth")
    asyncio.run(run(args.truth, args.repeat))


if __name__ == "__main__":
    main()
