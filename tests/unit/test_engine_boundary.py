"""What crosses the engine boundary: checkpoint references resolved by a store, failures as data."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pyrage
import pytest

from schemas.wire import DatumIn, ForwardBackwardCall
from server.engine.local import LocalEngine
from server.errors import OperationFailed
from workers.adapter_files import CheckpointFormatError
from workers.guard import Failure, guarded
from workers.storage import FolderStore
from workers.types import AdamConfig, ComputeOptions, LoraSpec, ModelCalls


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
            # Packed calls: each model's outcome on its own, a failing one as its Failure.
            steps = await engine.optim_steps([("m1", AdamConfig()), ("nobody", AdamConfig()), ("m2", AdamConfig())])
            assert isinstance(steps[1], Failure) and steps[1].category == "user"
            assert all(isinstance(s, dict) and "grad_norm:mean" in s for s in (steps[0], steps[2]))
            data = [DatumIn(tokens=np.array([5, 6, 7]), loss_fn_inputs={"target_tokens": np.array([6, 7, 8]),
                                                                        "weights": np.ones(3, np.float32)})]
            calls = [ForwardBackwardCall("x", 1, loss, {}, False, data) for loss in
                     ("cross_entropy", "no_such_loss")]
            packed = await engine.forward_backward_packed(
                [ModelCalls("m1", calls[:1]), ModelCalls("m2", calls[1:]), ModelCalls("nobody", calls[:1])])
            assert packed[0][0].metrics["loss:sum"] > 0
            assert isinstance(packed[1], Failure) and "no_such_loss" in packed[1].message
            assert isinstance(packed[2], Failure) and packed[2].category == "user"
        finally:
            await engine.stop()

    asyncio.run(scenario())
