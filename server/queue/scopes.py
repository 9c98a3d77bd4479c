"""The names of scopes and queues, made in one place.

A future's `scope` is where its submission is recognised (a retry with the same scope, seq_id and
fingerprint finds the same future); by default its work is also queued under that name. Code that
finds a session's work again (ending the session, exporting its trace) asks `session_scopes`, so
that it cannot miss a scope that submitting uses."""

from __future__ import annotations

from collections.abc import Iterable

DIRECT_SAMPLER = "direct"  # samples sent without a sampling session
BASE_ADAPTER = "base"  # samples of the bare base model (no checkpoint)


def model_scope(model_id: str) -> str:
    """A training run's operations, run in its seq_id order."""
    return f"model:{model_id}"


def session_scope(session_id: str) -> str:
    """Model creations in a session (numbered by model_seq_id)."""
    return f"session:{session_id}"


def custom_loss_scope(session_id: str) -> str:
    """Custom-loss uploads in a session. Apart from session_scope because they are numbered by
    custom_loss_seq_id, which would collide with model_seq_id there."""
    return f"session:{session_id}:custom_loss"


def sampler_scope(sampler_id: str | None) -> str:
    """Sample requests of a sampling session, or of none (direct requests share one scope)."""
    return f"sampler:{sampler_id or DIRECT_SAMPLER}"


def sample_queue(tenant_id: str, adapter_ref: str | None) -> str:
    """Where a sample waits: one queue per tenant and checkpoint, so that tenants take turns."""
    return f"sample:{tenant_id}:{adapter_ref or BASE_ADAPTER}"


def sample_batch_key(adapter_ref: str | None) -> str:
    """What samples may share a pass: the checkpoint alone, so several tenants' requests on one
    checkpoint are batched together."""
    return f"sample:{adapter_ref or BASE_ADAPTER}"


def session_scopes(session_id: str, model_ids: Iterable[str], sampler_ids: Iterable[str]) -> list[str]:
    """Every scope a session's work can be under: the session's own first, then its training runs
    and its samplers (a trace shows them as tracks in this order)."""
    return [
        session_scope(session_id),
        custom_loss_scope(session_id),
        *(model_scope(m) for m in model_ids),
        *(sampler_scope(x) for x in sampler_ids),
    ]
