"""The pieces around the Ray engine and several gateways, each with fakes at its edge: the engine's
translation of replica outcomes, the scheduler's lanes, the settings and the printed Serve config,
and the forwarder's loop guard. The real thing runs in scripts/ray-suite.sh and
tests/integration/test_gateways.py."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError
from ray.serve.schema import ServeDeploySchema

from gateway.forwarding import FORWARDED, Forwarder
from server.boot import scheduler_lanes
from server.cli import main
from server.config import ConfigError, Settings, load_settings
from server.engine.ray_engine import RayEngine
from server.engine.ray_serve_app import SAMPLER, TRAINER, EngineReplica, app_name, serve_config
from server.errors import Elsewhere, OperationFailed
from server.kinds import Lane
from tests.support.engines import IdleEngine
from workers.guard import Failure


class FakeMethod:
    def __init__(self, outcome: object) -> None:
        self.outcome = outcome
        self.calls: list[tuple] = []

    async def remote(self, *args: object, **kwargs: object) -> object:
        self.calls.append((args, kwargs))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class FakeHandle:
    def __init__(self, outcome: object) -> None:
        self.call = FakeMethod(outcome)


def ray_engine(trainer: object = None, sampler: object = None) -> RayEngine:
    engine = RayEngine(cluster=None, settings=Settings(engine="ray", ray_sampler_replicas=3), base_model="tiny-qwen3")
    engine._trainer, engine._sampler = FakeHandle(trainer), FakeHandle(sampler)
    return engine


def test_a_replica_result_comes_back_with_the_pool_status() -> None:
    engine = ray_engine(trainer=({"loss": 1.0}, "pool-after"))
    assert asyncio.run(engine.optim_step("m1", None)) == {"loss": 1.0}
    assert engine.pool_status() == "pool-after"
    assert engine._trainer.call.calls == [(("optim_step", "m1", None), {})]


def test_a_replica_failure_keeps_its_category() -> None:
    engine = ray_engine(trainer=(Failure("user", "bad checkpoint"), None))
    with pytest.raises(OperationFailed) as failed:
        asyncio.run(engine.load("m1", "ref", with_optimizer=False))
    assert failed.value.category == "user" and failed.value.message == "bad checkpoint"


def test_a_trainer_that_died_says_to_reload_from_the_last_checkpoint() -> None:
    engine = ray_engine(trainer=ActorDiedError())
    with pytest.raises(OperationFailed) as failed:
        asyncio.run(engine.forward_backward("m1", []))
    assert failed.value.category == "server" and "last checkpoint" in failed.value.message
    sampler = ray_engine(sampler=ActorDiedError())
    with pytest.raises(OperationFailed, match="sample again"):
        asyncio.run(sampler.sample_batch(None, []))


def test_a_replica_refuses_calls_outside_its_role() -> None:
    replica = EngineReplica.__new__(EngineReplica)  # no model: the check comes before any engine call
    replica._role = SAMPLER
    outcome, status = asyncio.run(replica.call("forward_backward", "m1", []))
    assert isinstance(outcome, Failure) and "no call 'forward_backward'" in outcome.message and status is None


def test_lanes_add_up_over_ray_engines_but_not_over_local_ones() -> None:
    rays = {"a": ray_engine(), "b": ray_engine()}
    assert scheduler_lanes(rays) == ({Lane.TRAINING: 2, Lane.SAMPLING: 6}, None)
    local = IdleEngine()
    assert scheduler_lanes({"a": local, "b": IdleEngine()}) == (dict(local.lanes), local.max_calls)


def test_ray_settings_are_checked() -> None:
    settings = load_settings(env={"TWINKLE_ENGINE": "ray", "TWINKLE_RAY_ADDRESS": "auto"})
    assert settings.engine == "ray" and settings.ray_address == "auto"
    for bad in ({"TWINKLE_ENGINE": "spark"}, {"TWINKLE_RAY_SAMPLER_REPLICAS": "0"},
                {"TWINKLE_ADVERTISE_URL": "ftp://x"}, {"TWINKLE_RAY_APP_PREFIX": "has space"}):
        with pytest.raises(ConfigError) as refused:
            load_settings(env=bad)
        assert next(iter(bad)) in str(refused.value)


def test_the_instance_url_follows_host_port_and_root_path() -> None:
    assert Settings(host="127.0.0.1", port=8123, root_path="/tw").instance_url == "http://127.0.0.1:8123/tw"
    assert Settings(host="::1", port=9).instance_url == "http://[::1]:9"
    assert Settings(advertise_url="https://gw-0.svc:8000/", port=1).instance_url == "https://gw-0.svc:8000"
    assert "0.0.0.0" not in Settings(host="0.0.0.0", port=1).instance_url


def test_the_printed_serve_config_is_a_valid_serve_config(capsys, tmp_path) -> None:
    assert main(["serve", "--engine", "ray", "--print-serve-config", "--base-model", "tiny-qwen3",
                 "--base-model", "tiny-llama", "--ray-sampler-replicas", "2", "--data-dir", str(tmp_path)]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema.model_validate(config)
    names = [app["name"] for app in config["applications"]]
    assert names == [app_name("twinkle", role, model) for model in ("tiny-qwen3", "tiny-llama")
                     for role in (TRAINER, SAMPLER)]
    sampler = config["applications"][1]["args"]
    assert sampler["options"]["num_replicas"] == 2 and sampler["settings"]["data_dir"] == str(tmp_path.resolve())
    # Nothing secret travels to the cluster.
    assert "database_url" not in sampler["settings"] and "admin_key" not in sampler["settings"]
    assert config == serve_config(load_settings(cli={"engine": "ray", "base_model": ["tiny-qwen3", "tiny-llama"],
                                                     "ray_sampler_replicas": 2, "data_dir": tmp_path}, env={}))


def test_a_forwarded_request_is_never_forwarded_again() -> None:
    app = FastAPI()
    forwarder = Forwarder("inst-here")

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request):
        return await forwarder.forward(request, Elsewhere("http://127.0.0.1:1", "m1"))

    client = TestClient(app)
    looped = client.post("/api/v1/optim_step", json={}, headers={FORWARDED: "inst-there"})
    assert looped.status_code == 503 and "moving" in looped.json()["error"] and looped.headers["retry-after"]
    unreachable = client.post("/api/v1/optim_step", json={})  # nothing listens on port 1
    assert unreachable.status_code == 503 and "did not answer" in unreachable.json()["error"]
