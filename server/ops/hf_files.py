"""The served base models' tokenizer and config files, as a Hugging Face repo shows them
(docs/hf-files.md): what `huggingface_hub` asks of a hub to load a tokenizer, answered from the
folder the engine loads the model from, so that a client with `HF_ENDPOINT=<server>/hf` and no
hub access gets `AutoTokenizer.from_pretrained(<base model>)` (and the SDK's `get_tokenizer()`).

Read-only, for served base models only, and only the files of `ALLOWED` (tokenizer, chat template
and config files): never weights. Disk paths are made here from the allowlist and the model's
folder; nothing a request says is ever joined to a path before it matched the allowlist.

A repo has one revision: its commit is a hash of the files it serves (names and contents), so it
is stable while they are, and changes when they do. "main" names it too.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import Forbidden, InvalidRequest, NotFound
from server.ops.text import model_folder
from server.runtime import Runtime
from workers.base_models import REPO_ID

log = logging.getLogger(__name__)

MAIN = "main"  # the one branch name clients use (huggingface_hub's default revision)
TEMPLATES_DIR = "additional_chat_templates"  # transformers lists it for extra chat templates
# Tokenizer, chat-template and config files, by exact name: what AutoTokenizer and AutoConfig read.
ALLOWED = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "tekken.json", "chat_template.jinja", "chat_template.json",
})
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one path segment: no '..', no separator
_TIKTOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.tiktoken")  # tiktoken vocabularies (top level)
# Refused with a 403 saying so (everything else that is not allowlisted is simply not in the repo).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                   ".npz", ".pkl", ".safetensors.index.json", ".bin.index.json")


@dataclass(frozen=True)
class RepoFile:
    path: str  # in the repo, e.g. "tokenizer.json" or "additional_chat_templates/tool_use.jinja"
    disk: Path  # made from the model's folder and an allowlisted path, never from a request
    size: int
    sha256: str  # the ETag
    blob_id: str  # git's blob sha1, what the hub lists as a file's oid


@dataclass(frozen=True)
class Snapshot:
    """A served base model as a hub repo: its allowlisted files and the commit they make."""

    repo_id: str
    commit: str  # 40 hex, like a git commit
    files: dict[str, RepoFile]  # by path in the repo, sorted


async def snapshot(rt: Runtime, repo_id: str) -> Snapshot:
    """The repo of a served base model, or NotFound (field repo_id) for any other name."""
    # A base model served from a folder path ("/models/x") is no repo here (huggingface_hub would
    # refuse its name anyway), and its path is not shown to callers.
    repos = [name for name in rt.engines if REPO_ID.fullmatch(name)]
    if repo_id not in repos:
        raise NotFound(f"repository {repo_id!r} is not a base model this server serves; it serves "
                       f"{', '.join(map(repr, repos)) or 'none by a hub-style name'} (and only their tokenizer "
                       "and config files)", field="repo_id")
    # Served base models are on disk already (the engine loaded them): never a download here.
    return await asyncio.to_thread(lambda: _snapshot(repo_id, model_folder(rt, repo_id)))


def check_revision(snap: Snapshot, revision: str) -> None:
    """'main' or the repo's commit; any other branch, tag or commit does not exist here."""
    if revision not in (MAIN, snap.commit):
        raise NotFound(f"revision {revision!r} not found: {snap.repo_id!r} has one revision, {MAIN!r} "
                       f"(commit {snap.commit})", field="revision")


def file_of(snap: Snapshot, filename: str) -> RepoFile:
    """A served file by its path in the repo: 400 for a path that is not a plain relative one, 403
    for weights, 404 (EntryNotFound, which transformers takes as "optional file absent") for
    anything else the repo does not serve."""
    check_relative(filename, "filename")
    if filename.lower().endswith(WEIGHT_SUFFIXES):
        raise Forbidden(f"{filename!r} is a weights file: this endpoint serves only tokenizer and config files, "
                        "never weights", field="filename")
    found = snap.files.get(filename)
    if found is None:
        why = "is not in this repository" if allowed(filename) else \
            "is not served: this endpoint serves only tokenizer and config files"
        raise NotFound(f"{filename!r} {why} ({snap.repo_id!r} serves {', '.join(snap.files)})", field="filename")
    return found


