"""Checkpoints as objects a client manages: lookup by tinker path, delete, publish, TTL, weights
info, signed download links, and copies.

Who sees a checkpoint: its tenant, and (once published) every tenant; nobody once it has expired.
Everything else is "not found", exactly like a checkpoint that never existed. Only the owner can
change a checkpoint, published or not."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas import tinker as api
from server import ids
from server.errors import InvalidRequest, NotFound
from server.ops import signing
from server.ops.sessions import live_session
from server.runtime import Runtime
from server.store.tables import Checkpoint, Model, SamplingSession, utcnow
from server.store.tables import Session as SessionRow

log = logging.getLogger(__name__)

TTL_MIN_SECONDS = 1  # the hosted service asks for >= 3600; a local server has no reason to
TTL_MAX_SECONDS = api.TTL_MAX_SECONDS
CHECKPOINT_ID_HELP = "expected '<weights|sampler_weights|external_weights>/<name>', e.g. 'weights/step-100'"


# ----- lookups -----------------------------------------------------------------------------------
def new_checkpoint_ref(tenant_id: str) -> tuple[str, str]:
    """(checkpoint id, storage reference: its folder relative to the data dir), made from ids
    only, never from anything a client sent."""
    checkpoint_id = ids.new_id("ckpt")
    return checkpoint_id, f"checkpoints/{tenant_id}/{checkpoint_id}"


def path_of(row: Checkpoint) -> ids.TinkerPath:
    return ids.TinkerPath(row.model_id, row.kind, row.name)


def is_expired(row: Checkpoint, now: datetime | None = None) -> bool:
    return row.expires_at is not None and row.expires_at <= (now or utcnow())


def readable_by(row: Checkpoint, tenant_id: str, now: datetime | None = None) -> bool:
    """The owner reads its own checkpoints (ephemeral ones too); others read published named ones."""
    if is_expired(row, now):
        return False
    return row.tenant_id == tenant_id or (row.public and not row.ephemeral)


def _by_name(s: Session, model_id: str, kind: str, name: str) -> Checkpoint | None:
    # (model_id, kind, name) is unique across tenants; the caller decides who may see the row.
    return s.scalar(select(Checkpoint).where(Checkpoint.model_id == model_id, Checkpoint.kind == kind, Checkpoint.name == name))


def resolve_checkpoint(s: Session, tenant_id: str, path: str, *, field: str = "path") -> Checkpoint:
    """The checkpoint a tinker:// path names, if the tenant may read it (own or published, not
    expired). InvalidRequest for a malformed path, NotFound otherwise; both name `field`."""
    parsed = ids.parse_tinker_path(path, field=field)
    row = _by_name(s, parsed.model_id, parsed.kind, parsed.name)
    if row is None or not readable_by(row, tenant_id):
        raise NotFound(f"checkpoint {path} not found", field=field)
    return row


def parse_checkpoint_id(checkpoint_id: str, *, field: str = "checkpoint_id") -> tuple[str, str]:
    """'weights/step-1' -> ('training', 'step-1')."""
    segment, sep, name = checkpoint_id.partition("/")
    if not sep or not name or "/" in name or segment not in ids.SEGMENT_TO_KIND:
        raise InvalidRequest(f"malformed checkpoint_id {checkpoint_id!r}: {CHECKPOINT_ID_HELP}", field=field)
    return ids.SEGMENT_TO_KIND[segment], name


def owned_checkpoint(s: Session, tenant_id: str, model_id: str, checkpoint_id: str) -> Checkpoint:
    """A checkpoint the tenant may change: its own, listed (named, unexpired)."""
    kind, name = parse_checkpoint_id(checkpoint_id)
    row = _by_name(s, model_id, kind, name)
    if row is None or row.tenant_id != tenant_id or row.ephemeral or is_expired(row):
        raise NotFound(f"checkpoint {checkpoint_id!r} of training run {model_id!r} not found", field="checkpoint_id")
    return row


# ----- TTL ---------------------------------------------------------------------------------------
def check_ttl(ttl_seconds: int | None, *, field: str = "ttl_seconds") -> None:
    if ttl_seconds is not None and not TTL_MIN_SECONDS <= ttl_seconds <= TTL_MAX_SECONDS:
        raise InvalidRequest(
            f"ttl_seconds must be between {TTL_MIN_SECONDS} and {TTL_MAX_SECONDS} (10 years), or null for "
            f"no expiry; got {ttl_seconds}",
            field=field,
        )


def expiry(ttl_seconds: int | None) -> datetime | None:
    return None if ttl_seconds is None else utcnow() + timedelta(seconds=ttl_seconds)


async def set_ttl(rt: Runtime, tenant_id: str, model_id: str, checkpoint_id: str, ttl_seconds: int | None) -> None:
    check_ttl(ttl_seconds)

    def update(s: Session) -> None:
        owned_checkpoint(s, tenant_id, model_id, checkpoint_id).expires_at = expiry(ttl_seconds)

    await rt.db.run(update)
    log.info("checkpoint_ttl_set", extra={"model_id": model_id, "checkpoint": checkpoint_id, "ttl_seconds": ttl_seconds})


# ----- publish -----------------------------------------------------------------------------------
async def set_public(rt: Runtime, tenant_id: str, model_id: str, checkpoint_id: str, public: bool) -> None:
    """Idempotent: publishing a published checkpoint succeeds (the SDK would retry a 409 ten times)."""

    def update(s: Session) -> None:
        owned_checkpoint(s, tenant_id, model_id, checkpoint_id).public = public

    await rt.db.run(update)
    log.info("checkpoint_published" if public else "checkpoint_unpublished", extra={"model_id": model_id, "checkpoint": checkpoint_id})


# ----- delete (and the reaper's removal) ---------------------------------------------------------
def forget(s: Session, rows: Iterable[Checkpoint]) -> list[str]:
    """Delete checkpoint rows; return their folders (relative to the data dir: each one's own,
    then its merged exports') for removal after the commit. Sampling sessions that sampled with
    one keep its path and lose the row, so their next sample reports the checkpoint as not found
    instead of silently using the base model."""
    rows = list(rows)
    if not rows:
        return []
    by_id = {row.id: row for row in rows}
    for sampler in s.scalars(select(SamplingSession).where(SamplingSession.checkpoint_id.in_(list(by_id)))):
        sampler.model_path = sampler.model_path or str(path_of(by_id[sampler.checkpoint_id]))
        sampler.checkpoint_id = None
    s.flush()
    for row in rows:
        s.delete(row)
    return [row.storage_dir for row in rows] + [(MERGED_DIR / row.id).as_posix() for row in rows]


async def remove_folders(rt: Runtime, relatives: Iterable[str]) -> None:
    roots = [rt.data_dir / "checkpoints", rt.data_dir / MERGED_DIR]

    def remove() -> None:
        for relative in relatives:
            folder = (rt.data_dir / relative).resolve()
            if any(folder.is_relative_to(root) for root in roots):  # server-made, but never trust a path twice
                shutil.rmtree(folder, ignore_errors=True)

    await asyncio.to_thread(remove)


async def delete_checkpoint(rt: Runtime, tenant_id: str, model_id: str, checkpoint_id: str) -> None:
    folders = await rt.db.run(lambda s: forget(s, [owned_checkpoint(s, tenant_id, model_id, checkpoint_id)]))
    await remove_folders(rt, folders)
    log.info("checkpoint_deleted", extra={"model_id": model_id, "checkpoint": checkpoint_id, "tenant_id": tenant_id})


# ----- weights info ------------------------------------------------------------------------------
async def weights_info(rt: Runtime, tenant_id: str, tinker_path: str) -> api.WeightsInfoResponse:
    def read(s: Session) -> api.WeightsInfoResponse:
        row = resolve_checkpoint(s, tenant_id, tinker_path, field="tinker_path")
        model = s.get(Model, row.model_id)
        spec = model.lora_spec or {}
        return api.WeightsInfoResponse(
            base_model=model.base_model,
            is_lora=True,
            lora_rank=model.lora_rank,
            train_unembed=spec.get("train_unembed"),
            train_mlp=spec.get("train_mlp"),
            train_attn=spec.get("train_attn"),
        )

    return await rt.db.run(read)


# ----- signed downloads --------------------------------------------------------------------------
TRACES_DIR = Path("exports") / "traces"  # under the data dir
ARCHIVES_DIR = Path("exports") / "archives"  # tar files of checkpoints, made for download links
MERGED_DIR = Path("exports") / "merged"  # merged models of checkpoints (ops/export.py), removed with them


def link_expiry(rt: Runtime) -> int:
    return int(utcnow().timestamp()) + rt.settings.signed_url_ttl_seconds


async def download_urls(
    rt: Runtime, tenant_id: str, model_id: str, checkpoint_id: str, base_url: str
) -> api.ExternalWeightsUrlsResponse:
    """Signed URLs for every file of a checkpoint the tenant may read. `base_url` is where the
    download route lives. Served for every kind (the SDK itself asks only for external_weights/)."""
    kind, name = parse_checkpoint_id(checkpoint_id)
    path = str(ids.TinkerPath(model_id, kind, name))
    row = await rt.db.run(lambda s: resolve_checkpoint(s, tenant_id, path, field="checkpoint_id"))
    folder = rt.data_dir / row.storage_dir
    files = await asyncio.to_thread(lambda: sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()))
    expires = link_expiry(rt)
    secret = signing.secret_for(rt.data_dir)
    urls = {f: signing.signed_url(secret, base_url, f"checkpoints/{row.id}/{f}", expires) for f in files}
    return api.ExternalWeightsUrlsResponse(urls=urls, expires=datetime.fromtimestamp(expires, tz=UTC))


async def archive_url(
    rt: Runtime, tenant_id: str, model_id: str, checkpoint_id: str, base_url: str
) -> api.CheckpointArchiveUrlResponse:
    """A signed link to a tar of a checkpoint the tenant may read (older SDKs download checkpoints
    this way). The tar is made once per checkpoint version and removed by the reaper with its links."""
    kind, name = parse_checkpoint_id(checkpoint_id)
    path = str(ids.TinkerPath(model_id, kind, name))
    row = await rt.db.run(lambda s: resolve_checkpoint(s, tenant_id, path, field="checkpoint_id"))
    folder = rt.data_dir / row.storage_dir
    relative = f"{row.id}/{folder.name}.tar"  # the folder name changes when the checkpoint is overwritten
    target = rt.data_dir / ARCHIVES_DIR / relative
    if not target.exists():
        await asyncio.to_thread(_write_tar, folder, target)
    expires = link_expiry(rt)
    url = signing.signed_url(signing.secret_for(rt.data_dir), base_url, f"archives/{relative}", expires)
    return api.CheckpointArchiveUrlResponse(url=url, expires=datetime.fromtimestamp(expires, tz=UTC))


def _write_tar(folder: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}")
    with tarfile.open(tmp, "w") as tar:
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.add(file, arcname=file.name)
    os.replace(tmp, target)


async def signed_file(rt: Runtime, object_path: str, expires: int, signature: str) -> Path:
    """The file a signed link names. SignatureRejected for a bad or expired link; NotFound when the
    object is gone (a deleted or expired checkpoint)."""
    signing.verify(signing.secret_for(rt.data_dir), object_path, expires, signature)
    gone = NotFound("the file behind this download link no longer exists")
    kind, _, rest = object_path.partition("/")
    if kind in ("checkpoints", "archives", "merged"):
        checkpoint_id, _, relative = rest.partition("/")
        row = await rt.db.run(lambda s: s.get(Checkpoint, checkpoint_id))
        if row is None or is_expired(row) or not relative:
            raise gone
        derived = {"archives": ARCHIVES_DIR, "merged": MERGED_DIR}
        root = rt.data_dir / (row.storage_dir if kind == "checkpoints" else derived[kind] / checkpoint_id)
    elif kind == "traces":
        root, relative = rt.data_dir / TRACES_DIR, rest
    else:
        raise gone
    root = root.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise gone
    return target


# ----- copies ------------------------------------------------------------------------------------
def _copy_session_id(tenant_id: str, idempotency_key: str | None) -> str:
    """A retried copy (same X-Idempotency-Key) lands in the same session, so it finds its first copy."""
    if not idempotency_key:
        return ids.new_id("sess")
    return "sess-copy-" + hashlib.sha256(f"{tenant_id}\n{idempotency_key}".encode()).hexdigest()[:24]


def _link_tree(source: Path, dest: Path) -> None:
    """Hard-link source's files into a new folder (bytes shared, lifetimes independent), built
    under a temp name and renamed into place; copies where links cannot be made."""
    if not source.is_dir():
        raise NotFound("the source checkpoint's files are gone (deleted meanwhile?)", field="source_path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        for path in sorted(source.rglob("*")):
            target = tmp / path.relative_to(source)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        tmp.mkdir(exist_ok=True)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _existing_copy(s: Session, tenant_id: str, model_id: str, source: str, seq: int, session_id: str) -> str | None:
    """The path of an earlier identical copy into model_id (a retry), None if the slot is free."""
    model = s.get(Model, model_id)
    if model is None:
        return None
    if model.tenant_id == tenant_id and model.copied_from == source:
        row = s.scalar(select(Checkpoint).where(Checkpoint.model_id == model_id))
        if row is not None:
            return str(path_of(row))
    raise InvalidRequest(f"model_seq_id {seq} of session {session_id} is already used", field="model_seq_id")


async def copy_weights(
    rt: Runtime, tenant_id: str, req: api.CopyWeightsRequest, idempotency_key: str | None = None
) -> api.CopyWeightsResponse:
    """Copy a readable checkpoint (own or published) into a new training run of the caller: in a
    new session placed in destination_project_id, or at (session_id, model_seq_id) of one of the
    caller's live sessions. The run holds only the copy (same kind and name) and is not trainable."""
    check_ttl(req.ttl_seconds)
    if (req.session_id is None) != (req.model_seq_id is None):
        missing = "model_seq_id" if req.model_seq_id is None else "session_id"
        raise InvalidRequest("session_id and model_seq_id go together: send both, or neither", field=missing)
    if req.session_id is None and req.destination_project_id is None:
        raise InvalidRequest(
            "say where the copy goes: destination_project_id, or session_id and model_seq_id",
            field="destination_project_id",
        )
    new_session = req.session_id is None
    session_id = _copy_session_id(tenant_id, idempotency_key) if new_session else req.session_id
    seq = 0 if new_session else req.model_seq_id
    model_id = ids.model_id(session_id, seq)

    def plan(s: Session) -> tuple[Checkpoint, Model, str | None]:
        source = resolve_checkpoint(s, tenant_id, req.source_path, field="source_path")
        if not new_session:
            live_session(s, tenant_id, session_id)
        done = _existing_copy(s, tenant_id, model_id, str(path_of(source)), seq, session_id)
        return source, s.get(Model, source.model_id), done

    source, source_model, done = await rt.db.run(plan)
    if done is not None:
        return api.CopyWeightsResponse(tinker_path=done)

    checkpoint_id, relative = new_checkpoint_ref(tenant_id)
    await asyncio.to_thread(_link_tree, rt.data_dir / source.storage_dir, rt.data_dir / relative)
    copy_path = ids.TinkerPath(model_id, source.kind, source.name)

    def record(s: Session) -> None:
        now = utcnow()
        if new_session:
            s.add(SessionRow(
                id=session_id, tenant_id=tenant_id, tags=["copy_weights"], user_metadata={},
                project_id=req.destination_project_id, created_at=now, last_heartbeat_at=now,
                finished_at=now, finish_reason="success",
            ))
            s.flush()
        s.add(Model(
            id=model_id, tenant_id=tenant_id, session_id=session_id, model_seq_id=seq,
            base_model=source_model.base_model, lora_rank=source_model.lora_rank,
            lora_spec=dict(source_model.lora_spec or {}), user_metadata={}, copied_from=str(path_of(source)),
        ))
        s.flush()
        s.add(Checkpoint(
            id=checkpoint_id, tenant_id=tenant_id, model_id=model_id, kind=source.kind, name=source.name,
            storage_dir=relative, size_bytes=source.size_bytes, has_optimizer=source.has_optimizer,
            ephemeral=False, public=False, user_metadata=dict(source.user_metadata or {}),
            expires_at=expiry(req.ttl_seconds), created_at=now,
        ))

    try:
        await rt.db.run(record)
    except IntegrityError:  # the same copy, retried concurrently, got there first
        await remove_folders(rt, [relative])
        _, _, done = await rt.db.run(plan)
        if done is None:
            raise
        return api.CopyWeightsResponse(tinker_path=done)
    log.info("checkpoint_copied", extra={"source": str(path_of(source)), "copy": str(copy_path), "tenant_id": tenant_id})
    return api.CopyWeightsResponse(tinker_path=str(copy_path))
