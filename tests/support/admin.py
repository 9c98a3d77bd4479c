"""The admin API as the unit tests call it: the admin key and creating tenants and keys."""

from __future__ import annotations

from fastapi.testclient import TestClient

ADMIN_KEY = "admin-key-of-the-unit-tests-0123456789"
ADMIN = {"X-Admin-Key": ADMIN_KEY}
ADMIN_API = "/twinkle/v1/admin"


def new_tenant(client: TestClient, name: str, **body) -> dict:
    r = client.post(f"{ADMIN_API}/tenants", json={"name": name, **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


def new_key(client: TestClient, tenant: str, **body) -> dict:
    r = client.post(f"{ADMIN_API}/keys", json={"tenant": tenant, **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()
