"""Where checkpoint folders live, addressed by reference.

A reference is a storage key made by the server from ids only, such as
`checkpoints/<tenant>/<checkpoint id>`: never a path, never anything a client sent. The engine
interface passes references, and each side resolves them through its own store, so the compute
plane may run where the control plane's disk is not. Today's store is a folder (the data dir).
An object store would implement the same two calls: `local_path` downloads into a local cache
before a read and gives a scratch folder before a write; `publish` uploads that folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*")


class CheckpointStore(Protocol):
    def local_path(self, ref: str) -> Path:
        """The local folder holding (or to hold) checkpoint `ref`."""
        ...

    def publish(self, ref: str) -> None:
        """Make a checkpoint just written at local_path(ref) visible to every other process."""
        ...


class FolderStore:
    """Checkpoints as folders under one root (the data dir); nothing to publish."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def local_path(self, ref: str) -> Path:
        if len(ref) > 512 or not _REF.fullmatch(ref) or ".." in ref.split("/"):
            raise ValueError(f"not a checkpoint reference: {ref!r}")
        return self.root / ref

    def publish(self, ref: str) -> None:
        pass
