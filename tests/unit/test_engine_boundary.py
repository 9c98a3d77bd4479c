"""What crosses the engine boundary: checkpoint references resolved by a store, failures as data."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.adapter_files import CheckpointFormatError
from workers.guard import Failure, guarded
from workers.storage import FolderStore


def test_a_folder_store_resolves_references_under_its_root_only(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    assert store.local_path("checkpoints/tn-1/ckpt-2") == tmp_path / "checkpoints/tn-1/ckpt-2"
    for bad in ("../etc", "/abs/path", "checkpoints/../x", "", "a//b", "checkpoints/tn-1/"):
        with pytest.raises(ValueError, match="not a checkpoint reference"):
            store.local_path(bad)


def test_user_errors_cross_as_user_failures_and_the_rest_as_server_failures(caplog) -> None:
    def bad_checkpoint() -> None:
        raise CheckpointFormatError("not a checkpoint this server wrote")

    def crash() -> None:
        raise KeyError("secret detail")

    assert guarded(lambda: 3) == 3
    assert guarded(bad_checkpoint) == Failure("user", "not a checkpoint this server wrote")
    failure = guarded(crash)
    assert isinstance(failure, Failure) and failure.category == "server"
    assert "KeyError" in failure.message and "secret detail" not in failure.message
    assert any(r.message == "engine_call_crashed" and r.exc_info for r in caplog.records)
