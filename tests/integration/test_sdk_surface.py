"""Every public method of the SDK's ServiceClient, TrainingClient, SamplingClient and RestClient,
on every SDK version the suite runs against (0.38.0 here; 0.16.1 and 0.24.1 with `--sdk`).

`SURFACE` lists each method with the SDK versions that have it and either the test that exercises
it through the SDK against a real server (its sync and its async variant are separate entries) or
the reason it has no server side. `test_the_table_is_the_sdks_public_surface` compares the table
with the running SDK's classes, so a method a new SDK adds fails until it is classified here. The
tests of this file record which methods they call (only calls made from test code count, not the
SDK's calls to itself) and check that they called every method the table assigns to them; a test
named in another file is checked to exist and to call the method.

Methods whose server side is deliberately a refusal (the hosted service's billing and audit
endpoints) are exercised too: the test asserts the 404 that names the endpoint.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import inspect
import io
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from tinker import types
from tinker.lib.public_interfaces.rest_client import RestClient

from tests.support import sdk
from tests.support.data import make_data
from tests.support.sdk import VERSION, resolve, rest_client, service

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
V16, V24, V38 = "0.16.1", "0.24.1", "0.38.0"
ALL = frozenset({V16, V24, V38})
SINCE_24 = frozenset({V24, V38})
ONLY_38 = frozenset({V38})
OLD = frozenset({V16, V24})
TESTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Exercised:
    test: str  # a test function of this file, or "<file>.py::<test>" in tests/integration
    versions: frozenset[str] = ALL
    note: str = ""


@dataclass(frozen=True)
class ClientSide:
    reason: str
    versions: frozenset[str] = ALL


SERVICE = "test_service_client_surface"
TRAINING = "test_training_client_surface"
SAMPLING = "test_sampling_client_surface"
REST = "test_rest_client_surface"
NEWER = "test_newer_sdk_surface"  # 0.38-only methods; not run under the old SDKs
HOSTED = "answered 404: a hosted-service endpoint (billing, audit) this server does not offer"
TELEMETRY = ClientSide("returns the client's telemetry object; its events go to POST /telemetry in the background")
TOKENIZER = ClientSide("loads the Hugging Face tokenizer named by get_info / the sampler's base model, client-side")


def both(test: str, name: str, versions: frozenset[str] = ALL, note: str = "") -> dict[str, Exercised]:
    """A method and its `_async` twin, exercised by the same test."""
    return {name: Exercised(test, versions, note), f"{name}_async": Exercised(test, versions, note)}


SURFACE: dict[str, dict[str, Exercised | ClientSide]] = {
    "ServiceClient": {
        "close": Exercised(SERVICE, ONLY_38),  # through tests/support/sdk.py service(); POST /sessions/{id}/finish
        "copy_weights": Exercised("test_sdk_rest.py::test_checkpoint_management_through_the_sdk", ONLY_38),
        "create_custom_loss": Exercised("test_sdk_custom_loss.py::test_server_side_loss_equals_the_client_side_run",
                                        ONLY_38),
        **both(SERVICE, "create_lora_training_client"),
        "create_rest_client": Exercised(SERVICE),
        **both(SERVICE, "create_sampling_client"),
        **both(SERVICE, "create_training_client_from_state"),
        **both(SERVICE, "create_training_client_from_state_with_optimizer"),
        "get_console_url": ClientSide("formats a URL of the hosted web console from the session id", ONLY_38),
        **both(SERVICE, "get_server_capabilities"),
        "get_telemetry": TELEMETRY,
    },
    "TrainingClient": {
        **both(TRAINING, "create_sampling_client"),
        **both(TRAINING, "forward"),
        **both(TRAINING, "forward_backward"),
        **both(TRAINING, "forward_backward_custom"),
        "get_console_url": ClientSide("formats a URL of the hosted web console from the model id", ONLY_38),
        **both(TRAINING, "get_info"),
        "get_telemetry": TELEMETRY,
        "get_tokenizer": TOKENIZER,
        **both(TRAINING, "load_state"),
        **both(TRAINING, "load_state_with_optimizer"),
        **both(TRAINING, "optim_step"),
        **both(TRAINING, "save_state"),
        **both(TRAINING, "save_weights_and_get_sampling_client"),
        "save_weights_and_get_sampling_client_submit": Exercised(TRAINING, frozenset({V16})),
        **both(NEWER, "save_weights_external", ONLY_38),
        **both(TRAINING, "save_weights_for_sampler"),
    },
    "SamplingClient": {
        **both(SAMPLING, "compute_logprobs"),
        "create": Exercised(SAMPLING),  # static: SamplingClient.create(holder, model_path=...)
        "from_sampler_handle": Exercised(NEWER, ONLY_38),
        **both(SAMPLING, "get_base_model"),
        "get_sampler_handle": Exercised(NEWER, ONLY_38),  # client-side encoding, used by from_sampler_handle
        "get_telemetry": TELEMETRY,
        "get_tokenizer": TOKENIZER,
        "on_queue_state_change": ClientSide("a hook the SDK calls when retrieve_future reports a paused queue"),
        **both(SAMPLING, "sample"),
    },
    "RestClient": {
        **both(REST, "assign_session_project", SINCE_24),
        **both(NEWER, "copy_weights", ONLY_38),
        **both(REST, "delete_checkpoint"),
        **both(REST, "delete_checkpoint_from_tinker_path"),
        **both(REST, "export_session_trace", SINCE_24),
        **both(REST, "get_audit_log", SINCE_24, HOSTED),
        **both(REST, "get_billing_usage", SINCE_24, HOSTED),
        **both(REST, "get_checkpoint_archive_url", OLD),
        **both(REST, "get_checkpoint_archive_url_from_tinker_path", OLD),
        **both(NEWER, "get_current_checkpoint_storage_usage", ONLY_38, HOSTED),
        **both(NEWER, "get_external_weights_urls", ONLY_38),
        **both(REST, "get_sampler"),
        "get_server_capabilities": Exercised(NEWER, ONLY_38),
        **both(REST, "get_session"),
        "get_telemetry": TELEMETRY,
        **both(REST, "get_training_run"),
        **both(REST, "get_training_run_by_tinker_path"),
        "get_weights_info_by_tinker_path": Exercised(REST),
        **both(REST, "list_checkpoints"),
        **both(REST, "list_sessions"),
        **both(REST, "list_training_runs"),
        **both(REST, "list_user_checkpoints"),
        **both(REST, "publish_checkpoint_from_tinker_path"),
        "search_sessions": Exercised(NEWER, ONLY_38),
        **both(REST, "set_checkpoint_ttl_from_tinker_path"),
        **both(REST, "unpublish_checkpoint_from_tinker_path"),
        "whoami": ClientSide("decodes the caller's JWT locally; an API key is not one (raises, nothing is sent)",
                             SINCE_24),
    },
}
CLASSES: dict[str, type] = {
    "ServiceClient": tinker.ServiceClient,
    "TrainingClient": tinker.TrainingClient,
    "SamplingClient": tinker.SamplingClient,
    "RestClient": RestClient,
}


def public_methods(cls: type) -> set[str]:
    return {name for name, value in inspect.getmembers(cls)
            if not name.startswith("_") and callable(value) and not inspect.isclass(value)}


def assigned(test: str) -> set[tuple[str, str]]:
    return {(cls, name) for cls, methods in SURFACE.items() for name, entry in methods.items()
            if isinstance(entry, Exercised) and entry.test == test and VERSION in entry.versions}


# ----- the table ---------------------------------------------------------------------------------


@pytest.mark.sdk
def test_the_table_is_the_sdks_public_surface() -> None:
    assert VERSION in ALL, f"tinker {VERSION}: classify its methods in SURFACE (and add the version)"
    for cls_name, cls in CLASSES.items():
        listed = {name for name, entry in SURFACE[cls_name].items() if VERSION in entry.versions}
        actual = public_methods(cls)
        assert actual - listed == set(), f"{cls_name} methods of tinker {VERSION} missing from SURFACE"
        assert listed - actual == set(), f"SURFACE lists {cls_name} methods tinker {VERSION} does not have"
    assert tinker.RestClient is RestClient if hasattr(tinker, "RestClient") else True


def test_tests_named_in_other_files_exist_and_call_the_method() -> None:
    for cls_name, methods in SURFACE.items():
        for name, entry in methods.items():
            if not isinstance(entry, Exercised) or "::" not in entry.test:
                continue
            file, test = entry.test.split("::")
            tree = ast.parse((TESTS / file).read_text())
            (fn,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == test]
            called = {node.func.attr for node in ast.walk(fn)
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
            assert name in called, f"{entry.test} does not call {cls_name}.{name}"
    here = {node.name for node in ast.parse(Path(__file__).read_text()).body if isinstance(node, ast.FunctionDef)}
    named = {entry.test for methods in SURFACE.values() for entry in methods.values() if isinstance(entry, Exercised)}
    assert {t for t in named if "::" not in t} <= here


# ----- recording which methods a test calls ------------------------------------------------------

OUR_FILES = {str(Path(__file__).resolve()), str(Path(sdk.__file__).resolve())}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[tuple[str, str]]]:
    """Wraps every public method of the four classes; records (class, method) for calls made from
    this file or tests/support/sdk.py (not the SDK's calls to itself)."""
    seen: set[tuple[str, str]] = set()
    for cls_name, cls in CLASSES.items():
        for name in public_methods(cls):
            raw = inspect.getattr_static(cls, name)
            func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else getattr(cls, name)
            wrapper = _recording(func, (cls_name, name), seen)
            if isinstance(raw, staticmethod):
                wrapper = staticmethod(wrapper)
            elif isinstance(raw, classmethod):
                wrapper = classmethod(wrapper)
            monkeypatch.setattr(cls, name, wrapper)
    yield seen


def _recording(func: Any, key: tuple[str, str], seen: set[tuple[str, str]]) -> Any:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if str(Path(sys._getframe(1).f_code.co_filename).resolve()) in OUR_FILES:
            seen.add(key)
        return func(*args, **kwargs)

    return wrapper


def assert_archive(url: str) -> None:
    """A checkpoint archive link downloads a tar of the checkpoint's files."""
    with tarfile.open(fileobj=io.BytesIO(httpx.get(url, timeout=30).raise_for_status().content)) as tar:
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(tar.getnames())


def assert_called_all(calls: set[tuple[str, str]], test: str) -> None:
    missing = sorted(assigned(test) - calls)
    assert not missing, f"{test} did not call {missing} (tinker {VERSION})"


async def settle(value: Any) -> Any:
    """Await until a plain value: some `*_async` methods give a future of a future."""
    while inspect.isawaitable(value):
        value = await value
    return value


def done(value: Any) -> Any:
    """The value of a sync call: a future's result, or the value itself."""
    return value.result() if callable(getattr(type(value), "result", None)) else value


# ----- the version-neutral surface ---------------------------------------------------------------


@pytest.mark.sdk
def test_service_client_surface(server, token_rows, calls) -> None:
    with service(server, "tml-surface-service") as sc:
        caps = done(sc.get_server_capabilities())
        assert [m.model_name for m in caps.supported_models] == [BASE]
        tc = resolve(sc.create_lora_training_client(BASE, rank=4, seed=0))
        tc.forward_backward(make_data(token_rows[:1]), "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()  # a state with optimizer moments
        state = tc.save_state("svc").result().path
        weights = tc.save_weights_for_sampler("svc").result().path
        assert resolve(sc.create_training_client_from_state(state)).get_info().lora_rank == 4
        assert resolve(sc.create_training_client_from_state_with_optimizer(state)).get_info().lora_rank == 4
        assert resolve(sc.create_sampling_client(model_path=weights)).get_base_model() == BASE
        assert sc.create_rest_client().get_training_run(tc.model_id).result().lora_rank == 4

        async def run() -> None:
            caps = await settle(sc.get_server_capabilities_async())
            assert caps.supported_models[0].model_name == BASE
            created = await settle(sc.create_lora_training_client_async(BASE, rank=2, seed=1))
            assert (await settle(created.get_info_async())).lora_rank == 2
            for resumed in (await settle(sc.create_training_client_from_state_async(state)),
                            await settle(sc.create_training_client_from_state_with_optimizer_async(state))):
                assert (await settle(resumed.get_info_async())).lora_rank == 4
            base = await settle(sc.create_sampling_client_async(base_model=BASE))
            assert await settle(base.get_base_model_async()) == BASE

        asyncio.run(run())
    assert_called_all(calls, SERVICE)


def summed_nll(data: list[types.Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
    """A custom loss: the summed negative log-likelihood, i.e. cross_entropy with weights 1."""
    loss = sum(-lp.sum() for lp in logprobs)
    return loss, {"surface_nll:sum": float(loss.detach())}


@pytest.mark.sdk
def test_training_client_surface(server, token_rows, calls) -> None:
    data = make_data(token_rows[:2])
    adam = types.AdamParams(learning_rate=1e-3)
    with service(server, "tml-surface-training") as sc:
        tc = resolve(sc.create_lora_training_client(BASE, rank=4, seed=0))
        assert tc.get_info().model_data.model_name == BASE
        fwd = tc.forward(data, "cross_entropy").result()
        fb = tc.forward_backward(data, "cross_entropy").result()
        assert fwd.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-5)
        custom = tc.forward_backward_custom(data, summed_nll).result()
        assert custom.metrics["surface_nll:sum"] == pytest.approx(fwd.metrics["loss:sum"], rel=1e-4)
        assert tc.optim_step(adam).result().metrics
        state = tc.save_state("tr").result().path
        tc.load_state(state).result()
        tc.load_state_with_optimizer(state).result()
        weights = tc.save_weights_for_sampler("tr").result().path
        samplers = [resolve(tc.create_sampling_client(weights)), resolve(tc.save_weights_and_get_sampling_client())]
        if VERSION == V16:
            samplers.append(tc.save_weights_and_get_sampling_client_submit().result())
        prompt = types.ModelInput.from_ints(token_rows[0][:4])
        params = types.SamplingParams(max_tokens=3, seed=5)
        first = [s.sample(prompt, 1, params).result().sequences[0].tokens for s in samplers]
        assert first == [first[0]] * len(samplers)  # the same weights, however they were saved

        async def run() -> None:
            fwd = await settle(tc.forward_async(data, "cross_entropy"))
            fb = await settle(tc.forward_backward_async(data, "cross_entropy"))
            assert fwd.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-5)
            custom = await settle(tc.forward_backward_custom_async(data, summed_nll))
            assert custom.metrics["surface_nll:sum"] == pytest.approx(fwd.metrics["loss:sum"], rel=1e-4)
            assert (await settle(tc.optim_step_async(adam))).metrics
            assert (await settle(tc.get_info_async())).lora_rank == 4
            path = (await settle(tc.save_state_async("tr-async"))).path
            assert path == f"tinker://{tc.model_id}/weights/tr-async"
            await settle(tc.load_state_async(path))
            await settle(tc.load_state_with_optimizer_async(path))
            weights = (await settle(tc.save_weights_for_sampler_async("tr-async"))).path
            for sampler in (await settle(tc.create_sampling_client_async(weights)),
                            await settle(tc.save_weights_and_get_sampling_client_async())):
                assert len((await sdk.sample_async(sampler, prompt, 1, params)).sequences) == 1

        asyncio.run(run())
    assert_called_all(calls, TRAINING)


@pytest.mark.sdk
def test_sampling_client_surface(server, token_rows, calls) -> None:
    prompt = types.ModelInput.from_ints(token_rows[1][:5])
    params = types.SamplingParams(max_tokens=4, seed=21, temperature=1.0)
    with service(server, "tml-surface-sampling") as sc:
        tc = resolve(sc.create_lora_training_client(BASE, rank=4, seed=3))
        path = tc.save_weights_for_sampler("smp").result().path
        sampler = resolve(sc.create_sampling_client(model_path=path))
        created = tinker.SamplingClient.create(sc.holder, model_path=path).result()
        out = sampler.sample(prompt, 2, params).result()
        assert [s.tokens for s in created.sample(prompt, 2, params).result().sequences] == [
            s.tokens for s in out.sequences]
        scored = sampler.compute_logprobs(prompt).result()
        assert scored[0] is None and len(scored) == 5
        assert sampler.get_base_model() == BASE

        async def run() -> None:
            again = await settle(sampler.sample_async(prompt, 2, params))
            assert [s.tokens for s in again.sequences] == [s.tokens for s in out.sequences]
            assert await settle(sampler.compute_logprobs_async(prompt)) == pytest.approx(scored, abs=1e-5)
            assert await settle(sampler.get_base_model_async()) == BASE

        asyncio.run(run())
    assert_called_all(calls, SAMPLING)


def refused(call: Any, needle: str) -> None:
    with pytest.raises(tinker.NotFoundError) as err:
        done(call())
    assert needle in str(err.value)


async def refused_async(call: Any, needle: str) -> None:
    with pytest.raises(tinker.NotFoundError) as err:
        await settle(call())
    assert needle in str(err.value)


@pytest.mark.sdk
def test_rest_client_surface(server, calls) -> None:
    key = "tml-surface-rest"
    with service(server, key) as sc:
        tc = resolve(sc.create_lora_training_client(BASE, rank=4, seed=0))
        run = tc.model_id
        state = tc.save_state("keep").result().path
        doomed = [tc.save_state(f"doomed-{i}").result().path for i in range(4)]
        weights = tc.save_weights_for_sampler("w").result().path
        sampler = resolve(tc.save_weights_and_get_sampling_client())
        rc = rest_client(server, key, sc)
        has = set(public_methods(type(rc)))

        assert [r.training_run_id for r in rc.list_training_runs().result().training_runs] == [run]
        assert rc.get_training_run(run).result().lora_rank == 4
        assert rc.get_training_run_by_tinker_path(state).result().training_run_id == run
        assert len(rc.list_checkpoints(run).result().checkpoints) == 6
        assert weights in [c.tinker_path for c in rc.list_user_checkpoints().result().checkpoints]
        assert rc.get_weights_info_by_tinker_path(state).result().lora_rank == 4
        rc.set_checkpoint_ttl_from_tinker_path(state, 3600).result()
        rc.publish_checkpoint_from_tinker_path(state).result()
        rc.unpublish_checkpoint_from_tinker_path(state).result()
        rc.delete_checkpoint(run, "weights/doomed-0").result()
        rc.delete_checkpoint_from_tinker_path(doomed[1]).result()
        assert rc.get_sampler(sampler._sampling_session_id).result().base_model == BASE
        (session_id,) = rc.list_sessions().result().sessions
        assert rc.get_session(session_id).result().training_run_ids == [run]
        if "assign_session_project" in has:  # 0.24+
            rc.assign_session_project(session_id, "proj-surface").result()
            assert rc.export_session_trace(session_id).result().startswith("http")
            refused(lambda: rc.get_audit_log(), "hosted-service endpoint")
            refused(lambda: rc.get_billing_usage("2026-01-01", "2026-02-01"), "hosted-service endpoint")
        if "get_checkpoint_archive_url" in has:  # up to 0.30
            assert_archive(rc.get_checkpoint_archive_url(run, "weights/keep").result().url)
            assert_archive(rc.get_checkpoint_archive_url_from_tinker_path(state).result().url)

        async def run_async() -> None:
            runs = await settle(rc.list_training_runs_async())
            assert runs.training_runs[0].training_run_id == run
            assert (await settle(rc.get_training_run_async(run))).lora_rank == 4
            assert (await settle(rc.get_training_run_by_tinker_path_async(weights))).training_run_id == run
            assert len((await settle(rc.list_checkpoints_async(run))).checkpoints) == 4
            assert len((await settle(rc.list_user_checkpoints_async())).checkpoints) == 4
            await settle(rc.set_checkpoint_ttl_from_tinker_path_async(state, None))
            await settle(rc.publish_checkpoint_from_tinker_path_async(state))
            await settle(rc.unpublish_checkpoint_from_tinker_path_async(state))
            await settle(rc.delete_checkpoint_async(run, "weights/doomed-2"))
            await settle(rc.delete_checkpoint_from_tinker_path_async(doomed[3]))
            assert (await settle(rc.get_sampler_async(sampler._sampling_session_id))).base_model == BASE
            assert (await settle(rc.list_sessions_async())).sessions == [session_id]
            assert (await settle(rc.get_session_async(session_id))).training_run_ids == [run]
            if "assign_session_project" in has:
                await settle(rc.assign_session_project_async(session_id, "proj-surface-2"))
                assert (await settle(rc.export_session_trace_async(session_id))).startswith("http")
                # 0.24.1's get_audit_log_async / get_billing_usage_async assert that they run on the
                # SDK's own event loop (an SDK bug, fixed later): submit them there.
                on_sdk_loop = rc.holder.run_coroutine_threadsafe if VERSION == V24 else (lambda coro: coro)
                await refused_async(lambda: on_sdk_loop(rc.get_audit_log_async()), "hosted-service endpoint")
                await refused_async(lambda: on_sdk_loop(rc.get_billing_usage_async("2026-01-01", "2026-02-01")),
                                    "hosted-service endpoint")
            if "get_checkpoint_archive_url" in has:
                assert_archive((await settle(rc.get_checkpoint_archive_url_async(run, "weights/keep"))).url)
                assert_archive((await settle(rc.get_checkpoint_archive_url_from_tinker_path_async(state))).url)

        asyncio.run(run_async())
        remaining = [c.checkpoint_id for c in rc.list_checkpoints(run).result().checkpoints]
        assert remaining == ["weights/keep", "sampler_weights/w"]
        if "assign_session_project" in has:
            projects = rc.list_training_runs(project_id="proj-surface-2").result().training_runs
            assert [r.training_run_id for r in projects] == [run]
    assert_called_all(calls, REST)


# ----- methods only 0.38 has ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:RestClient.search_sessions is experimental")
def test_newer_sdk_surface(server, calls) -> None:
    key = "tml-surface-newer"
    with service(server, key, project_id="proj-newer") as sc:
        tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
        state = tc.save_state("n1").result().path
        exported = tc.save_weights_external("ext").result().path
        rc = tinker.RestClient(base_url=server.base_url, api_key=key)
        assert "adapter_config.json" in rc.get_external_weights_urls(exported).result().urls
        assert rc.get_server_capabilities().result().supported_models[0].model_name == BASE
        session_id = sc.holder.get_session_id()
        found = rc.search_sessions(types.SessionSearchRequest(session_id=session_id)).result()
        assert [s.session_id for s in found.sessions] == [session_id]
        copied = rc.copy_weights(state, "proj-copies").result()
        assert copied.endswith("/weights/n1") and copied != state
        refused(lambda: rc.get_current_checkpoint_storage_usage(), "hosted-service endpoint")

        sampler = tc.save_weights_and_get_sampling_client().result()
        handle = sampler.get_sampler_handle()
        twin = tinker.SamplingClient.from_sampler_handle(handle, api_key=key)
        prompt, params = types.ModelInput.from_ints([5, 6, 7]), types.SamplingParams(max_tokens=3, seed=1)
        assert twin.sample(prompt, 1, params).result().sequences[0].tokens == \
            sampler.sample(prompt, 1, params).result().sequences[0].tokens

        async def run() -> None:
            path = (await settle(tc.save_weights_external_async("ext-async"))).path
            assert (await settle(rc.get_external_weights_urls_async(path))).urls
            assert (await settle(rc.copy_weights_async(state, "proj-copies"))).endswith("/weights/n1")
            await refused_async(lambda: rc.get_current_checkpoint_storage_usage_async(), "hosted-service endpoint")

        asyncio.run(run())
    assert_called_all(calls, NEWER)
