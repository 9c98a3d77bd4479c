"""The Ray engine's own tests: several base models, and a trainer replica killed mid-step. Run by
scripts/ray-suite.sh, inside a loopback-only network namespace,
with TWINKLE_TEST_SERVER_ARGS naming the Ray engine, PostgreSQL and Redis (`make test` runs it)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tinker
from tinker import types

from server.process import running_server
from tests.support.data import make_data

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BASE = "tiny-qwen3"


def _server_args() -> list[str]:
    args = shlex.split(os.environ.get("TWINKLE_TEST_SERVER_ARGS", ""))
    assert "ray" in args, "ray-marked tests run in scripts/ray-suite.sh (a loopback-only namespace), not alone"
    return args


def _trainer_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"ServeReplica:twinkle-trainer-{BASE}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def _step(tc, data) -> float:
    fb = tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return fb.result().metrics["loss:sum"]


def test_a_trainer_replica_killed_mid_step_fails_the_step_and_the_client_goes_on(
    tmp_path: Path, tiny_model_dir: Path, token_rows
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / BASE).symlink_to(tiny_model_dir)
    data = make_data(token_rows)
    # Long enough (seconds on a CPU) to be killed in the middle of.
    big = make_data([(row * 64)[:1000] for row in token_rows] * 8)
    with running_server(tmp_path, extra_args=_server_args(), timeout=300) as server, \
            tinker.ServiceClient(base_url=server.base_url, api_key="tml-ray-fault") as sc:
        tc = sc.create_lora_training_client(BASE, rank=4, seed=2).result()
        _step(tc, data)
        saved = tc.save_state("before-the-fault").result().path
        [replica] = _trainer_pids()
        pending = tc.forward_backward(big, "cross_entropy")
        time.sleep(1.0)
        os.kill(replica, signal.SIGKILL)
        with pytest.raises(tinker.RequestFailedError) as failed:
            pending.result(timeout=120)
        assert "last checkpoint" in str(failed.value), failed.value
        # Serve brings the trainer back (the base model loaded, no adapters); the client reloads.
        deadline = time.monotonic() + 180
        while not (pids := _trainer_pids()) or pids == [replica]:
            assert time.monotonic() < deadline, "Serve did not bring the trainer replica back"
            time.sleep(1.0)
        with pytest.raises(tinker.RequestFailedError) as lost:
            _step(tc, data)
        assert "checkpoint" in str(lost.value), lost.value
        again = sc.create_training_client_from_state_with_optimizer(saved).result()
        loss = _step(again, data)
        assert loss > 0 and "ray_call_failed" in server.log()


def test_two_base_models_each_with_their_trainer_and_sampler(tmp_path: Path, tiny_model_dir: Path,
                                                             token_rows) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / BASE).symlink_to(tiny_model_dir)
    # Four replicas on a 2-CPU machine: fractions of a CPU each (they take turns anyway).
    args = [*_server_args(), "--base-model", "tiny-llama", "--ray-trainer-cpus", "0.5", "--ray-sampler-cpus", "0.25"]
    with running_server(tmp_path, extra_args=args, timeout=400) as server, \
            tinker.ServiceClient(base_url=server.base_url, api_key="tml-ray-two") as sc:
        served = {m.model_name for m in sc.get_server_capabilities().supported_models}
        assert {BASE, "tiny-llama"} <= served
        for base in (BASE, "tiny-llama"):
            tc = sc.create_lora_training_client(base, rank=4, seed=1).result()
            assert _step(tc, make_data(token_rows)) > 0
            sampled = tc.save_weights_and_get_sampling_client().result().sample(
                types.ModelInput.from_ints(token_rows[0][:4]), 1, types.SamplingParams(max_tokens=3)).result()
            assert len(sampled.sequences[0].tokens) == 3
        replicas = subprocess.run(["pgrep", "-fa", "ServeReplica:twinkle-"], capture_output=True, text=True).stdout
        assert {line.split("ServeReplica:")[1].split(":")[0] for line in replicas.splitlines()} == {
            "twinkle-trainer-tiny-qwen3", "twinkle-sampler-tiny-qwen3", "twinkle-trainer-tiny-llama",
            "twinkle-sampler-tiny-llama"}
