"""Files a tenant uploads (`POST /v1/files`, OpenAI's Files API) to train on: the native API's
`Dataset(DatasetMeta(dataset_id="file-…"))` reads one by its id (docs/files.md).

A file is checked when it arrives (its name says its format, server/ops/file_rows.py; every row
must parse), so a bad file is refused at upload, with the line that is wrong, not later in a data
loader. Its bytes lie under the data dir at a path made from ids only; its row holds the tenant,
and every lookup filters by it (another tenant's file is "not found"). A tenant holds at most
`max_files` files of `max_file_storage_mb` in all (quota overrides apply), each at most
`max_file_mb`; an optional expiry (OpenAI's `expires_after`) hides a file at once and the reaper
removes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path, PurePosixPath

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from server import ids
from server.errors import InvalidRequest, NotFound
from server.ops.file_rows import MAX_ROWS, Row, format_of, parse_rows
from server.runtime import Runtime
from server.store.tables import Tenant, UploadedFile, utcnow

log = logging.getLogger(__name__)

FILES_DIR = "files"
STAGING_DIR = "files/.incoming"
STAGING_MAX_AGE_SECONDS = 3600  # an upload folder older than this was left by a crash
PURPOSES = ("fine-tune", "user_data", "batch", "evals", "assistants", "vision")  # OpenAI's; all are data here
EXPIRY_SECONDS = (3600, 30 * 24 * 3600)  # OpenAI's bounds for expires_after
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
MAX_NAME = 255
REAP_BATCH = 500


# ----- upload --------------------------------------------------------------------------------------
def staging_dir(rt: Runtime) -> Path:
    return rt.data_dir / STAGING_DIR


async def upload_room(rt: Runtime, tenant_id: str) -> tuple[int, str]:
    """How many bytes the tenant's next file may have, and the limit that says so (checked before
    its body is read); a 400 when the tenant holds all the files or bytes it may."""
    count, used = await rt.db.run(lambda s: _usage(s, tenant_id))
    _check_room(rt, tenant_id, count, used, 0)
    per_file, storage = rt.settings.max_file_mb << 20, rt.quotas.limits(tenant_id).max_file_storage_mb << 20
    if storage - used < per_file:
        return storage - used, f"the {storage - used} bytes left of this tenant's file storage ({storage >> 20} MiB)"
    return per_file, f"this server's limit of {per_file >> 20} MiB per file"


def _usage(s: Session, tenant_id: str) -> tuple[int, int]:
    count, used = s.execute(select(func.count(), func.coalesce(func.sum(UploadedFile.size_bytes), 0))
                            .where(UploadedFile.tenant_id == tenant_id)).one()
    return int(count), int(used)


def _check_room(rt: Runtime, tenant_id: str, count: int, used: int, size: int) -> None:
    limits = rt.quotas.limits(tenant_id)
    if count >= limits.max_files:
        raise InvalidRequest(f"this tenant holds {count} files, the most it may ({limits.max_files}); delete one "
                             "first (DELETE /v1/files/{id})", field="file")
    if used + size > limits.max_file_storage_mb << 20:
        raise InvalidRequest(f"this tenant's files would hold {used + size} bytes, over its limit of "
                             f"{limits.max_file_storage_mb} MiB; delete some first", field="file")


def clean_filename(filename: str) -> str:
    """The file's own name (no folders: it is a label, never a path here), or a 400."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    if not name or "\0" in name or len(name) > MAX_NAME:
        raise InvalidRequest(f"a file name of 1 to {MAX_NAME} characters, without NUL", field="file")
    return name


def check_purpose(purpose: str | None) -> str:
    if purpose not in PURPOSES:
        raise InvalidRequest(f"one of: {', '.join(PURPOSES)}", field="purpose")
    return purpose


def check_expiry(anchor: str | None, seconds: str | None) -> int | None:
    """OpenAI's expires_after[anchor] (only created_at) and expires_after[seconds]; None: kept."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("the only anchor is 'created_at'", field="expires_after[anchor]")
    low, high = EXPIRY_SECONDS
    if seconds is None or not seconds.isdigit() or not low <= int(seconds) <= high:
        raise InvalidRequest(f"whole seconds from {low} to {high}", field="expires_after[seconds]")
    return int(seconds)


async def store(rt: Runtime, tenant_id: str, staged: Path, filename: str, purpose: str,
                expires_after: int | None) -> UploadedFile:
    """Check a staged upload's rows, then keep it: moved into place and recorded in one step."""
    name = clean_filename(filename)
    suffix = format_of(name)
    size, digest, rows = await asyncio.to_thread(_inspect, staged, suffix)
    file_id = ids.new_id("file")
    relative = f"{FILES_DIR}/{tenant_id}/{file_id}"
    target = rt.data_dir / relative

    def record(s: Session) -> UploadedFile:
        s.get(Tenant, tenant_id, with_for_update=True)  # one upload at a time per tenant (PostgreSQL)
        _check_room(rt, tenant_id, *_usage(s, tenant_id), size)
        expires = None if expires_after is None else utcnow() + timedelta(seconds=expires_after)
        row = UploadedFile(id=file_id, tenant_id=tenant_id, filename=name, purpose=purpose, size_bytes=size,
                           sha256=digest, rows=rows, storage_path=relative, expires_at=expires)
        s.add(row)
        s.flush()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # inside the transaction: a failed move records nothing
        return row

    try:
        row = await rt.db.run(record)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    log.info("file_uploaded", extra={"tenant_id": tenant_id, "file_id": file_id, "bytes": size, "rows": rows})
    return row


