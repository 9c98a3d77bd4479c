"""A Hugging Face-compatible file endpoint for the served base models' tokenizer and config files
(mounted at /hf; docs/hf-files.md). With `HF_ENDPOINT=<server>/hf`, huggingface_hub (and so
transformers' `from_pretrained` and the SDK's `get_tokenizer()`) fetches them from here:

- `HEAD|GET /{repo_id}/resolve/{revision}/{filename}`: a file, with the headers hf_hub_download
  reads (X-Repo-Commit, ETag, Content-Length);
- `GET /api/models/{repo_id}[/revision/{revision}]`: model_info (transformers resolves "main" to its `sha`);
- `GET /api/models/{repo_id}/tree/{revision}[/{path}]`: list_repo_tree / list_repo_files.

Open (no key): it serves no tenant's data, only what a public hub repo of the base model would,
and HF clients do not send our key. Routes with no tenant dependency, so GuardedRoute reads no key
and BodyGuard still applies. Refusals carry X-Error-Code, which huggingface_hub turns into its own
exceptions (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from gateway.deps import Rt
from gateway.errors import STATUS, error_body, shaped_route
from server.errors import TwinkleError
from server.ops import hf_files
from server.runtime import Runtime

log = logging.getLogger(__name__)

# The hub's X-Error-Code for a refusal, by the request field at fault. A refused weights file is a 403
# with EntryNotFound: huggingface_hub then raises EntryNotFoundError (with our message), where a bare
# 403 would reach its user as "check your connection"; transformers takes it as a file not there.
HUB_CODES = {"repo_id": "RepoNotFound", "revision": "RevisionNotFound", "filename": "EntryNotFound",
             "path": "EntryNotFound"}


def hub_error(exc: TwinkleError, request: Request, commit: str | None = None) -> JSONResponse:
    """Our JSON error body, plus the headers huggingface_hub reads to pick its exception and message;
    `commit` (when the repo and revision exist) lets it cache "this file is not there"."""
    if exc.kind in ("forbidden", "invalid"):  # weights asked for, or a path out of the repo: worth a line
        log.info("hf_file_refused", extra={"path": request.url.path, "field": exc.field, "method": request.method})
    headers = {"X-Error-Message": _header_safe(exc.message)}
    if exc.kind in ("not_found", "forbidden") and exc.field in HUB_CODES:
        headers["X-Error-Code"] = HUB_CODES[exc.field]
    if commit is not None:
        headers["X-Repo-Commit"] = commit
    return JSONResponse(error_body(exc.message, category=exc.category, field=exc.field), STATUS[exc.kind], headers)


def _header_safe(text: str) -> str:
    # A header value is latin-1 without line breaks; the message quotes the request's own path.
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:500]


HubRoute = shaped_route(hub_error, "A GuardedRoute whose refusals carry the hub's error headers.", catch=TwinkleError)


router = APIRouter(route_class=HubRoute, tags=["hf files"])


# The API routes come first: `{repo_id:path}` would otherwise take "tree/main" as part of a repo id.
@router.get("/api/models/{repo_id:path}/tree/{revision}")
async def tree_top(repo_id: str, revision: str, rt: Rt, recursive: bool = False) -> list[dict]:
    return await _tree(rt, repo_id, revision, "", recursive)


@router.get("/api/models/{repo_id:path}/tree/{revision}/{path:path}")
async def tree_folder(repo_id: str, revision: str, path: str, rt: Rt, recursive: bool = False) -> list[dict]:
    return await _tree(rt, repo_id, revision, path, recursive)


@router.get("/api/models/{repo_id:path}/revision/{revision}")
async def model_info_at(repo_id: str, revision: str, rt: Rt) -> dict:
    snap = await hf_files.snapshot(rt, repo_id)
    hf_files.check_revision(snap, revision)
    return hf_files.model_info(snap)


@router.get("/api/models/{repo_id:path}")
async def model_info(repo_id: str, rt: Rt) -> dict:
    return hf_files.model_info(await hf_files.snapshot(rt, repo_id))


# HEAD (what hf_hub_download asks first) is GET without the body: not described separately in the schema.
@router.head("/{repo_id:path}/resolve/{revision}/{filename:path}", include_in_schema=False)
@router.get("/{repo_id:path}/resolve/{revision}/{filename:path}", response_class=FileResponse)
async def resolve(repo_id: str, revision: str, filename: str, rt: Rt, request: Request) -> Response:
    snap = await hf_files.snapshot(rt, repo_id)
    hf_files.check_revision(snap, revision)
    try:
        file = hf_files.file_of(snap, filename)
    except TwinkleError as exc:
        return hub_error(exc, request, commit=snap.commit)
    if request.method == "GET":
        log.info("hf_file_served", extra={"repo_id": repo_id, "file": filename, "bytes": file.size})
    # X-Repo-Commit: where hf_hub_download files it in its cache; ETag: the blob's name there.
    headers = {"X-Repo-Commit": snap.commit, "ETag": f'"{file.sha256}"', "Cache-Control": "no-cache"}
    return FileResponse(file.disk, headers=headers)


async def _tree(rt: Runtime, repo_id: str, revision: str, path: str, recursive: bool) -> list[dict]:
    snap = await hf_files.snapshot(rt, repo_id)
    hf_files.check_revision(snap, revision)
    return hf_files.tree(snap, path, recursive)
