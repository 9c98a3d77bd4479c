"""Pydantic models for the JSON bodies of the admin API (`/twinkle/v1/admin/...`): tenants, their
quota overrides and their API keys. Requests reject unknown fields (this API is ours; a typo
should fail loudly). No response ever carries a key except the one that creates it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

TENANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
TENANT_NAME_MAX_LEN = 64

TenantName = Annotated[str, Field(min_length=1, max_length=TENANT_NAME_MAX_LEN, pattern=TENANT_NAME_PATTERN)]
# Quota overrides by name (server/tenancy/quotas.py lists the names), e.g. {"max_live_models": 3}.
Limits = dict[str, StrictInt | StrictFloat]


class AdminRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdminResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateTenantRequest(AdminRequest):
    name: TenantName
    limits: Limits = Field(default_factory=dict)


class Tenant(AdminResponse):
    id: str
    name: str
    limits: Limits
    created_at: datetime
    active_keys: int  # keys not revoked


class TenantList(AdminResponse):
    tenants: list[Tenant]


class CreateKeyRequest(AdminRequest):
    tenant: str = Field(min_length=1, max_length=200)
    label: str | None = Field(None, max_length=200)


class ApiKey(AdminResponse):
    """A key as listed: never the key itself. `prefix` is its first characters where that is safe
    to show (long random keys), else None."""

    id: str
    tenant: str
    prefix: str | None
    label: str | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class CreatedApiKey(ApiKey):
    """The answer to creating a key: the only place the key ever appears."""

    key: str


class KeyList(AdminResponse):
    keys: list[ApiKey]
