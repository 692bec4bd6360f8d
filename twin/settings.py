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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TWIN_")

    home: Path = Field(default=PROJECT_ROOT / ".twin")
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    sample_scale: str = "full"
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def samples_dir(self) -> Path:
        return self.home / "samples"

    @property
    def managed(self) -> bool:
        """True when twin runs its own cluster instead of using ``TWIN_DATABASE_URL``."""
        return self.database_url is None


@lru_cache
def get_settings() -> Settings:
    return Settings()
