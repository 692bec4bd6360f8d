"""Generate the sample city: ``python -m data_samples.generate --scale small --out DIR``.

Deterministic: the same seed and scale give byte-identical files (the manifest's hashes).
The city part (admin units, risk points, teams, supplies) and the infrastructure part
(terrain, roads, pipes, sensors, buildings) each draw from their own seeded generator.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from data_samples.city import build_city
from data_samples.districts import load_districts
from data_samples.infrastructure import build_infrastructure
from data_samples.models import build_models
from data_samples.output import TABLE_ORDER, write_manifest, write_table
from data_samples.scales import SCALES

log = logging.getLogger("twin.samples")

DEFAULT_SEED = 20261121
ANOMALY_TRUTH = "anomalies_truth.json"



def generate(out_dir: Path, scale_name: str = "full", seed: int = DEFAULT_SEED) -> dict:
    """Build the whole sample city into ``out_dir`` and return its manifest."""
    scale = SCALES[scale_name]
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    districts = load_districts()
    tables = build_city(districts, scale, seed)
    infrastructure = build_infrastructure(districts, scale, seed, out_dir)
    anomalies = infrastructure.pop("anomalies")
    tables.update(infrastructure)
    # The CIM4-6 models (GLB files beside the tables) and their buildings' facts.
    build_models(tables["buildings"], out_dir)
    missing = set(TABLE_ORDER) - set(tables)
    if missing:
        raise RuntimeError(f"generator produced no data for: {sorted(missing)}")
    for name in TABLE_ORDER:
        write_table(out_dir, name, tables[name])
    truth = json.dumps(anomalies, indent=1, sort_keys=True, ensure_ascii=False)
    (out_dir / ANOMALY_TRUTH).write_text(truth + "\n")
    manifest = write_manifest(
        out_dir, scale.name, seed, {name: len(tables[name]) for name in TABLE_ORDER}
    )
    seconds = time.perf_counter() - started
    log.info("generated %s sample in %.1fs into %s", scale.name, seconds, out_dir)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    manifest = generate(args.out, args.scale, args.seed)
    for name, rows in manifest["tables"].items():
        log.info("%-20s %10d rows", name, rows)


if __name__ == "__main__":
    main()
