"""The SQL schema. Every row that a client can reach carries its tenant, and every query that
serves a client filters by it (see queries.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from server.kinds import FutureState


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None) if dialect.name == "sqlite" else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JSON(), list[str]: JSON()}


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (UniqueConstraint("name", name="uq_tenants_name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # Overrides of the server-wide quotas for this tenant, e.g. {"max_live_models": 3}; {} = none.
    limits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A tenant's API key. Only its sha256 is stored: the key itself is shown once, when made."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "key-…": names the key, reveals nothing
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the API key, never the key
    prefix: Mapped[str | None] = mapped_column(String(16))  # its first characters, where that is safe to show
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Session(Base):
    __tablename__ = "sessions"
    # The session reaper's scan: live sessions (finished_at IS NULL) by their last heartbeat.
    __table_args__ = (Index("ix_sessions_live_heartbeat", "finished_at", "last_heartbeat_at"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    sdk_version: Mapped[str | None] = mapped_column(String(64))
    tags: Mapped[list[str]] = mapped_column(default=list)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    project_id: Mapped[str | None] = mapped_column(String(200))
    display_name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    finish_reason: Mapped[str | None] = mapped_column(String(32))


class Model(Base):
    """A LoRA training run: one adapter on the base model. Its id is the Tinker model_id."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    model_seq_id: Mapped[int] = mapped_column(BigInteger)
    base_model: Mapped[str] = mapped_column(String(500))
    lora_rank: Mapped[int] = mapped_column(Integer)
    lora_spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_request_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set on runs made by copy_weights: the tinker path the weights came from. Such a run only
    # holds its copied checkpoint; it cannot be trained on.
    copied_from: Mapped[str | None] = mapped_column(String(700))
    # The server process (instances.id) whose queue runs the model's work, in seq_id order; the
    # others forward its requests there (server/queue/instances.py). None: not owned yet.
    owner: Mapped[str | None] = mapped_column(String(64))


class Future(Base):
    """One submitted operation. `scope` + `seq_id` + `fingerprint` identify a submission, so a
    client's retry of the same request finds the same row instead of running the work twice."""

    __tablename__ = "futures"
    __table_args__ = (
        UniqueConstraint("tenant_id", "scope", "seq_id", "fingerprint", name="uq_futures_submission"),
        Index("ix_futures_state", "state"),
        Index("ix_futures_owner", "owner"),
        Index("ix_futures_finished_at", "finished_at"),  # the reaper's scan for results past retention
    )
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    kind: Mapped[str] = mapped_column(String(40))  # an OpKind
    scope: Mapped[str] = mapped_column(String(260))  # made by server/queue/scopes.py
    # 64-bit: a cloned SamplingClient numbers its requests from 10^9 x its clone id (up to 10^18).
    seq_id: Mapped[int] = mapped_column(BigInteger)
    fingerprint: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=FutureState.PENDING)  # a FutureState
    result: Mapped[bytes | None] = mapped_column(LargeBinary)
    result_format: Mapped[str | None] = mapped_column(String(8))  # a ResultFormat
    error: Mapped[str | None] = mapped_column(Text)
    error_category: Mapped[str | None] = mapped_column(String(16))  # an ErrorCategory
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    # The server process (Instance.id) whose queue holds it while pending: if that process dies,
    # another fails it (server/queue/instances.py). None: from before owners were recorded.
    owner: Mapped[str | None] = mapped_column(String(64))


class Instance(Base):
    """A live server process: it holds queued work in memory, so its futures live and die with it."""

    __tablename__ = "instances"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    url: Mapped[str | None] = mapped_column(String(500))  # where the other processes reach it


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("model_id", "kind", "name", name="uq_checkpoints_name"),
        Index("ix_checkpoints_expires_at", "expires_at"),  # the reaper's scan
        Index("ix_checkpoints_storage_dir", "storage_dir"),  # the orphan sweep's (ops/orphans.py)
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # training | sampler
    name: Mapped[str] = mapped_column(String(200))
    storage_dir: Mapped[str] = mapped_column(String(500))  # relative to the data dir, server-made
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    has_optimizer: Mapped[bool] = mapped_column(Boolean, default=False)
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False)  # behind save_weights_and_get_sampling_client
    public: Mapped[bool] = mapped_column(Boolean, default=False)  # readable (load, sample, info) by every tenant
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SamplingSession(Base):
    __tablename__ = "sampling_sessions"
    id: Mapped[str] = mapped_column(String(260), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    base_model: Mapped[str] = mapped_column(String(500))
    model_path: Mapped[str | None] = mapped_column(String(700))
    checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"))
    # An ephemeral sampler (save_weights_and_get_sampling_client): the in-memory adapter version it
    # samples, held by the process that owns `model_id` (server/engine/versions.py); lost on restart.
    version: Mapped[str | None] = mapped_column(String(64))
    model_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CustomLossRow(Base):
    """A custom loss graph uploaded in a session (the JSON as sent; compiled again where it runs)."""

    __tablename__ = "custom_losses"
    __table_args__ = (UniqueConstraint("session_id", "seq", name="uq_custom_losses_seq"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(200))
    inputs: Mapped[list[str]] = mapped_column(JSON)
    graph: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UploadedFile(Base):
    """A file a tenant uploaded (`POST /v1/files`): a dataset the native API's Dataset can read.
    Its bytes lie at storage_path (relative to the data dir, made from ids only)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_expires_at", "expires_at"),)  # the reaper's scan
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(BigInteger)
    storage_path: Mapped[str] = mapped_column(String(500))
    expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RunMetric(Base):
    """One training step of a run as the dashboard draws it: a forward(_backward)'s or an
    optim_step's metrics, numbered per run (`idx`). Written in batches (server/tenancy/run_metrics.py);
    a run keeps its newest `run_metrics_per_run` points."""

    __tablename__ = "run_metrics"
    model_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    kind: Mapped[str] = mapped_column(String(40))  # an OpKind
    step: Mapped[int] = mapped_column(BigInteger)  # optimizer steps of the run so far (an optim_step: its own)
    tokens: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
