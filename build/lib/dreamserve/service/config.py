"""The service's settings slice, built once by the composition root from Settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceConfig:
    token_cache_seconds: float = 60.0
    max_attempts: int = 3  # starts of one job before a restart gives up on it
    finished_cache_seconds: float = 60.0  # how long a finished job is served from memory
    finished_cache_size: int = 10_000
    # An unfinished job's record is served from memory too, until its next change, in the
    # server that makes every change of its jobs (SQLite); this bounds how long a change from
    # another process (a CLI `accounts remove`) goes unseen.
    unfinished_cache_seconds: float = 1.0
    lease_seconds: float = 30.0  # an unclaimed job's lease, as a runner's (RunnerConfig)
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 70_000_000  # of an upscale's output
    max_upload_pixels: int = 36_000_000
    upload_decodes: int = 2  # uploads decoded at once
    webhook_allow_private: bool = False  # replyUrls on loopback, private, link-local hosts
    idempotency_seconds: float = 86_400.0  # how long an Idempotency-Key names its job
    max_wait_seconds: int = 60  # of GET /images/<jobid>?wait=
    keepalive_seconds: float = 15.0  # between comments on a quiet event stream
    queue_limit: int = 1000  # jobs waiting (queueSeconds) per account; past it, a 429

    @property
    def lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)
