"""Bulk loading: counts match the files, a second load is skipped, a bad file changes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from data_samples.load import load_sample
from data_samples.output import TABLE_ORDER, read_manifest
from twin.core.errors import LoadError


def table_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                  for t in TABLE_ORDER}
        counts["_loaded_at"] = conn.execute(text("SELECT loaded_at FROM dataset_loads")).scalar()
    return counts


def test_loaded_rows_match_the_manifest(engine: Engine, sample_dir: Path):
    counts = table_counts(engine)
    for table, expected in read_manifest(sample_dir)["tables"].items():
        assert counts[table] == expected, table


def test_a_second_load_reuses_the_database(engine: Engine, sample_dir: Path):
    before = table_counts(engine)
    report = load_sample(engine, sample_dir)
    assert report.skipped
    assert table_counts(engine) == before



def test_a_reused_database_gets_this_versions_builtin_layers(engine: Engine, sample_dir: Path):
    """A layer an older twin registered (since renamed) goes; unchanged layers keep versions."""
    versions = "SELECT id, data_version FROM layers WHERE origin = 'builtin' ORDER BY id"
    with engine.begin() as conn:
        before = conn.execute(text(versions)).all()
        conn.execute(text(
            "INSERT INTO layers (id, title_zh, title_en, kind, fields, source_crs, source_datum, "
            "min_zoom, max_zoom, origin) VALUES ('communitys', '旧', 'Old name', 'vector', "
            "'[]', 'EPSG:4326', 'wgs84', 0, 22, 'builtin')"))
    assert load_sample(engine, sample_dir).skipped
    with engine.connect() as conn:
        assert conn.execute(text(versions)).all() == before

def corrupt_line(path: Path, line_number: int, column: int, value: str) -> None:
    lines = path.read_text().splitlines()
    cells = lines[line_number - 1].split(",")
    cells[column] = value
    lines[line_number - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture()
def sample_copy(sample_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "sample"
    shutil.copytree(sample_dir, copy)
    return copy


def test_a_corrupted_file_is_refused_before_the_database_is_touched(
        engine: Engine, sample_copy: Path):
    before = table_counts(engine)
    corrupt_line(sample_copy / "risk_points.csv", 5, 0, "999999999")
    with pytest.raises(LoadError, match=r"risk_points\.csv.*manifest"):
        load_sample(engine, sample_copy, force=True)
    assert table_counts(engine) == before


def test_a_bad_row_rolls_back_the_whole_load_and_names_file_and_line(
        engine: Engine, sample_copy: Path):
    before = table_counts(engine)
    # buildings load last: every other table was already copied when this row fails.
    header = (sample_copy / "buildings.csv").read_text().splitlines()[0].split(",")
    corrupt_line(sample_copy / "buildings.csv", 7, header.index("height_m"), "tall")
    with pytest.raises(LoadError) as failure:
        load_sample(engine, sample_copy, verify=False, force=True)
    message = str(failure.value)
    assert "buildings.csv" in message and "line 7" in message and "tall" in message
    assert table_counts(engine) == before
