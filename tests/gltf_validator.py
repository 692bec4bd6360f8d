"""The Khronos glTF validator (npm gltf-validator in tests/js) as a Python function.

`validate(glb)` returns the validator's report (a dict: issues.numErrors, issues.messages
with code, message, severity 0 error / 1 warning / 2 info / 3 hint, pointer). One node
process validates a whole list with `validate_all`, which is what suites with many tiles want.

The validator (2.0.0-dev.3.10) does not know EXT_mesh_features and EXT_structural_metadata:
it reports them as UNSUPPORTED_EXTENSION infos (and checks the core glTF under them).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

JS = Path(__file__).parent / "js"
SCRIPT = JS / "gltf_validate.mjs"

# Issues the twin's GLBs may carry that are not faults: the two 3D Tiles extensions are
# outside this validator's knowledge.
ACCEPTED_INFOS = {"UNSUPPORTED_EXTENSION"}


def validate_all(assets: Sequence[bytes]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node, "node is needed for the glTF validator"
    assert (JS / "node_modules" / "gltf-validator").exists(), (
        "install the validator first: npm ci --prefix tests/js"
    )
    payload = b"".join(struct.pack("<I", len(a)) + bytes(a) for a in assets)
    done = subprocess.run(
        [node, str(SCRIPT)], input=payload, capture_output=True, check=True, timeout=600
    )
    reports = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines() if line]
    assert len(reports) == len(assets), done.stderr.decode("utf-8", "replace")
    return reports


def validate(glb: bytes) -> dict[str, Any]:
    """The validator's report on one GLB (or glTF JSON) asset."""
    return validate_all([glb])[0]


def messages(report: dict[str, Any], severity: int | None = None) -> list[dict[str, Any]]:
    """The report's messages, only those of `severity` when given."""
    found = report["issues"]["messages"]
    return [m for m in found if severity is None or m["severity"] == severity]


def metadata_views(glb: bytes) -> set[int]:
    """The buffer views that EXT_structural_metadata's property tables use."""
    length = struct.unpack_from("<I", glb, 12)[0]
    doc = json.loads(glb[20 : 20 + length])
    tables = doc.get("extensions", {}).get("EXT_structural_metadata", {}).get("propertyTables", [])
    return {
        view
        for table in tables
        for column in table["properties"].values()
        for key, view in column.items()
        if key in ("values", "arrayOffsets", "stringOffsets")
    }


def problems(report: dict[str, Any], glb: bytes | None = None) -> list[dict[str, Any]]:
    """Errors and warnings, and infos that are not accepted: what a clean GLB has none of.

    Accepted infos: UNSUPPORTED_EXTENSION for the two 3D Tiles extensions, and (given the
    GLB) UNUSED_OBJECT for the buffer views of the property table, which the validator
    cannot see being used.
    """
    tables = metadata_views(glb) if glb is not None else set()
    accepted = {f"/bufferViews/{v}" for v in tables}
    return [
        m
        for m in messages(report)
        if m["severity"] < 2
        or (
            m["severity"] == 2
            and not (m["code"] in ACCEPTED_INFOS and m["message"].endswith(_EXTENSIONS))
            and not (m["code"] == "UNUSED_OBJECT" and m.get("pointer") in accepted)
        )
    ]


_EXTENSIONS = ("'EXT_mesh_features'.", "'EXT_structural_metadata'.")
