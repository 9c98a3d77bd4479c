"""The unmodified tinker SDK trains a LoRA adapter against a real server process, sync and async.
Every test here also runs against the older SDKs (`make test`; `pytest -m sdk --sdk 0.16.1`)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import numpy as np
import pytest
import tinker
from tinker import types

from tests.support.data import make_data
from tests.support.sdk import close, resolve, rest_client, sample_async, service

pytestmark = [pytest.mark.slow, pytest.mark.sdk]
BASE = "tiny-qwen3"
LR = 3e-3


def train_step(tc, data) -> float:
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=LR))
    loss = fb.result().metrics["loss:sum"]
    opt.result()
    return loss


def test_sync_training_learns_and_forward_matches_forward_backward(server, token_rows) -> None:
    data = make_data(token_rows)
    with service(server, "tml-training") as sc:
        tc = resolve(sc.create_lora_training_client(BASE, rank=8, seed=0))
        assert tc.get_info().model_data.model_name == BASE
        losses = []
        for _ in range(10):
            fwd = tc.forward(data, "cross_entropy")
            fb = tc.forward_backward(data, "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=LR))
            f, b = fwd.result(), fb.result()
            assert opt.result().metrics["grad_norm:mean"] > 0
            for out_f, out_b, row in zip(f.loss_fn_outputs, b.loss_fn_outputs, token_rows):
                lf, lb = out_f["logprobs"].to_numpy(), out_b["logprobs"].to_numpy()
                assert lf.shape == lb.shape == (len(row) - 1,)
                np.testing.assert_allclose(lf, lb, atol=1e-5, rtol=0)
            assert f.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], abs=1e-4)
            losses.append(b.metrics["loss:sum"])
    assert losses[-1] < 0.6 * losses[0], losses


def test_async_training_learns(server, token_rows) -> None:
    data = make_data(token_rows)

    async def run() -> list[float]:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key="tml-training-async")
        tc = await sc.create_lora_training_client_async(BASE, rank=8, seed=0)
        losses = []
        for step in range(10):
            if step % 2:  # the deprecated *_async spellings still work
                fb = await tc.forward_backward_async(data, "cross_entropy")
                opt = await tc.optim_step_async(types.AdamParams(learning_rate=LR))
            else:
                fb = tc.forward_backward(data, "cross_entropy")
                opt = tc.optim_step(types.AdamParams(learning_rate=LR))
            losses.append((await fb).metrics["loss:sum"])
            await opt
        forward = await tc.forward(data, "cross_entropy")
        assert len(forward.loss_fn_outputs) == len(data)
        saved = await tc.save_state("async-ckpt")
        resumed = await sc.create_training_client_from_state_with_optimizer_async(saved.path)
        assert (await resumed.get_info_async()).lora_rank == 8
        sampler = await tc.save_weights_and_get_sampling_client_async()
        result = await sample_async(sampler, types.ModelInput.from_ints(data[0].model_input.to_ints()[:4]), 2,
                                    types.SamplingParams(max_tokens=4, seed=3))
        assert len(result.sequences) == 2
        await asyncio.to_thread(close, sc)
        return losses

    losses = asyncio.run(run())
    assert losses[-1] < 0.6 * losses[0], losses


def test_save_and_resume_matches_an_uninterrupted_run(server, token_rows) -> None:
    data = make_data(token_rows)
    with service(server, "tml-resume") as sc:
        tc = resolve(sc.create_lora_training_client(BASE, rank=8, seed=1))
        for _ in range(3):
            train_step(tc, data)
        path = tc.save_state("after-3").result().path
        assert path == f"tinker://{tc.model_id}/weights/after-3"
        uninterrupted = [train_step(tc, data) for _ in range(3)]

        resumed = resolve(sc.create_training_client_from_state_with_optimizer(path))
        assert resumed.model_id != tc.model_id
        assert [train_step(resumed, data) for _ in range(3)] == pytest.approx(uninterrupted, abs=1e-5)

        tc.load_state_with_optimizer(path).result()  # rewinds the original model
        assert [train_step(tc, data) for _ in range(3)] == pytest.approx(uninterrupted, abs=1e-5)

        fresh_optimizer = resolve(sc.create_training_client_from_state(path))
        first, second = train_step(fresh_optimizer, data), train_step(fresh_optimizer, data)
        assert first == pytest.approx(uninterrupted[0], abs=1e-5)  # same weights ...
        assert abs(second - uninterrupted[1]) > 1e-3  # ... but Adam started over


def test_rest_client_lists_runs_and_checkpoints(server, token_rows) -> None:
    with service(server, "tml-rest") as sc:
        tc = resolve(sc.create_lora_training_client(BASE, rank=4, seed=2, user_metadata={"purpose": "rest"}))
        tc.save_state("r1").result()
        tc.save_weights_for_sampler("s1").result()
        resolve(tc.save_weights_and_get_sampling_client())  # ephemeral: not a listed checkpoint
        rc = rest_client(server, "tml-rest", sc)
        runs = rc.list_training_runs().result()
        assert [r.training_run_id for r in runs.training_runs] == [tc.model_id]
        assert runs.cursor.total_count == 1
        run = rc.get_training_run(tc.model_id).result()
        assert (run.lora_rank, run.base_model, run.user_metadata) == (4, BASE, {"purpose": "rest"})
        assert run.last_checkpoint.checkpoint_id == "weights/r1"
        assert run.last_sampler_checkpoint.checkpoint_id == "sampler_weights/s1"
        listed = rc.list_checkpoints(tc.model_id).result().checkpoints
        assert sorted(c.checkpoint_id for c in listed) == ["sampler_weights/s1", "weights/r1"]
        assert all(c.size_bytes and c.size_bytes > 0 for c in listed)
        assert {c.tinker_path for c in listed} == {
            f"tinker://{tc.model_id}/weights/r1", f"tinker://{tc.model_id}/sampler_weights/s1"
        }


def test_tenants_stepping_at_once_share_packed_passes_and_each_gets_its_own_result(server, token_rows) -> None:
    """Four tenants (ranks 4-16, each its own data) send forward_backward at once: the server packs
    them into shared engine calls (its log says so) and each gets exactly the loss of its own data
    on its own adapter, the same as a forward of that data run alone afterwards."""
    with contextlib.ExitStack() as stack:
        clients, datas = [], []
        for i in range(4):
            sc = stack.enter_context(service(server, f"tml-packing-{i}"))
            clients.append(resolve(sc.create_lora_training_client(BASE, rank=4 * (i + 1), seed=i)))
            datas.append(make_data(token_rows[i:] + token_rows[:i]))
        for tc, data in zip(clients, datas):  # a fresh LoRA B is zero: every adapter would score alike
            train_step(tc, data)
        mark = len(server.log().splitlines())
        for _ in range(3):  # the first call of a burst may start alone; the ones behind it pack
            together = [tc.forward_backward(data, "cross_entropy") for tc, data in zip(clients, datas)]
            packed = [fb.result().metrics["loss:sum"] for fb in together]
            alone = [tc.forward(data, "cross_entropy").result().metrics["loss:sum"] for tc, data in zip(clients, datas)]
            np.testing.assert_allclose(packed, alone, rtol=1e-5)
            assert len(set(packed)) == 4  # four adapters, four losses
        events = [json.loads(line) for line in server.log().splitlines()[mark:] if line.startswith("{")]
        shared = [e.get("packed", 1) for e in events if e.get("event") == "op_done" and e.get("kind") == "forward_backward"]
        assert max(shared) >= 2
