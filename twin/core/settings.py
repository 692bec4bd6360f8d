"""All of twin's settings, read once from the environment (prefix ``TWIN_``)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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
    # Every statement the API runs is cancelled after this long (504 to the client), so one
    # runaway query cannot hold a connection and a core; 0 turns it off. Upload ingestion
    # (bounded by TWIN_UPLOADS_STATEMENT_TIMEOUT_S instead), migrations and sample loads run
    # on their own engine without it (see twin/core/db.py).
    statement_timeout_ms: int = Field(default=15_000, ge=0)
    # Seconds a request queues for a pooled connection when all are busy before it gets 503.
    pool_timeout: float = Field(default=30.0, gt=0)
    # Hot standbys that serve read-only requests (issue 15; twin/core/replicas.py), as
    # SQLAlchemy/libpq URLs, e.g. ``["postgresql://twin@127.0.0.1:55443/twin"]``; empty: every
    # request reads the primary. ``twin cluster up`` sets it for its nodes.
    standby_urls: list[str] = Field(default_factory=list)
    # A standby whose replay is further behind the primary than this is skipped.
    max_lag_s: float = Field(default=5.0, gt=0)
    # How long a read carrying a write's WAL position (read-your-writes) waits for a standby
    # to replay it before it reads the primary instead.
    ryw_wait_ms: int = Field(default=200, ge=0)
    # Seconds between checks of each standby's health and replay position.
    standby_check_s: float = Field(default=0.5, gt=0)


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
    # Seconds any one statement of an upload's ingestion may run (COPY, index, publish) before
    # PostgreSQL cancels it and the job fails with nothing published; 0: no limit. Longer
    # than the API's TWIN_DB_STATEMENT_TIMEOUT_MS: ingestion grows with the file.
    statement_timeout_s: float = Field(default=600.0, ge=0)
    # Seconds a superseded upload version's table (and files) are kept after a newer version
    # is published or the layer deleted: a read on a hot standby, or another node's registry
    # of a moment ago, may still be using it (issue 15; layers/blobs.py drops what is due).
    drop_grace_s: float = Field(default=600.0, ge=0)


class AuthSettings(BaseSettings):
    """Who may call (``TWIN_AUTH_``): see twin/auth.py and the README's "Access" section.

    API keys live hashed in the database (``twin keys add``); ``keys`` adds keys from the
    environment for bootstrapping and tests: ``TWIN_AUTH_KEYS='{"<key>":
    "<role>[:<name>[:<scope>]]"}'``.
    """

    model_config = SettingsConfigDict(env_prefix="TWIN_AUTH_")

    keys: dict[str, str] = Field(default_factory=dict)
    # Role of callers without a key: '' (off: 401), 'viewer' or 'planner'. `twin run` (the
    # demo) sets 'planner' unless this is set.
    anonymous_role: str = Field(default="", pattern="^(|viewer|planner)$")
    # JWT bearer tokens, verified locally: HS256 with this secret ...
    jwt_secret: SecretStr | None = None
    # ... and/or RS256/ES256 with the public keys of this JWKS file (read once, no network).
    jwks_file: Path | None = None
    # Checked when set: the token's 'aud' and 'iss' claims.
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Seconds of clock skew allowed on 'exp' and 'nbf'.
    jwt_leeway_s: float = Field(default=30.0, ge=0)


class LimitsSettings(BaseSettings):
    """Per-caller rate limits and request body limits (``TWIN_LIMITS_``).

    The rate is a token bucket per key (per client IP for anonymous callers): ``burst``
    requests at once, refilled at ``rate_per_s``, for the whole server (its worker processes
    share the buckets: twin/ratelimit.py). The defaults are a ceiling, not a quota: they sit
    well above what the server can serve (2 workers answer ~5,000-15,000 warm tiles a
    second), because one client address is often a whole command hall behind NAT, its wall
    of screens loading tiles at once, and one key a whole centre.
    The former 2,000/s (burst 4,000) answered 429 to half of such a hall's warm tile requests
    in ``make run``'s demo. So by default they only stop a runaway client on a big machine; a
    deployment whose key holders must share the server sets a quota, e.g.
    ``TWIN_LIMITS_RATE_PER_S=20`` (anonymous callers, by IP, then get it too).
    """

    model_config = SettingsConfigDict(env_prefix="TWIN_LIMITS_")

    # 0 turns rate limiting off.
    rate_per_s: float = Field(default=50_000.0, ge=0)
    burst: int = Field(default=100_000, ge=1)
    # Bytes of any request body but an upload (uploads: TWIN_UPLOADS_MAX_FILE_BYTES).
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=0)
    # Where the buckets live: "memory" (one server: its worker processes share a table in
    # shared memory) or "postgres" (every node on the database shares the UNLOGGED table
    # rate_buckets, exact across nodes, at one round trip per request: a cluster's nodes,
    # issue 15). While the database is away, "postgres" limits locally.
    shared: Literal["memory", "postgres"] = "memory"


class CorsSettings(BaseSettings):
    """Cross-origin front ends (``TWIN_CORS_ORIGINS='["https://hall.example"]'``); none by
    default (the web map is served by twin itself, same origin)."""

    model_config = SettingsConfigDict(env_prefix="TWIN_CORS_")

    origins: list[str] = Field(default_factory=list)
    # Seconds a browser may cache a preflight answer.
    max_age_s: int = Field(default=600, ge=0)


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
    # max_parallel_workers_per_gather on the tile pool's connections. A tile is small work
    # served many at once: two parallel workers cost more CPU to start than they save (the
    # cold aggregation-off tile list took 3.3 s one at a time with them, 2.2 s without).
    parallel_workers: int = Field(default=0, ge=0)
    # Layer data versions pushed to every process by LISTEN/NOTIFY (twin/core/versions.py):
    # a cached tile then costs no database round trip. False reads them per request.
    versions_listen: bool = True
    # Seconds between the listener's full reads of every version (the bounded fallback poll),
    # and the longest it waits for one to be answered before it counts as down.
    versions_poll_s: float = Field(default=5.0, gt=0)
    # Seconds a write through twin waits, before it answers, for every process's listener
    # to acknowledge the change (then it answers anyway and logs the ones that did not).
    versions_sync_timeout_s: float = Field(default=2.0, gt=0)
    # 3D Tiles (issue 13): the DEM layer buildings stand on (with the finer DEMs inside it,
    # tiles/dem.py), the same the 3D view's quantized-mesh terrain is made from.
    terrain_3d: str = "terrain"


class SensorSettings(BaseSettings):
    """Sensor reading ingest, ``POST /sensors/readings`` (``TWIN_SENSORS_``)."""

    model_config = SettingsConfigDict(env_prefix="TWIN_SENSORS_")

    # Readings in one batch; a bigger batch is refused whole (413) before anything is read.
    max_batch: int = Field(default=10_000, ge=1)
    # Bytes of one request body (about 100 bytes a reading).
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1)
    # Clock skew allowed between a sensor gateway and the database before "in the future".
    future_tolerance_s: float = Field(default=60.0, ge=0)


# --- the living twin (issue 14): each class is owned by the module its comment names --------

class ReadingsSettings(BaseSettings):
    """Stored readings (``TWIN_READINGS_``): day partitions kept by pg_partman
    (twin/live/partitions.py)."""

    model_config = SettingsConfigDict(env_prefix="TWIN_READINGS_")

    # Days of readings kept; older day partitions are dropped. 0 keeps every reading.
    retention_days: int = Field(default=0, ge=0)
    # Day partitions made ahead of time.
    premake_days: int = Field(default=7, ge=1)
    # Seconds between partition maintenance runs (one server process of several runs it).
    maintenance_every_s: float = Field(default=3600.0, gt=0)
    # Days of hourly rollups (min/max/avg/count per sensor and hour) kept; 0 keeps them all.
    # Rollups outlive the raw readings: a year of them is what a planner's trend chart reads.
    rollup_retention_days: int = Field(default=0, ge=0)


class MqttSettings(BaseSettings):
    """Readings over MQTT (``TWIN_MQTT_``): twin/core/broker.py, twin/live/mqtt.py.

    ``url`` set: twin subscribes there. Unset: `twin run` starts its own mosquitto and uses
    it; `twin serve` and tests subscribe to nothing.
    """

    model_config = SettingsConfigDict(env_prefix="TWIN_MQTT_")

    url: str | None = None
    # The managed broker's port (loopback only).
    port: int = 51883
    topic: str = "twin/readings/#"
    qos: int = Field(default=1, ge=0, le=2)
    # Bytes of one message's payload; a bigger one is dead-lettered unread.
    max_payload_bytes: int = Field(default=1024 * 1024, ge=1)
    # The managed broker (twin/core/broker.py): Debian's mosquitto, and the unprivileged
    # user it runs as when twin runs as root.
    broker_bin: Path = Path("/usr/sbin/mosquitto")
    os_user: str = "mosquitto"
    # The subscriber (twin/live/mqtt.py): its MQTT client id is
    # ``<client_prefix>-<host>-<slot>`` (the slot a server process holds, so a restarted
    # process finds its persistent session again); seconds the broker keeps that session
    # while the process is away.
    client_prefix: str = "twin"
    # False: one process of this TWIN_HOME subscribes (the others stand by and take over
    # when it ends), with a plain subscription, which mosquitto 2.0 keeps across its own
    # restart. True: every process subscribes to the shared subscription
    # ``$share/twin/<topic>`` and the broker spreads the messages over them, but mosquitto
    # 2.0.11 does not restore shared subscriptions from its persistence file: messages
    # published after a broker restart and before the processes reconnect are lost. For
    # brokers that keep them (or where losing that window is acceptable) and several hosts.
    shared: bool = False
    # Without ``shared``, who the one subscriber is: ``home``, the process of this TWIN_HOME
    # holding its lock file; ``database``, the process of any home (a cluster's nodes, on
    # any machine) holding an advisory lock in the database, as client id
    # ``<client_prefix>-subscriber`` so that whoever takes over resumes the same session.
    # ``twin cluster up`` gives its nodes ``database``.
    leader: Literal["home", "database"] = "home"
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    # Messages stored per transaction at most (several small messages share one commit) and
    # readings per transaction at most; each message is acknowledged after its commit.
    batch_messages: int = Field(default=200, ge=1)
    batch_readings: int = Field(default=10_000, ge=1)
    # QoS 1 messages the broker may have in flight to one subscriber (MQTT 5 receive maximum).
    receive_maximum: int = Field(default=500, ge=1, le=65535)
    # Seconds between reconnection attempts: doubling from the first up to the second.
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)


class EventsSettings(BaseSettings):
    """Events and their escalation (``TWIN_EVENTS_``): twin/live/events.py, escalation.py."""

    model_config = SettingsConfigDict(env_prefix="TWIN_EVENTS_")

    # Seconds between the escalation worker's looks for deadlines that passed.
    escalation_poll_s: float = Field(default=0.5, gt=0)
    # Risk points within this many metres of an event are linked to it.
    link_radius_m: float = Field(default=500.0, gt=0)
    # Nearest response teams by road linked to an event.
    nearest_teams: int = Field(default=3, ge=0)
    # How the linked teams are ranked: "road" (travel time over the road graph, pgRouting)
    # or "distance" (geodesic). "road" falls back to "distance" (and says so in the links)
    # when the road graph finds none.
    teams_by: str = Field(default="road", pattern="^(road|distance)$")
    # The same for events raised by rules and detectors, which are written inside the
    # ingest's transaction: by distance (~10 ms) unless set to "road" (~65-250 ms an event
    # on the small sample, more on the full road graph).
    raised_teams_by: str = Field(default="distance", pattern="^(road|distance)$")
    # At most this many risk points (nearest first) are linked to an event.
    max_linked_risk_points: int = Field(default=20, ge=0)


class RulesSettings(BaseSettings):
    """Alert rules and detectors (``TWIN_RULES_``): twin/live/rules.py, detectors.py."""

    model_config = SettingsConfigDict(env_prefix="TWIN_RULES_")

    # Seconds between the looks for silent sensors.
    silence_check_every_s: float = Field(default=30.0, gt=0)
    # Seconds between incremental runs of the pipe-anomaly detector (when readings came).
    anomaly_every_s: float = Field(default=60.0, gt=0)
    # Sensors silent longer than this many hours are taken as out of service: no silence
    # alert is opened anew for them (a sample loaded from last week would otherwise raise an
    # event per sensor).
    silence_horizon_h: float = Field(default=24.0, gt=0)
    # Minutes of readings the live detector scores (each sensor's baseline is the day before);
    # a zone whose anomaly ended more than 15 minutes before the newest look is closed.
    anomaly_window_min: float = Field(default=60.0, gt=0)


class StreamSettings(BaseSettings):
    """The push stream (``TWIN_STREAM_``): twin/live/fanout.py, twin/api/routes/stream.py."""

    model_config = SettingsConfigDict(env_prefix="TWIN_STREAM_")

    # Seconds a stream ticket may be used to open (or reopen) a stream.
    ticket_ttl_s: float = Field(default=60.0, gt=0)
    # Seconds between keep-alive comments on an idle stream.
    keepalive_s: float = Field(default=15.0, gt=0)
    # Hours outbox messages are kept for reconnecting clients (Last-Event-ID).
    retention_h: float = Field(default=48.0, gt=0)
    # Messages a stream may fall behind its client before it is ended (the client reconnects
    # with Last-Event-ID and replays from the outbox).
    queue_size: int = Field(default=10_000, ge=1)
    # Milliseconds an EventSource waits before reconnecting (the stream's `retry:` hint).
    retry_ms: int = Field(default=2_000, ge=0)


def default_workers() -> int:
    """2 server processes where at least 2 cores are usable, else 1.

    One process saturates its event loop (one core) before PostgreSQL saturates on the 2-core
    reference machine; a second uses the other core. More are left to TWIN_WORKERS: PostGIS
    shares the machine's cores, and each process adds its own pools (tens of connections) and
    tile cache. On one core a second process only adds those costs. The cores this process
    may run on (affinity: containers, taskset), not the machine's.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return min(2, usable or os.cpu_count() or 1)


