"""The one Settings object, read from `DREAMSERVE_*` environment variables.

It is built once by the CLI (or a test) and its values are passed down through constructors; no
other module reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ImageFormat = Literal["jpeg", "png", "webp"]


class Settings(BaseSettings):
    """Every setting of the server and the CLI. The README lists them with their defaults."""

    model_config = SettingsConfigDict(env_prefix="DREAMSERVE_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path("./data")
    public_url: str | None = None
    config: Path | None = None  # the operator's TOML file: models and accounts (config.py)
    database_url: str | None = None
    # The longest a request waits for a lock another transaction holds (or, on PostgreSQL, for
    # a connection) before it is answered 503; PostgreSQL's longest statement.
    database_busy_seconds: float = Field(default=5.0, gt=0)
    database_statement_seconds: float = Field(default=30.0, gt=0)
    blob_url: str | None = None
    # The links to images: the API's own signed links ("proxy", it serves the bytes) or, for an
    # s3:// blob store, the store's presigned URLs (clients fetch from the store).
    blob_links: Literal["proxy", "presigned"] = "proxy"
    link_ttl_seconds: int = Field(default=86_400, ge=1)
    retry_after_seconds: int = Field(default=5, ge=1)
    image_format: ImageFormat = "jpeg"
    # The stored images' encoding, as Pillow takes it (encoding.py).
    jpeg_quality: int = Field(default=92, ge=1, le=100)
    png_compress_level: int = Field(default=6, ge=0, le=9)
    webp_quality: int = Field(default=90, ge=0, le=100)
    render_threads: int = Field(default=0, ge=0)
    # The pixels the jobs in progress may hold together, across all accounts (render_memory.py).
    render_memory_mb: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    # What a client may hold before its request reaches the app (httplimits.py).
    max_header_bytes: int = Field(default=65_536, ge=1024)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=1000, ge=1)
    # A request body's time to arrive, from the end of its head (httplimits.py), and the bodies
    # arriving at once, per user and in all (api/body.py).
    body_timeout_seconds: float = Field(default=60.0, gt=0)
    max_body_reads_per_user: int = Field(default=6, ge=1)
    max_body_reads: int = Field(default=64, ge=1)
    max_image_pixels: int = Field(default=70_000_000, ge=1)
    max_upload_pixels: int = Field(default=36_000_000, ge=1)
    token_cache_seconds: float = Field(default=60.0, ge=0)
    account_cache_seconds: float = Field(default=2.0, ge=0)
    progress_interval_seconds: float = Field(default=0.5, gt=0)
    lease_seconds: float = Field(default=30.0, gt=0)
    # Whether `serve` runs jobs itself (PostgreSQL only may say false: `dreamserve worker`s do).
    run_jobs: bool = True
    reaper_interval_seconds: float = Field(default=5.0, gt=0)
    # The longest a shutdown (SIGTERM) waits for requests to finish, then uvicorn cancels them.
    shutdown_seconds: float = Field(default=10.0, gt=0)
    # At SIGTERM, how long the jobs running in this process may go on to their end (no job is
    # admitted or started meanwhile); those still running then run again at the next start.
    stop_grace_seconds: float = Field(default=30.0, ge=0)
    retention_days: float = Field(default=30.0, gt=0)
    webhook_allow_private: bool = False
    # Jobs that may wait (`queueSeconds`) in one account's queue for a slot; past it, a 429.
    queue_limit: int = Field(default=1000, ge=0)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    # How long a deliverer's claim holds a delivery past its try's timeout, for the try to be
    # recorded: a try cut short unrecorded (a crash, a busy database) is sent again after that.
    webhook_claim_grace_seconds: float = Field(default=20.0, gt=0)
    # Webhook tries in flight at once: in this process, and for one user or to one receiver
    # host on every process together (so that one tenant's silent receivers cannot hold them).
    webhook_concurrency: int = Field(default=32, ge=1)
    webhook_concurrency_per_user: int = Field(default=8, ge=1)
    webhook_concurrency_per_host: int = Field(default=8, ge=1)
    upstream_allow_private: bool = False
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # Log lines as text (a message, then key=value fields) or as JSON objects, one a line.
    log_format: Literal["text", "json"] = "text"
    access_log: bool = True
    # GET /metrics asks for `Authorization: Bearer <metrics_token>` when set (open when not);
    # a `dreamserve worker` serves its metrics on `metrics_port` when set (0: none).
    metrics_token: str | None = Field(default=None, repr=False)
    metrics_port: int = Field(default=0, ge=0, le=65535)

    @property
    def listens_everywhere(self) -> bool:
        """Bound to every interface (`0.0.0.0`, `::`): reached at addresses it cannot know."""
        return self.host in ("0.0.0.0", "::", "")

    @property
    def base_url(self) -> str:
        """Where clients reach this server: the links in job records point here."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.listens_everywhere else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def database(self) -> str:
        """The database URL: `DREAMSERVE_DATABASE_URL`, else a SQLite file in the data dir."""
        return self.database_url or f"sqlite:///{self.data_dir / 'dreamserve.db'}"

    @property
    def blob_store(self) -> str:
        """The blob store URL: `DREAMSERVE_BLOB_URL`, else the `blobs` directory of the data dir
        (`file:data/blobs` for a relative data dir, `file:///srv/dream/blobs` for an absolute
        one)."""
        if self.blob_url:
            return self.blob_url
        path = self.data_dir / "blobs"
        return path.as_uri() if path.is_absolute() else f"file:{quote(os.fsencode(path))}"

    @property
    def threads(self) -> int:
        """Threads for rendering and encoding images (0 means one per CPU core)."""
        return self.render_threads or (os.cpu_count() or 1)
