"""Server settings. Every option can come from (later wins): its default, the YAML file given with
--config, the environment variable TWINKLE_<NAME>, and the command-line flag --<name>."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.base_models import DEFAULT_BASE_MODEL

ENV_PREFIX = "TWINKLE_"
# The CLI hands the merged settings to the app factory through this variable (uvicorn imports
# the gateway by name, so the settings cannot be passed as an argument).
RESOLVED_ENV = "TWINKLE_RESOLVED_SETTINGS"


class ConfigError(ValueError):
    """Settings that cannot be used; the message says which option and why."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    base_model: str = DEFAULT_BASE_MODEL
    data_dir: Path = Path(".twinkle")
    database_url: str | None = None  # default: SQLite file in data_dir
    allow_download: bool = True  # fall back to the model hub when a base model is not local
    torch_threads: int = Field(2, ge=1)  # the compute thread's torch threads; everything else uses 1
    long_poll_seconds: float = Field(25.0, gt=0, lt=45)  # the SDK gives up on a poll after 45 s
    lora_alpha: float = Field(32.0, gt=0)
    max_lora_rank: int = Field(128, ge=1)
    default_sample_max_tokens: int = Field(256, ge=1)
    max_request_mb: int = Field(256, ge=1)  # larger request bodies get a 413
    signed_url_ttl_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)  # download links we hand out
    reap_interval_seconds: float = Field(60.0, gt=0)  # how often expired checkpoints are removed
    # How long a model's queue waits for a missing seq_id before running the next one anyway.
    seq_gap_grace_seconds: float = Field(3.0, gt=0)
    fwdbwd_batch_tokens: int = Field(1 << 16, ge=1)  # queued chunks merged into one pass, up to this
    sample_batch_rows: int = Field(64, ge=1)  # queued samples on one adapter decoded together, up to this
    sample_queue_limit: int = Field(512, ge=1)  # queued sample requests; beyond it asample answers 429
    # retrieve_future answers "complete_metadata" first for results larger than this (the SDK then
    # reserves room in its in-flight budget before fetching them).
    metadata_only_bytes: int = Field(1 << 20, ge=0)
    # Custom losses run here from an uploaded graph (False: the SDK runs them itself, on top of
    # a cross_entropy forward and backward).
    custom_loss_server_side: bool = True
    log_level: str = "info"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'twinkle.db').resolve()}"

    def to_env(self) -> str:
        return self.model_dump_json()


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