class AuditSettings(BaseSettings):
    """The audit log of writes (``TWIN_AUDIT_``): how long its rows are kept."""

    model_config = SettingsConfigDict(env_prefix="TWIN_AUDIT_")

    # Rows older than this many days are deleted (at server start-up, then every
    # prune_every_s, and by `twin audit prune`); 0 keeps every row forever.
    retention_days: int = Field(default=365, ge=0)
    prune_every_s: float = Field(default=24 * 3600.0, gt=0)


class ProxySettings(BaseSettings):
    """The managed nginx in front of several nodes (``TWIN_PROXY_``): twin/core/proxy.py.

    It listens on ``TWIN_HOST:TWIN_PORT`` (the address clients know); the nodes behind it on
    ``TWIN_PORT + n``.
    """

    model_config = SettingsConfigDict(env_prefix="TWIN_PROXY_")

    nginx_bin: Path = Path("/usr/sbin/nginx")
    # The unprivileged user nginx's worker processes run as when twin runs as root (the
    # master stays root only to read its configuration and open its logs). Debian's own
    # nginx user by default: it exists wherever the package is installed.
    os_user: str = "www-data"
    # Megabytes of answers the shared cache keeps on disk (least recently used go first).
    cache_mb: int = Field(default=512, ge=1)
    # Worker processes; 0: one per core (nginx's "auto").
    workers: int = Field(default=0, ge=0)
    # Largest request body (uploads): above TWIN_UPLOADS_MAX_FILE_BYTES, so twin answers
    # an oversized upload itself with its own error shape.
    max_body_mb: int = Field(default=2048, ge=1)
    # Seconds to connect to a node before trying the next: short, so a dead node costs
    # little (a live one on loopback connects in well under a millisecond).
    connect_timeout_s: float = Field(default=1.0, gt=0)
    # A node that failed once is left out for this long, then tried again.
    fail_timeout_s: float = Field(default=2.0, gt=0)
    # Shared by the managed nginx and the nodes behind it (``twin cluster up`` makes one per
    # home, in TWIN_HOME/nginx/secret, and gives it to its nodes): a request carrying it came
    # through that nginx, so a node may trust the client address it forwards and the rate
    # limit it charged already (twin/api/proxy_auth.py). Unset: no request is trusted so.
    secret: SecretStr | None = None