def tree(snap: Snapshot, path: str, recursive: bool) -> list[dict[str, Any]]:
    """The hub's tree listing of a folder ("": the top): files and folders, as list_repo_tree reads them."""
    if path:
        check_relative(path, "path")
        if not any(name.startswith(path + "/") for name in snap.files):
            raise NotFound(f"folder {path!r} is not in {snap.repo_id!r}", field="path")
    prefix = f"{path}/" if path else ""
    entries: list[dict[str, Any]] = []
    folders: set[str] = set()
    for name, file in snap.files.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if "/" in rest:  # in a subfolder: listed as the folder, and the file itself only when recursive
            folders.add(prefix + rest.split("/", 1)[0])
            if not recursive:
                continue
        entries.append({"type": "file", "oid": file.blob_id, "size": file.size, "path": name})
    entries += [{"type": "directory", "oid": _folder_oid(snap, folder), "size": 0, "path": folder}
                for folder in sorted(folders)]
    return entries


def model_info(snap: Snapshot) -> dict[str, Any]:
    """What `HfApi.model_info` reads: the repo's id, commit and files. Public, never gated."""
    return {
        "_id": snap.commit[:24], "id": snap.repo_id, "modelId": snap.repo_id, "sha": snap.commit,
        "private": False, "gated": False, "disabled": False, "tags": [], "library_name": "transformers",
        "siblings": [{"rfilename": name} for name in snap.files],
    }


def check_relative(path: str, field: str) -> None:
    """A plain relative path inside the repo: no absolute path, no '..' or '.', no empty segment,
    no backslash or control character (the request's own spelling, after URL decoding)."""
    segments = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or any(ord(c) < 32 or c == "\x7f" for c in path)
            or any(s in ("", ".", "..") for s in segments)):
        raise InvalidRequest(f"{path!r} must be a relative path inside the repository "
                             "(no leading '/', no '.' or '..' segments, no backslash)", field=field)


def allowed(path: str) -> bool:
    """Whether a path in the repo is one this endpoint may serve (whether or not the model has it)."""
    if path in ALLOWED or _TIKTOKEN.fullmatch(path):
        return True
    folder, _, name = path.partition("/")
    return folder == TEMPLATES_DIR and name.endswith(".jinja") and _SAFE_NAME.fullmatch(name) is not None


# ----- building a snapshot (off the event loop) ---------------------------------------------------
def _snapshot(repo_id: str, folder: Path) -> Snapshot:
    files = {}
    for path in _candidates(folder):
        disk = folder.joinpath(*path.split("/"))
        try:
            stat = disk.stat()  # follows symlinks: an HF cache snapshot's files link to its blobs
        except OSError:
            continue
        if disk.is_file():
            sha256, blob_id = _hashes(disk, stat.st_size, stat.st_mtime_ns)
            files[path] = RepoFile(path, disk, stat.st_size, sha256, blob_id)
    manifest = "".join(f"{path}\0{file.sha256}\n" for path, file in sorted(files.items()))
    commit = hashlib.sha1(manifest.encode(), usedforsecurity=False).hexdigest()
    return Snapshot(repo_id, commit, dict(sorted(files.items())))


def _candidates(folder: Path) -> list[str]:
    """The allowlisted paths that may be in the folder: the fixed names, its tiktoken files and its
    extra chat templates (names listed from the folder, each checked against the allowlist)."""
    found = list(ALLOWED)
    try:
        found += [p.name for p in folder.glob("*.tiktoken") if _TIKTOKEN.fullmatch(p.name)]
        found += [f"{TEMPLATES_DIR}/{p.name}" for p in (folder / TEMPLATES_DIR).glob("*.jinja")]
    except OSError:
        pass
    return [path for path in found if allowed(path)]


@functools.lru_cache(maxsize=256)
def _hashes(disk: Path, size: int, mtime_ns: int) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, cached while its size and mtime stay."""
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(disk, "rb") as handle:
        while chunk := handle.read(1 << 20):
            sha256.update(chunk)
            blob.update(chunk)
    return sha256.hexdigest(), blob.hexdigest()


def _folder_oid(snap: Snapshot, folder: str) -> str:
    listing = "".join(f"{name}\0{file.blob_id}\n" for name, file in snap.files.items() if name.startswith(folder + "/"))
    return hashlib.sha1(listing.encode(), usedforsecurity=False).hexdigest()
