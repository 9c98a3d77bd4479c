"""Assertions on the server's HTTP answers."""

from __future__ import annotations


def error(response, status: int) -> dict:
    """A user-category JSON error with the given status and no traceback; returns its body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "category"} and body["category"] == "user"
    assert "Traceback" not in response.text
    return body
