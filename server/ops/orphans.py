"""Checkpoint folders that a crash left behind, removed.

A checkpoint is written under a temp name, renamed, then recorded (workers/adapter_files.py,
ops/training.save_checkpoint); an overwritten one's old folder is removed after the new row is
committed. A crash between those steps leaves a `.tmp-*` folder, a folder with no row, or an old
folder no row points at. None of them is ever listed or loadable (every lookup goes through a
row); this sweep gives their disk back. Only entries older than settings.orphan_grace_seconds go:
a younger one may be a save still in progress, here or in another process on the same data dir.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute

from server.ops.checkpoints import MERGED_DIR
from server.runtime import Runtime
from server.store.tables import Checkpoint

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TEMP_PREFIX = ".tmp-"
BATCH = 500


def _old_entries(parent: Path, cutoff: float) -> list[Path]:
    """Folders two levels down (`<parent>/<a>/<b>`) last changed before `cutoff`."""
    found = []
    for outer in parent.glob("*/*"):
        try:
            if outer.is_dir() and outer.stat().st_mtime < cutoff:
                found.append(outer)
        except FileNotFoundError:  # removed meanwhile
            pass
    return found


async def sweep_orphans(rt: Runtime) -> int:
    """Remove orphaned checkpoint and merged-export folders; how many."""
    cutoff = time.time() - rt.settings.orphan_grace_seconds
    checkpoints = await asyncio.to_thread(_old_entries, rt.data_dir / CHECKPOINTS_DIR, cutoff)
    merged = await asyncio.to_thread(_old_entries, rt.data_dir / MERGED_DIR, cutoff)
    doomed = [p for p in checkpoints + merged if p.name.startswith(TEMP_PREFIX)]
    by_dir = {p.relative_to(rt.data_dir).as_posix(): p for p in checkpoints if not p.name.startswith(TEMP_PREFIX)}
    for known in await _known(rt, Checkpoint.storage_dir, list(by_dir)):
        del by_dir[known]
    # merged/<checkpoint row id>/<name>: the whole <row id> folder goes with its row.
    by_row = {p.parent.name: p.parent for p in merged if not p.name.startswith(TEMP_PREFIX)}
    for known in await _known(rt, Checkpoint.id, list(by_row)):
        del by_row[known]
    doomed += [*by_dir.values(), *by_row.values()]
    for path in doomed:
        await asyncio.to_thread(shutil.rmtree, path, True)
    if doomed:
        log.warning("orphan_folders_removed", extra={"count": len(doomed)})
    return len(doomed)


async def _known(rt: Runtime, column: InstrumentedAttribute[str], values: list[str]) -> set[str]:
    """Those of `values` that some checkpoint row holds in `column`."""
    found: set[str] = set()
    for i in range(0, len(values), BATCH):
        chunk = values[i:i + BATCH]
        found.update(await rt.db.run(lambda s, c=chunk: s.scalars(select(column).where(column.in_(c))).all()))
    return found
