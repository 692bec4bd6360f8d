"""What an upload request does before it queues a job: every check that can answer 4xx at once.

The file is already spooled into the job's folder; here it is checked (layers.safety), an
archive is unpacked, the layer of a multi-layer file is chosen, and the parsed form
(layers.plan.UploadForm) becomes the job's plan. What remains for the job (reading,
reprojecting, cleaning, writing) can only fail with reasons in the job report.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path, PurePosixPath

from layers import ingest_cityjson, ingest_model, ingest_raster, ingest_vector, safety
from layers.crs import point_to_wgs84
from layers.plan import JobPlan, UploadForm
from twin.core.settings import UploadSettings


def stored_name(file_name: str) -> str:
    """The name the upload is spooled under: fixed stem, the original (checked) suffix."""
    return "source" + PurePosixPath(file_name.lower()).suffix


def prepare(folder: Path, file_name: str, form: UploadForm, limits: UploadSettings,
            owner_scope: str | None = None, shared: bool = True) -> JobPlan:
    """Check the spooled file against the form; returns the job's plan."""
    source = folder / stored_name(file_name)
    inspected = safety.inspect(source, file_name, limits, form.layer)
    main = source.name
    if inspected.members and inspected.main_member:
        unpacked = folder / "unpacked"
        unpacked.mkdir()
        paths = safety.extract(source, inspected.members, unpacked, limits)
        main = str(paths[inspected.main_member].relative_to(folder))
    layer, anchor = form.layer, None
    if inspected.format == "cityjson":
        # Every refusal (no CRS, wrong CRS, no buildings, outside the city) answers now.
        ingest_cityjson.convert(folder / main, form.source_crs, form.datum, limits)
    elif inspected.kind == "vector":
        layer = ingest_vector.plan_layer(folder / main, inspected.format, form.layer)
        ingest_vector.check_feature_count(folder / main, inspected.format, layer, limits)
    elif inspected.kind == "raster":
        ingest_raster.check_raster(folder / main, limits)
    elif inspected.kind == "3d":
        anchor = ingest_model.parse_anchor(**dict(form.anchor_fields))
        ingest_model.check_inside_municipality(*point_to_wgs84(anchor.lon, anchor.lat,
                                                               form.datum))
    return JobPlan(kind=inspected.kind, format=inspected.format, main=main, title=form.title,
                   layer=layer, source_crs=form.source_crs, datum=form.datum, anchor=anchor,
                   owner_scope=owner_scope, shared=shared, form=form.sent)


def suggested_id(title: str, file_name: str, taken: set[str]) -> str:
    """A layer id from the title or the file name: ASCII slug, unique among ``taken``."""
    for candidate in (title, PurePosixPath(file_name).stem):
        ascii_name = unicodedata.normalize("NFKD", candidate).encode("ascii", "ignore").decode()
        slug = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")[:32]
        if slug and slug[0].isalpha():
            break
    else:
        slug = "layer"
    name, n = slug, 2
    while name in taken:
        name, n = f"{slug}_{n}", n + 1
    return name
