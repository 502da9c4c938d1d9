"""The SQL schema, as SQLAlchemy Core tables. Alembic migrations create exactly this.

Times are milliseconds since the epoch (UTC) in BIGINT columns: portable across SQLite and
PostgreSQL and cheap to compare.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Json = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

# Owner 0 marks an account shared by every user (declared by the operator).
SHARED = 0

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("created_at", BigInteger, nullable=False),
    # Limits an operator sets (`dreamserve users set`), None for none: unfinished jobs at once,
    # and submissions per minute, counted in `minute_count` for the minute `minute` (epoch ms of
    # its start; admission.py's UserLimits).
    Column("max_running", Integer, nullable=True),
    Column("max_per_minute", Integer, nullable=True),
    Column("minute", BigInteger, nullable=True),
    Column("minute_count", Integer, nullable=False, server_default="0"),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
    # What identifies a token to people, never enough to use it: `user:N-` and the first
    # characters of its secret (None for tokens made before it was kept).
    Column("prefix", String(64), nullable=True),
    Column("revoked_at", BigInteger, nullable=True),  # refused from then on
    Column("last_used_at", BigInteger, nullable=True),  # to within the token cache
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("owner", Integer, nullable=False),
    Column("email", String(255), nullable=False),
    Column("region", String(32), nullable=False),
    Column("engine", String(64), nullable=False),
    Column("settings", Json, nullable=False),  # the engine's settings, secrets left out
    Column("secrets", Text, nullable=True),  # the secret settings, encrypted (sealing.py)
    Column("models", Json, nullable=True),  # None: every catalogue model the engine serves
    Column("max_jobs", Integer, nullable=False),
    # Admission takes the highest priority with a free slot first (admission.py).
    Column("priority", Integer, nullable=False, server_default="0"),
    # Health (worker.py, admission.py): failures that were the account's, in a row; the end of
    # the cooldown they led to (epoch ms); the last such failure and when it happened.
    Column("failures", Integer, nullable=False, server_default="0"),
    Column("cooldown_until", BigInteger, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("last_error_at", BigInteger, nullable=True),
    # The user whose waiting job last took a slot of this account: the queue serves users in
    # turn (round robin), each user's jobs first come, first served.
    Column("queue_cursor", Integer, nullable=True),
    Column("running", Integer, nullable=False, default=0),
    Column("error", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    UniqueConstraint("owner", "name", name="uq_accounts_owner_name"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("jobid", String(400), nullable=False, unique=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True),
    Column("account", String(255), nullable=False),
    Column("type", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("model", String(128), nullable=False),
    Column("request", Json, nullable=False),  # the client's request, as the record echoes it
    Column("spec", Json, nullable=False),  # what the engine is asked for, decided at admission
    Column("forecast_cost", Float, nullable=False),
    Column("images", Json, nullable=True),
    Column("progress", Integer, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text, nullable=True),
    Column("error_details", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=True),
    Column("started_at", BigInteger, nullable=True),
    Column("finished_at", BigInteger, nullable=True),
    # While a runner works on the job it renews this; past it, the reaper takes the job back.
    Column("lease_until", BigInteger, nullable=True),
    # Set while the job waits in its account's queue for a slot (`queueSeconds`): when it gives
    # up. Kept once the job ends waiting (it then held no slot to give back).
    Column("queue_deadline", BigInteger, nullable=True),
    Index("ix_jobs_status_account", "status", "account_id"),
    Index("ix_jobs_status_lease", "status", "lease_until"),
    Index("ix_jobs_finished_at", "finished_at"),  # retention
    # GET /images, the user's jobs newest first: a range scan of one of these, never a sort.
    Index("ix_jobs_user_created", "user_id", "created_at", "id"),
    Index("ix_jobs_user_status_created", "user_id", "status", "created_at", "id"),
)

assets = Table(
    "assets",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("item_id", String(19), nullable=False, unique=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True),
    Column("account", String(255), nullable=False),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True),
    Column("position", Integer, nullable=True),
    Column("kind", String(16), nullable=False),  # "generated" or "upload"
    Column("uri", String(512), nullable=False, unique=True),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("format", String(8), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("description", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_assets_account_user_created", "account", "user_id", "created_at"),
)

# The webhook outbox: one row per delivery of a job's record to its replyUrl, written in the
# transaction that ends the job; the deliverer (webhooks/delivery.py) claims due rows and
# records each try. `host` is the receiver's host and port (the unit of the per-host cap and
# cooldown); `held_until` is set while a try is in flight (what the per-user and per-host
# caps count, on every node).
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("message_id", String(64), nullable=False),  # `webhook-id`, the same on every try
    Column("url", String(1024), nullable=False),
    Column("status", String(16), nullable=False),  # pending, delivered, stopped, failed, refused
    Column("tries", Integer, nullable=False, default=0),
    Column("next_at", BigInteger, nullable=True),  # when pending: the next try (or claim) is due
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("host", String(1024), nullable=False),
    Column("held_until", BigInteger, nullable=True),
    Index("ix_webhook_deliveries_status_next_at", "status", "next_at"),
    Index("ix_webhook_deliveries_job_id", "job_id"),
    Index("ix_webhook_deliveries_held_until", "held_until"),
)

webhook_tries = Table(
    "webhook_tries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "delivery_id",
        Integer,
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("at", BigInteger, nullable=False),
    Column("status_code", Integer, nullable=True),  # None: no HTTP answer (network, timeout)
    Column("error", Text, nullable=True),
    Column("duration_ms", Integer, nullable=False),
    Index("ix_webhook_tries_delivery_id", "delivery_id"),
)

# Receiver hosts whose last tries got no answer (timeouts, refused connections): `failures` in
# a row, and until when their deliveries wait (a host that answers loses its row).
webhook_hosts = Table(
    "webhook_hosts",
    metadata,
    Column("host", String(1024), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("cooldown_until", BigInteger, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
)

# Per-user signing secrets, sealed like account secrets; a rotated-out one keeps signing beside
# the new one until `previous_until`.
webhook_secrets = Table(
    "webhook_secrets",
    metadata,
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("secret", Text, nullable=False),
    Column("previous", Text, nullable=True),
    Column("previous_until", BigInteger, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
)

# Idempotency-Key of POST /images and /images/upscale: the job a key made, for 24 hours.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("key", String(255), nullable=False),
    Column("fingerprint", String(64), nullable=False),  # sha256 of the endpoint and the body
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_id_key"),
    Index("ix_idempotency_keys_created_at", "created_at"),
)
