"""Assertions on the server's HTTP answers."""

from __future__ import annotations


def error(response, status: int) -> dict:
    """A user-category JSON error with the given status and no traceback; returns its body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "category"} and body["category"] == "user"
    assert "Traceback" not in response.text
    return body


LOOPBACK_CLIENT = ("127.0.0.1", 50000)


def local_client(app):  # noqa: ANN001, ANN201 - a FastAPI app, its TestClient
    """A TestClient that calls from loopback, as open mode requires (its default caller,
    "testclient", is no address at all, and open mode serves loopback callers only)."""
    from fastapi.testclient import TestClient

    return TestClient(app, client=LOOPBACK_CLIENT)
