"""An upload's form, parsed once, and the plan of the job it queues, typed.

``UploadForm.parse`` is the one place the form's strings become values: ``source_crs`` a pyproj
CRS, ``datum`` a ``Datum``. ``JobPlan`` is everything the background job needs, decided in the
request; it travels in the job row's ``params`` column as three explicit parts (``to_row`` /
``from_row``): the form as sent (shown by GET /jobs), the plan, and the runner's liveness marks
(written by SQL in layers/jobs.py and read by layers/job_liveness.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pyproj import CRS

from layers.crs import Datum, SourceError, parse_datum, parse_source_crs
from layers.ingest_model import Anchor

FORM_FIELDS = ("title", "id", "source_crs", "datum", "layer", "lon", "lat", "height", "heading",
               "cim_level", "building_id")
ANCHOR_FIELDS = ("lon", "lat", "height", "heading", "cim_level", "building_id")


@dataclass(frozen=True)
class UploadForm:
    """The form fields of POST/PUT /layers, parsed (empty fields are None)."""

    title: str | None
    layer_id: str | None
    source_crs: CRS | None
    datum: Datum
    layer: str | None
    # A 3D model's anchor, as sent: only a model needs (and checks) it.
    anchor_fields: tuple[tuple[str, str | None], ...]
    sent: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, fields: dict[str, str | None]) -> UploadForm:
        """400 at once for a bad source_crs or datum."""
        given = {name: value for name, value in fields.items() if value not in (None, "")}
        return cls(title=given.get("title"), layer_id=given.get("id"),
                   source_crs=parse_source_crs(given.get("source_crs")),
                   datum=parse_datum(given.get("datum")), layer=given.get("layer"),
                   anchor_fields=tuple((name, given.get(name)) for name in ANCHOR_FIELDS),
                   sent=tuple((name, value) for name, value in given.items() if name != "id"))


@dataclass(frozen=True)
class JobPlan:
    """What a queued upload job does: read ``main`` (in the job's folder) as ``format``, place
    it with ``source_crs`` (None: the file's own) and ``datum``, publish it as ``title``,
    owned by ``owner_scope`` (None: the city) and seen by all when ``shared``."""

    kind: str  # vector | raster | 3d
    format: str  # geojson, shapefile, gpkg, kml, kmz, csv, geotiff, glb, gltf
    main: str
    title: str | None
    layer: str | None  # the layer of a multi-layer file
    source_crs: CRS | None
    datum: Datum
    anchor: Anchor | None  # 3D models only
    owner_scope: str | None
    shared: bool
    form: tuple[tuple[str, str], ...] = ()  # as sent, for GET /jobs

    def to_row(self) -> dict:
        """The job row's ``params``: the form as sent, and the plan."""
        epsg = None if self.source_crs is None else self.source_crs.to_epsg()
        return {"form": dict(self.form),
                "plan": {"kind": self.kind, "format": self.format, "main": self.main,
                         "title": self.title, "layer": self.layer, "source_epsg": epsg,
                         "datum": self.datum.value,
                         "anchor": None if self.anchor is None else asdict(self.anchor),
                         "owner_scope": self.owner_scope, "shared": self.shared}}

    @classmethod
    def from_row(cls, params: dict) -> JobPlan:
        if "plan" not in params:
            raise SourceError("this job was queued by an earlier version of twin; upload the "
                              "file again")
        plan = params["plan"]
        epsg = plan["source_epsg"]
        return cls(kind=plan["kind"], format=plan["format"], main=plan["main"],
                   title=plan["title"], layer=plan["layer"],
                   source_crs=None if epsg is None else CRS.from_epsg(epsg),
                   datum=Datum(plan["datum"]),
                   anchor=None if plan["anchor"] is None else Anchor(**plan["anchor"]),
                   owner_scope=plan["owner_scope"], shared=plan["shared"],
                   form=tuple(params.get("form", {}).items()))


def sent_form(params: dict) -> dict:
    """The form fields a job row shows (GET /jobs): rows from before the plan kept them at the
    top level beside private '_' keys."""
    if "plan" in params:
        return dict(params.get("form") or {})
    return {k: v for k, v in params.items() if not k.startswith("_")}
