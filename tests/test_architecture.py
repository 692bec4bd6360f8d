"""docs/architecture.md matches the code: it names every import contract that `make lint`
enforces, and its table of the floor lists exactly the modules of twin/core."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def test_the_doc_names_every_import_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 4
    for contract in contracts:
        assert contract["name"] in DOC, contract["name"]


def test_the_doc_lists_the_floor_s_modules():
    floor = DOC[DOC.index("## The floor"):DOC.index("## One vector tile")]
    listed = set(re.findall(r"`(\w+)\.py`", floor))
    modules = {path.stem for path in (ROOT / "twin" / "core").glob("*.py")} - {"__init__"}
    assert listed == modules
