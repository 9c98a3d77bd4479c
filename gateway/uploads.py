"""A multipart/form-data upload, parsed as it streams in (python-multipart): its one file part goes
straight to a private staging folder on disk, its other parts are small text fields. The bytes
received are counted as they arrive, chunked bodies too, and the upload is refused with a 413 the
moment they pass the limit, so no upload costs more memory than a chunk or more disk than the
limit. Parsing runs in a worker thread: a large upload does not hold the event loop.

The caller authenticates first (FastAPI resolves the route's dependencies before its body runs,
and this module reads the body only when called), and removes `Upload.folder` when done.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart import FormParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import Field, File, parse_options_header
from starlette.requests import ClientDisconnect, Request

from server.errors import InvalidRequest, TooLarge

MAX_FIELDS = 16
MAX_FIELD_BYTES = 4096
FORM = "multipart/form-data"


@dataclass
class Upload:
    folder: Path  # the staging folder of this upload; the caller removes it
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, File] = field(default_factory=dict)  # by form field name

    def file(self, name: str) -> tuple[Path, str, int]:
        """(path on disk, the client's file name, size) of the file part `name`, or a 400."""
        part = self.files.get(name)
        if part is None:
            raise InvalidRequest(f"send the file as a multipart/form-data part named {name!r}", field=name)
        part.flush_to_disk()
        part.close()
        filename = (part.file_name or b"").decode("utf-8", "replace")
        return Path(part.actual_file_name.decode()), filename, part.size  # type: ignore[union-attr]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


async def receive(request: Request, staging: Path, max_bytes: int, limit: str, file_field: str = "file") -> Upload:
    """Parse the request's multipart body into a new folder under `staging`; a 400 for a body that
    is not multipart or breaks it, a 413 once more than `max_bytes` have arrived (`limit` says
    which limit that is, for the message)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type.decode() != FORM or not options.get(b"boundary"):
        raise InvalidRequest(f"send the file as {FORM} (with a boundary)", field=file_field)
    folder = staging / secrets.token_hex(8)
    folder.mkdir(parents=True)
    upload = Upload(folder)
    try:
        await _parse(request, upload, options[b"boundary"], max_bytes, limit, file_field)
    except BaseException:
        upload.remove()
        raise
    return upload


async def _parse(request: Request, upload: Upload, boundary: bytes, max_bytes: int, limit: str,
                 file_field: str) -> None:
    def on_field(part: Field) -> None:
        if len(upload.fields) >= MAX_FIELDS:
            raise InvalidRequest(f"more than {MAX_FIELDS} form fields", field="body")
        name, value = (part.field_name or b"").decode("utf-8", "replace"), part.value or b""
        if len(value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"longer than {MAX_FIELD_BYTES} bytes", field=name)
        upload.fields[name] = value.decode("utf-8", "replace")

    def on_file(part: File) -> None:
        name = (part.field_name or b"").decode("utf-8", "replace")
        if upload.files:
            raise InvalidRequest(f"send exactly one file, in the part named {file_field!r}", field=name)
        upload.files[name] = part

    config = {"UPLOAD_DIR": str(upload.folder), "UPLOAD_DELETE_TMP": False, "MAX_MEMORY_FILE_SIZE": 1 << 20}
    parser = FormParser(FORM, on_field, on_file, boundary=boundary, config=config)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise TooLarge(f"the upload is larger than {limit}", field=file_field)
            if chunk:
                await asyncio.to_thread(parser.write, chunk)
        await asyncio.to_thread(parser.finalize)
    except MultipartParseError as exc:
        raise InvalidRequest(f"not a well-formed multipart body ({exc})", field="body") from None
    except ClientDisconnect:
        raise InvalidRequest("the client went away before the upload ended", field="body") from None
