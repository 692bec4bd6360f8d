"""All of twin's settings, read once from the environment (prefix ``TWIN_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DatabaseSettings(BaseSettings):
    """The managed PostGIS cluster, or an external one when ``TWIN_DATABASE_URL`` is set."""

    model_config = SettingsConfigDict(env_prefix="TWIN_DB_")

    port: int = 55432
    name: str = "twin"
    user: str = "twin"
    # The unprivileged system user that runs the managed cluster when twin runs as root.
    os_user: str = "twin"
    pg_bin: Path = Path("/usr/lib/postgresql/15/bin")
    pool_size: int = 10
    max_overflow: int = 10
    # Seconds a request waits for a connection before the database counts as unavailable.
    connect_timeout: int = 3


class UploadSettings(BaseSettings):
    """Layer uploads (``TWIN_UPLOADS_``): where files go, how many jobs run, what is refused."""

    model_config = SettingsConfigDict(env_prefix="TWIN_UPLOADS_")

    # Default: ``<TWIN_HOME>/uploads`` (spooled uploads, COGs and 3D models of each version).
    dir: Path | None = None
    # Background ingestion threads; 1 keeps two big uploads from fighting over the 2 cores.
    workers: int = 1
    max_file_bytes: int = 512 * 1024 * 1024
    max_archive_members: int = 64
    max_uncompressed_bytes: int = 2 * 1024 * 1024 * 1024
    # Uncompressed/compressed size of any archive member; zip bombs reach 1000:1 and more.
    max_compression_ratio: float = 200.0
    max_raster_pixels: int = 400_000_000
    max_features: int = 5_000_000
    # Features whose centre lies this far (degrees) outside the municipality's bbox are flagged.
    far_outside_margin_deg: float = 0.5


class AuthSettings(BaseSettings):
    """Bearer keys and their roles (``TWIN_AUTH_KEYS='{"<key>": "gis-editor"}'``).

    Issue 7 replaces this source with hashed keys in the database; twin/auth.py is the seam.
    """

    model_config = SettingsConfigDict(env_prefix="TWIN_AUTH_")

    keys: dict[str, str] = Field(default_factory=dict)


class TilesSettings(BaseSettings):
    """Vector tiles (``TWIN_TILES_``)."""

    model_config = SettingsConfigDict(env_prefix="TWIN_TILES_")

    # Risk points are H3 hexagons below this zoom; 0 never aggregates.
    aggregate_below_zoom: int = Field(default=12, ge=0, le=23)
    # False serves every tile fresh from PostGIS (the cold benchmark); ETags stay exact.
    cache: bool = True
    # Bytes of tiles (plain and gzipped) the in-process cache keeps.
    cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # More features than this in one layer of one tile are cut, and the response says so.
    feature_cap: int = Field(default=20_000, ge=1)
    # Risk-point tiles from the aggregation zoom on: every field up to detail_cap points,
    # id/level/sector_code up to point_cap, grid clusters beyond (keeps tiles under 100 KB).
    detail_cap: int = Field(default=800, ge=0)
    point_cap: int = Field(default=4000, ge=0)


class SensorSettings(BaseSettings):
    """Sensor reading ingest, ``POST /sensors/readings`` (``TWIN_SENSORS_``)."""

    model_config = SettingsConfigDict(env_prefix="TWIN_SENSORS_")

    # Readings in one batch; a bigger batch is refused whole (413) before anything is read.
    max_batch: int = Field(default=10_000, ge=1)
    # Bytes of one request body (about 100 bytes a reading).
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1)
    # Clock skew allowed between a sensor gateway and the database before "in the future".
    future_tolerance_s: float = Field(default=60.0, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TWIN_")

    home: Path = Field(default=PROJECT_ROOT / ".twin")
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    sample_scale: str = "full"
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    tiles: TilesSettings = Field(default_factory=TilesSettings)
    uploads: UploadSettings = Field(default_factory=UploadSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    sensors: SensorSettings = Field(default_factory=SensorSettings)

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def samples_dir(self) -> Path:
        return self.home / "samples"

    @property
    def uploads_dir(self) -> Path:
        return self.uploads.dir or self.home / "uploads"

    @property
    def managed(self) -> bool:
        """True when twin runs its own cluster instead of using ``TWIN_DATABASE_URL``."""
        return self.database_url is None


@lru_cache
def get_settings() -> Settings:
    return Settings()
