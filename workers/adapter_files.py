"""On-disk format of an adapter checkpoint, written atomically.

A checkpoint is a folder that plain peft (and vLLM) can load as it is:
  adapter_model.safetensors   LoRA tensors, peft's key names (no adapter name in them)
  adapter_config.json         peft's LoraConfig
  optimizer.safetensors       optional: AdamW moments and step per tensor, keyed like the weights
  twinkle.json                our metadata: format version, base model, LoRA spec, has_optimizer
The folder is built under a temporary name next to its destination and renamed into place, so a
folder that exists under its final name is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workers import failpoints
from workers.types import LoraSpec

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "twinkle.json"
FORMAT_VERSION = 1


class CheckpointFormatError(ValueError):
    """The folder is not a checkpoint this server wrote (or it is damaged)."""


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a fresh temp folder; on success rename it to `dest`, on failure remove it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir_files(tmp)
        failpoints.hit("checkpoint.before_rename")
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def write_meta(folder: Path, *, base_model: str, spec: LoraSpec, has_optimizer: bool) -> None:
    meta = {
        "format": FORMAT_VERSION,
        "base_model": base_model,
        "lora": asdict(spec),
        "has_optimizer": has_optimizer,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META_FILE).read_text())
        LoraSpec(**meta["lora"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointFormatError(f"checkpoint metadata unreadable: {exc}") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointFormatError(f"unknown checkpoint format {meta.get('format')!r}")
    return meta


def read_spec(folder: Path) -> LoraSpec:
    return LoraSpec(**read_meta(folder)["lora"])


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # SafetensorError: truncated/garbled file
        raise CheckpointFormatError(f"{path.name} unreadable: {exc}") from exc


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class RecipientError(ValueError):
    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def age_recipients(values: list[str]) -> list:
    """Parse age recipients: native `age1…` keys or SSH public keys."""
    import pyrage

    parsed = []
    for i, value in enumerate(values):
        kind = pyrage.ssh if value.startswith(("ssh-", "ecdsa-")) else pyrage.x25519
        try:
            parsed.append(kind.Recipient.from_str(value.strip()))
        except Exception as exc:  # pyrage raises its own RecipientError types
            raise RecipientError(i, f"not an age (age1…) or SSH public key: {exc}") from None
    return parsed


def encrypt_folder(folder: Path, recipients: list[str]) -> int:
    """Encrypt every file to the recipients, as `<name>.age`, removing the plaintext; bytes written.
    The folder is not listed anywhere until this returns, so no reader sees it half done."""
    import pyrage

    keys = age_recipients(recipients)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        encrypted = folder / f"{path.name}.age"
        encrypted.write_bytes(pyrage.encrypt(path.read_bytes(), keys))
        path.unlink()
    return folder_size(folder)