class StandbySettings(BaseSettings):
    """Hot standbys of the managed primary (``TWIN_STANDBY_``)."""

    model_config = SettingsConfigDict(env_prefix="TWIN_STANDBY_")

    # Standby k listens on TWIN_DB_PORT + port_offset + k.
    port_offset: int = Field(default=10, ge=1)
    # Seconds a standby may take to start and reach a consistent state it answers reads in
    # (it replays the WAL written since its last restart point first).
    start_timeout_s: float = Field(default=120.0, gt=0)
    # Seconds destroy() waits for the primary to let go of the standby's replication slot
    # (its WAL sender ends shortly after the standby stopped).
    slot_release_timeout_s: float = Field(default=10.0, gt=0)
    hot_standby_feedback: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TWIN_")

    home: Path = Field(default=PROJECT_ROOT / ".twin")
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # Server processes (`twin serve`/`run`): 2, or 1 where this process may use only one
    # core (see default_workers). The README says what each process keeps alone.
    workers: int = Field(default_factory=default_workers, ge=1)
    sample_scale: str = "full"
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    tiles: TilesSettings = Field(default_factory=TilesSettings)
    uploads: UploadSettings = Field(default_factory=UploadSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    cors: CorsSettings = Field(default_factory=CorsSettings)
    sensors: SensorSettings = Field(default_factory=SensorSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    readings: ReadingsSettings = Field(default_factory=ReadingsSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    rules: RulesSettings = Field(default_factory=RulesSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    standby: StandbySettings = Field(default_factory=StandbySettings)

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