def _inspect(path: Path, suffix: str) -> tuple[int, str, int]:
    data = path.read_bytes()
    rows = parse_rows(data, suffix, max_rows=MAX_ROWS)
    return len(data), hashlib.sha256(data).hexdigest(), len(rows)


# ----- lookups -------------------------------------------------------------------------------------
def _visible(tenant_id: str):  # noqa: ANN202 - a SQL condition
    return (UploadedFile.tenant_id == tenant_id) & or_(UploadedFile.expires_at.is_(None),
                                                       UploadedFile.expires_at > utcnow())


def owned_file(s: Session, tenant_id: str, file_id: str, field: str = "file_id") -> UploadedFile:
    row = s.scalar(select(UploadedFile).where(UploadedFile.id == file_id, _visible(tenant_id))) \
        if FILE_ID.fullmatch(file_id) else None
    if row is None:
        raise NotFound(f"file {file_id!r} not found", field=field)
    return row


async def get(rt: Runtime, tenant_id: str, file_id: str) -> UploadedFile:
    return await rt.db.run(lambda s: owned_file(s, tenant_id, file_id))


async def listing(rt: Runtime, tenant_id: str, *, purpose: str | None, limit: int, after: str | None,
                  descending: bool) -> tuple[list[UploadedFile], bool]:
    """A page of the tenant's files, newest first unless ascending; `after` is the last id seen."""
    def read(s: Session) -> list[UploadedFile]:
        query = select(UploadedFile).where(_visible(tenant_id))
        if purpose is not None:
            query = query.where(UploadedFile.purpose == purpose)
        order = (UploadedFile.created_at.desc(), UploadedFile.id.desc()) if descending else \
            (UploadedFile.created_at, UploadedFile.id)
        return list(s.scalars(query.order_by(*order)))  # bounded by the tenant's max_files

    rows = await rt.db.run(read)
    if after is not None:
        at = next((i for i, r in enumerate(rows) if r.id == after), None)
        if at is None:
            raise NotFound(f"file {after!r} not found", field="after")
        rows = rows[at + 1:]
    return rows[:limit], len(rows) > limit


async def delete(rt: Runtime, tenant_id: str, file_id: str) -> None:
    def forget(s: Session) -> str:
        row = owned_file(s, tenant_id, file_id)
        s.delete(row)
        return row.storage_path

    relative = await rt.db.run(forget)
    await asyncio.to_thread(_remove, rt, [relative])
    log.info("file_deleted", extra={"tenant_id": tenant_id, "file_id": file_id})


async def dataset_rows(rt: Runtime, tenant_id: str, file_id: str, field: str) -> list[Row]:
    """The rows of one of the tenant's files (a 404 naming `field` for another's or a missing one)."""
    row = await rt.db.run(lambda s: owned_file(s, tenant_id, file_id, field))
    path, suffix = rt.data_dir / row.storage_path, format_of(row.filename, field)
    try:
        return await asyncio.to_thread(lambda: parse_rows(path.read_bytes(), suffix, max_rows=MAX_ROWS, field=field))
    except FileNotFoundError:  # deleted between the lookup and the read
        raise NotFound(f"file {file_id!r} not found", field=field) from None


# ----- removal -------------------------------------------------------------------------------------
def _remove(rt: Runtime, relatives: list[str]) -> None:
    root = (rt.data_dir / FILES_DIR).resolve()
    for relative in relatives:
        path = (rt.data_dir / relative).resolve()
        if path.is_relative_to(root):  # server-made, but never trust a path twice
            path.unlink(missing_ok=True)


async def reap(rt: Runtime) -> int:
    """Expired files (rows, then bytes) and upload folders a crash left behind; how many files."""
    def forget(s: Session) -> list[str]:
        rows = list(s.scalars(select(UploadedFile).where(UploadedFile.expires_at <= utcnow()).limit(REAP_BATCH)))
        for row in rows:
            s.delete(row)
        return [row.storage_path for row in rows]

    reaped = 0
    while relatives := await rt.db.run(forget):
        await asyncio.to_thread(_remove, rt, relatives)
        reaped += len(relatives)
    await asyncio.to_thread(_sweep_staging, rt)
    return reaped


def _sweep_staging(rt: Runtime) -> None:
    cutoff = time.time() - STAGING_MAX_AGE_SECONDS
    for folder in staging_dir(rt).glob("*"):
        try:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:
            pass
