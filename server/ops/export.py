"""Exports of a checkpoint as folders other tools load, handed out as signed download links.

* `peft`: the adapter as peft (and vLLM) load it: adapter_config.json and adapter_model.safetensors,
  straight from the checkpoint (no optimizer state, no twinkle.json).
* `merged`: a full Hugging Face model folder (config, float32 weights, generation config, the
  base model's tokenizer files) with the LoRA merged into a fresh float32 copy of the base
  weights; `AutoModelForCausalLM.from_pretrained(folder)` computes what the adapter computes.

A merged folder is built once per checkpoint version (an overwrite makes a new version), in
`<data dir>/exports/merged/<checkpoint id>/<storage folder name>/`: under a temp name renamed into
place, in a worker thread, one build at a time per process (each holds a whole base model in
float32). It goes with its checkpoint (checkpoints.forget), and an older version of the same
checkpoint goes when a newer one is built.

Who may export: as for downloads, the owner, and every tenant once the checkpoint is published;
anyone else gets "not found". Encrypted checkpoints (files ending .age) cannot be read here.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import weakref
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.orm import Session

from schemas import twinkle as tw
from server import ids
from server.errors import InvalidRequest, NotFound
from server.ops import signing
from server.ops.checkpoints import MERGED_DIR, link_expiry, parse_checkpoint_id, resolve_checkpoint
from server.ops.text import model_folder
from server.runtime import Runtime
from server.store.tables import Checkpoint, Model
from workers.adapter_files import CONFIG_FILE, WEIGHTS_FILE, atomic_dir
from workers.merge import merge_adapter

log = logging.getLogger(__name__)
FORMATS = ("peft", "merged")
PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
ENCRYPTED_SUFFIX = ".age"
# What a merged folder takes from the base model's folder besides its weights and config: the
# tokenizer, its chat template and special tokens, copied as they are.
NOT_TOKENIZER = ("config.json", "generation_config.json", "README.md")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
_build_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


async def export_urls(
    rt: Runtime, tenant_id: str, model_id: str, checkpoint_id: str, fmt: str, base_url: str
) -> tw.ExportResponse:
    """Signed links to the files of a readable checkpoint's export. `base_url`: the download route."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}", field="format")
    row, base = await _readable(rt, tenant_id, model_id, checkpoint_id)
    folder = rt.data_dir / row.storage_dir
    names = await asyncio.to_thread(_file_names, folder)
    if any(name.endswith(ENCRYPTED_SUFFIX) for name in names):
        raise InvalidRequest(
            "this checkpoint is encrypted (age): the server cannot read it to export or merge it; download its "
            "files (external_weights_urls), decrypt them, and merge them where the key is",
            field="checkpoint_id",
        )
    if fmt == "peft":
        objects = {name: f"checkpoints/{row.id}/{name}" for name in PEFT_FILES if name in names}
    else:
        merged = await merged_folder(rt, row, rt.served(base, field="checkpoint_id"))
        version = merged.name
        objects = {name: f"merged/{row.id}/{version}/{name}" for name in await asyncio.to_thread(_file_names, merged)}
    expires = link_expiry(rt)
    secret = signing.secret_for(rt.data_dir)
    files = {name: signing.signed_url(secret, base_url, path, expires) for name, path in objects.items()}
    return tw.ExportResponse(format=fmt, files=files, expires=datetime.fromtimestamp(expires, tz=UTC))


async def _readable(rt: Runtime, tenant_id: str, model_id: str, checkpoint_id: str) -> tuple[Checkpoint, str]:
    """The checkpoint (own or published, unexpired) and the base model it was trained on."""
    kind, name = parse_checkpoint_id(checkpoint_id)
    path = str(ids.TinkerPath(model_id, kind, name))

    def read(s: Session) -> tuple[Checkpoint, str]:
        row = resolve_checkpoint(s, tenant_id, path, field="checkpoint_id")
        return row, s.get(Model, row.model_id).base_model

    return await rt.db.run(read)


def _file_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise NotFound("the checkpoint's files are gone (deleted meanwhile?)", field="checkpoint_id")
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# ----- merged folders ----------------------------------------------------------------------------
async def merged_folder(rt: Runtime, row: Checkpoint, base: str) -> Path:
    """The merged folder of this checkpoint version, built if it is not there yet."""
    dest = rt.data_dir / MERGED_DIR / row.id / Path(row.storage_dir).name
    if dest.is_dir():
        return dest
    async with _build_lock():
        if not dest.is_dir():
            model_dir = await asyncio.to_thread(model_folder, rt, base)
            await asyncio.to_thread(build_merged, model_dir, rt.data_dir / row.storage_dir, dest)
            log.info("checkpoint_merged", extra={"checkpoint": row.id, "base_model": base})
    if await rt.db.run(lambda s: s.get(Checkpoint, row.id)) is None:  # deleted while it was built
        await asyncio.to_thread(shutil.rmtree, dest.parent, True)
        raise NotFound("the checkpoint was deleted while it was being exported", field="checkpoint_id")
    return dest


def _build_lock() -> asyncio.Lock:
    # One per event loop: an asyncio.Lock belongs to the loop that first waits on it.
    loop = asyncio.get_running_loop()
    if loop not in _build_locks:
        _build_locks[loop] = asyncio.Lock()
    return _build_locks[loop]


def build_merged(model_dir: Path, adapter_dir: Path, dest: Path) -> None:
    """Write the merged model of an adapter folder into `dest` (atomically); remove the older
    versions next to it."""
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        raise NotFound("the checkpoint's files are gone (deleted meanwhile?)", field="checkpoint_id")
    with atomic_dir(dest) as tmp:
        merge_adapter(model_dir, adapter_dir).save_pretrained(tmp)
        for source in model_dir.iterdir():
            if _is_tokenizer_file(source):
                shutil.copyfile(source, tmp / source.name)
    for sibling in dest.parent.iterdir():
        if sibling.name != dest.name:
            shutil.rmtree(sibling, ignore_errors=True)


def _is_tokenizer_file(path: Path) -> bool:
    name = path.name
    return path.is_file() and not name.startswith(".") and name not in NOT_TOKENIZER and not name.endswith(WEIGHT_SUFFIXES)
