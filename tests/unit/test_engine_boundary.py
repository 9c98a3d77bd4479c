"""What crosses the engine boundary: checkpoint references resolved by a store, failures as data."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyrage
import pytest

from server.engine.local import LocalEngine
from server.errors import OperationFailed
from workers.adapter_files import CheckpointFormatError
from workers.guard import Failure, guarded
from workers.storage import FolderStore
from workers.types import AdamConfig, ComputeOptions, LoraSpec


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


def test_the_local_engine_raises_failures_with_their_category(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Through the real LocalEngine: a request error arrives as a `user` OperationFailed with the
    worker's message, a crash as a `server` one; checkpoints go by reference through its store."""
    engine = LocalEngine(lambda: tiny_model_dir, "tiny-qwen3", ComputeOptions(torch_threads=1), FolderStore(tmp_path))

    async def scenario() -> None:
        await engine.start()
        try:
            with pytest.raises(OperationFailed) as missing:
                await engine.optim_step("nobody", AdamConfig())
            assert missing.value.category == "user" and "no weights in memory" in missing.value.message
            await engine.create_adapter("m1", LoraSpec(rank=2, seed=0))
            assert await engine.save("m1", "checkpoints/tn/ck1", with_optimizer=False) > 0
            assert (tmp_path / "checkpoints/tn/ck1" / "adapter_model.safetensors").is_file()
            assert await engine.load("m2", "checkpoints/tn/ck1", with_optimizer=False) == LoraSpec(rank=2, seed=0)
            recipient = str(pyrage.x25519.Identity.generate().to_public())
            await engine.save("m1", "checkpoints/tn/ck2", with_optimizer=False, encrypt_to=[recipient])
            assert {f.suffix for f in (tmp_path / "checkpoints/tn/ck2").iterdir()} == {".age"}  # no plaintext
            (tmp_path / "junk").mkdir()
            with pytest.raises(OperationFailed) as junk:
                await engine.load("m3", "junk", with_optimizer=False)
            assert junk.value.category == "user"
            with pytest.raises(OperationFailed) as crash:
                await engine.save("m1", "../outside", with_optimizer=False)  # never made by the server
            assert crash.value.category == "server" and "ValueError" in crash.value.message
        finally:
            await engine.stop()

    asyncio.run(scenario())
