"""OpenAI's Files API, mounted at /v1 and /api/v1: upload a dataset file (`openai` client's
`files.create`), list, look up, download and delete the tenant's files. The native API's Dataset
reads an uploaded file by its id (`DatasetMeta(dataset_id="file-…")`). Keys go in
`Authorization: Bearer`, checked before the body is read; errors leave in OpenAI's shape. The
logic is server/ops/files.py; the streaming multipart parse is gateway/uploads.py."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from gateway import uploads
from gateway.deps import BearerTenantId, Rt
from gateway.errors import OpenAIRoute
from schemas import openai as oa
from server.errors import InvalidRequest, TooLarge
from server.ops import files
from server.store.tables import UploadedFile

router = APIRouter(route_class=OpenAIRoute)

FORM_OVERHEAD = 64 << 10  # a multipart body's boundaries, part headers and small fields
FORM_FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file", "purpose"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "a dataset: *.jsonl, *.json or *.csv"},
                "purpose": {"type": "string", "enum": list(files.PURPOSES)},
                "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                "expires_after[seconds]": {"type": "integer", "minimum": files.EXPIRY_SECONDS[0],
                                           "maximum": files.EXPIRY_SECONDS[1]},
            },
        }}},
    }
}


def file_object(row: UploadedFile) -> oa.FileObject:
    return oa.FileObject(id=row.id, bytes=row.size_bytes, created_at=int(row.created_at.timestamp()),
                         expires_at=int(row.expires_at.timestamp()) if row.expires_at else None,
                         filename=row.filename, purpose=row.purpose)


@router.post("/files", openapi_extra=UPLOAD_SCHEMA, response_model=oa.FileObject)
async def upload_file(request: Request, rt: Rt, tenant: BearerTenantId) -> JSONResponse:
    room, limit = await files.upload_room(rt, tenant)
    upload = await uploads.receive(request, files.staging_dir(rt), room + FORM_OVERHEAD, limit)
    try:
        for name in upload.fields:
            if name not in FORM_FIELDS:
                raise InvalidRequest(f"unknown form field; the fields are: file, {', '.join(FORM_FIELDS)}", field=name)
        path, filename, size = upload.file("file")
        if size > room:
            raise TooLarge(f"the file's {size} bytes are more than {limit}", field="file")
        purpose = files.check_purpose(upload.fields.get("purpose"))
        expiry = files.check_expiry(upload.fields.get("expires_after[anchor]"),
                                    upload.fields.get("expires_after[seconds]"))
        row = await files.store(rt, tenant, path, filename, purpose, expiry)
    finally:
        upload.remove()
    return JSONResponse(oa.dump(file_object(row)))


@router.get("/files", response_model=oa.FileList)
async def list_files(
    rt: Rt,
    tenant: BearerTenantId,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=64)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    rows, more = await files.listing(rt, tenant, purpose=purpose, limit=limit, after=after,
                                     descending=order == "desc")
    page = oa.FileList(data=[file_object(r) for r in rows], first_id=rows[0].id if rows else None,
                       last_id=rows[-1].id if rows else None, has_more=more)
    return JSONResponse(oa.dump(page))


@router.get("/files/{file_id}", response_model=oa.FileObject)
async def get_file(file_id: str, rt: Rt, tenant: BearerTenantId) -> JSONResponse:
    return JSONResponse(oa.dump(file_object(await files.get(rt, tenant, file_id))))


@router.get("/files/{file_id}/content", response_class=FileResponse)
async def file_content(file_id: str, rt: Rt, tenant: BearerTenantId) -> FileResponse:
    row = await files.get(rt, tenant, file_id)
    return FileResponse(rt.data_dir / row.storage_path, media_type="application/octet-stream",
                        filename=row.filename)


@router.delete("/files/{file_id}", response_model=oa.FileDeleted)
async def delete_file(file_id: str, rt: Rt, tenant: BearerTenantId) -> JSONResponse:
    await files.delete(rt, tenant, file_id)
    return JSONResponse(oa.dump(oa.FileDeleted(id=file_id)))
