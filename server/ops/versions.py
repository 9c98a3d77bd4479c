"""Adapter versions as operations see them: made by an ephemeral save for sampling, pinned by the
samples that use them, released by the rules of server/engine/versions.py."""

from __future__ import annotations

import logging

from server import ids
from server.engine.versions import Version
from server.errors import Gone
from server.runtime import Runtime
from server.store.tables import Model

log = logging.getLogger(__name__)


async def make_version(rt: Runtime, model: Model) -> Version:
    """A new in-memory version of the model's adapter as it is now (runs inside the model's queued
    save, so it sees every step submitted before it)."""
    key = ids.new_id("ver")
    info = await rt.engine_for(model.base_model).snapshot(model.id, key)
    now = rt.versions.now()
    version = Version(key, model.tenant_id, model.id, model.session_id, model.base_model, info.step, info.nbytes,
                      created=now, last_used=now)
    release(rt, rt.versions.add(version), "superseded")
    log.info("version_made", extra={"version": key, "model_id": model.id, "step": info.step, "bytes": info.nbytes,
                                    "held": len(rt.versions.held())})
    return version


def pin(rt: Runtime, key: str, sampler_id: str) -> Version:
    """Pin version `key` for one sample (until `unpin`); Gone if it was released."""
    version = rt.versions.begin(key)
    if version is None:
        raise Gone(
            f"the weights of sampler {sampler_id} were released: they lived in memory only "
            "(save_weights_and_get_sampling_client) and were superseded by a newer save of the same model and "
            "left idle, or the server restarted; save again, or save named sampler weights "
            "(save_weights_for_sampler with a name) to keep them",
            field="sampling_session_id",
        )
    return version


def unpin(rt: Runtime, key: str) -> None:
    release(rt, rt.versions.end(key), "superseded")


def release(rt: Runtime, versions: list[Version], reason: str) -> None:
    """Free released versions' weights in their engines, in the background (an engine may be busy
    with other work for a while; nothing waits for this)."""
    if versions:
        rt.spawn(_free(rt, versions, reason), name="release-versions")


async def _free(rt: Runtime, versions: list[Version], reason: str) -> None:
    for version in versions:
        try:
            await rt.engine_for(version.base_model).release(version.key)
        except Exception:
            log.exception("version_release_failed", extra={"version": version.key})
    log.info("versions_released", extra={"versions": [v.key for v in versions], "reason": reason,
                                         "held": len(rt.versions.held())})


def release_idle(rt: Runtime) -> int:
    """Release every version now due (the session reaper calls this each round); how many."""
    due = rt.versions.take_due()
    release(rt, due, "idle")
    return len(due)
