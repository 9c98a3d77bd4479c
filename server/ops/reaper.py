"""Removal of what has expired. Expired checkpoints are already invisible (every lookup filters on
expires_at); reap_expired deletes their rows and folders, old trace exports, and expired uploaded
files, for good, drops the results of futures past their retention, deletes futures and ended
sessions past theirs (ops/lifecycle.forget_ended_sessions), and sweeps orphaned folders.
Runtime.start schedules it every settings.reap_interval_seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from server.ops import files
from server.ops.checkpoints import ARCHIVES_DIR, TRACES_DIR, forget, remove_folders
from server.ops.lifecycle import FORGET_BATCH, forget_ended_sessions
from server.ops.orphans import sweep_orphans
from server.queue.futures import EXPIRE_BATCH, delete_finished, expire_results
from server.runtime import Runtime
from server.store.queries import ended_ephemeral_checkpoints, expired_checkpoints
from server.store.tables import utcnow

log = logging.getLogger(__name__)

BATCH = 500
ORPHAN_SWEEP_SECONDS = 3600.0


async def reap_expired(rt: Runtime) -> int:
    """Delete every checkpoint whose TTL has passed (rows, then folders); return how many."""
    reaped = 0
    while True:
        count, folders = await rt.db.run(_forget_expired)
        await remove_folders(rt, folders)
        reaped += count
        if count < BATCH:
            break
    removed_traces = await asyncio.to_thread(_remove_old_exports, rt)
    removed_files = await files.reap(rt)
    expired_results = await _expire_results(rt)
    deleted_futures = await _drain(rt, delete_finished, rt.settings.future_row_retention_seconds, EXPIRE_BATCH)
    sessions = await _drain(rt, forget_ended_sessions, rt.settings.ended_session_retention_seconds, FORGET_BATCH)
    counts = {"checkpoints": reaped, "trace_exports": removed_traces, "files": removed_files,
              "future_results": expired_results, "futures": deleted_futures, "sessions": sessions}
    if any(counts.values()):
        log.info("reaped_expired", extra=counts)
    return reaped


async def _drain(rt: Runtime, batch: Callable[[Session, datetime], int], retention: float, size: int) -> int:
    """Run `batch` (rows older than the retention, at most `size` at a time) until it runs dry."""
    cutoff, total = utcnow() - timedelta(seconds=retention), 0
    while count := await rt.db.run(lambda s: batch(s, cutoff)):
        total += count
        if count < size:
            break
    return total


async def _expire_results(rt: Runtime) -> int:
    """Drop results past future_retention_seconds, from the store and from the hub's memory."""
    retention = rt.settings.future_retention_seconds
    cutoff, total = utcnow() - timedelta(seconds=retention), 0
    while expired := await rt.db.run(lambda s: expire_results(s, cutoff, retention)):
        rt.hub.forget_results(expired)
        total += len(expired)
        if len(expired) < EXPIRE_BATCH:
            break
    return total


def _forget_expired(s: Session) -> tuple[int, list[str]]:
    """Up to BATCH expired checkpoints forgotten (and ephemeral sampler folders an older server
    wrote for sessions that have ended): how many, and the folders to remove."""
    rows = expired_checkpoints(s, utcnow(), BATCH)
    rows += ended_ephemeral_checkpoints(s, BATCH - len(rows))
    return len(rows), forget(s, rows)


def _remove_old_exports(rt: Runtime) -> int:
    """Trace exports and checkpoint tars older than a download link's lifetime: every link to
    them has expired (a new link makes a new one)."""
    cutoff = time.time() - rt.settings.signed_url_ttl_seconds
    removed = 0
    for path in [*(rt.data_dir / TRACES_DIR).glob("*/*"), *(rt.data_dir / ARCHIVES_DIR).glob("*/*")]:
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


async def run_reaper(rt: Runtime, interval: float | None = None) -> None:
    """Reap forever (cancel the task to stop). A failed round is logged and retried next round."""
    interval = interval or rt.settings.reap_interval_seconds
    next_sweep = 0.0  # orphaned folders: at start (after a crash), then hourly (a directory walk)
    while True:
        try:
            await reap_expired(rt)
            if time.monotonic() >= next_sweep:
                await sweep_orphans(rt)
                next_sweep = time.monotonic() + ORPHAN_SWEEP_SECONDS
        except Exception:
            log.exception("reap_failed")
        await asyncio.sleep(interval)
