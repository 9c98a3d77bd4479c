"""Tenant isolation, table-driven: tenant B tries every endpoint on tenant A's objects (models,
futures, checkpoints, sampling sessions, runs, sessions, custom losses, download links). Every
probe must be answered exactly like the same probe on an object that does not exist (so B learns
nothing, not even that the object exists), and A's objects must be unchanged afterwards.

`test_every_route_is_probed_or_classified` walks the app's routes, so a new endpoint fails here
until it is probed or classified as not object-scoped."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import tinker
import torch
from tinker import types

from tests.support.data import fwdbwd_proto, make_data

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
KEY_A, KEY_B = "tml-isolation-owner", "tml-isolation-stranger"


@dataclass(frozen=True)
class Probe:
    name: str
    method: str
    route: str  # the app's route path, for coverage
    path: Callable[[dict], str]
    json: Callable[[dict], Any] | None = None
    proto: Callable[[dict], bytes] | None = None
    prefix: str = "/api/v1"
    native: bool = False  # the native Twinkle API: the key as a bearer, the native session in a header


def ckpt(kind: str) -> Callable[[dict], str]:
    return lambda o: f"/training_runs/{o['model']}/checkpoints/{kind}"


PROBES = [
    Probe("get_info", "POST", "/api/v1/get_info", lambda o: "/get_info", lambda o: {"model_id": o["model"]}),
    Probe("forward_backward", "POST", "/api/v1/forward_backward", lambda o: "/forward_backward",
          proto=lambda o: fwdbwd_proto(o["model"], o["data"], seq_id=99)),
    Probe("forward (old SDKs)", "POST", "/api/v1/forward", lambda o: "/forward", proto=lambda o: fwdbwd_proto(
        o["model"], o["data"], seq_id=99)),
    Probe("optim_step", "POST", "/api/v1/optim_step", lambda o: "/optim_step",
          lambda o: {"model_id": o["model"], "seq_id": 99, "adam_params": {}}),
    Probe("save_weights", "POST", "/api/v1/save_weights", lambda o: "/save_weights",
          lambda o: {"model_id": o["model"], "path": "stolen", "seq_id": 99}),
    Probe("save_weights_for_sampler", "POST", "/api/v1/save_weights_for_sampler", lambda o: "/save_weights_for_sampler",
          lambda o: {"model_id": o["model"], "path": "stolen", "seq_id": 99}),
    Probe("save_weights_external", "POST", "/api/v1/save_weights_external", lambda o: "/save_weights_external",
          lambda o: {"model_id": o["model"], "path": "stolen", "seq_id": 99}),
    Probe("unload_model", "POST", "/api/v1/unload_model", lambda o: "/unload_model", lambda o: {"model_id": o["model"]}),
    Probe("load_state from A's checkpoint", "POST", "/api/v1/load_weights", lambda o: "/load_weights",
          lambda o: {"model_id": o["b_model"], "seq_id": 99, "path": o["weights"], "optimizer": False}),
    Probe("create-from-state in A's session", "POST", "/api/v1/load_weights", lambda o: "/load_weights",
          lambda o: {"session_id": o["session"], "model_seq_id": 90, "path": o["b_weights"], "optimizer": False}),
    Probe("create_model in A's session", "POST", "/api/v1/create_model", lambda o: "/create_model",
          lambda o: {"session_id": o["session"], "model_seq_id": 91, "base_model": BASE, "lora_config": {"rank": 2}}),
    Probe("create_custom_loss in A's session", "POST", "/api/v1/create_custom_loss", lambda o: "/create_custom_loss",
          lambda o: {**o["loss_body"], "session_id": o["session"], "custom_loss_seq_id": 90}),
    Probe("A's custom loss on B's model", "POST", "/api/v1/forward_backward", lambda o: "/forward_backward",
          proto=lambda o: o["custom_proto"](o)),
    Probe("sampler on A's checkpoint", "POST", "/api/v1/create_sampling_session", lambda o: "/create_sampling_session",
          lambda o: {"session_id": o["b_session"], "sampling_session_seq_id": 90, "model_path": o["sampler"]}),
    Probe("sampler in A's session", "POST", "/api/v1/create_sampling_session", lambda o: "/create_sampling_session",
          lambda o: {"session_id": o["session"], "sampling_session_seq_id": 91, "base_model": BASE}),
    Probe("get_sampler", "GET", "/api/v1/samplers/{sampler_id}", lambda o: f"/samplers/{o['sampling']}"),
    Probe("asample on A's sampler", "POST", "/api/v1/asample", lambda o: "/asample", lambda o: {
        "sampling_session_id": o["sampling"], "seq_id": 99, "num_samples": 1, "sampling_params": {"max_tokens": 2},
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}]}}),
    Probe("asample on A's checkpoint", "POST", "/api/v1/asample", lambda o: "/asample", lambda o: {
        "model_path": o["sampler"], "num_samples": 1, "sampling_params": {"max_tokens": 2},
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}]}}),
    Probe("retrieve_future", "POST", "/api/v1/retrieve_future", lambda o: "/retrieve_future",
          lambda o: {"request_id": o["future"]}),
    Probe("retrieve_futures", "POST", "/api/v1/retrieve_futures", lambda o: "/retrieve_futures", lambda o: {
        "target": {"type": "sampling_session", "sampling_session_id": o["sampling"]}, "timeout": 0}),
    Probe("cancel_future", "POST", "/api/v1/cancel_future", lambda o: "/cancel_future",
          lambda o: {"request_id": o["future"]}),
    Probe("session_heartbeat", "POST", "/api/v1/session_heartbeat", lambda o: "/session_heartbeat",
          lambda o: {"session_id": o["session"]}),
    Probe("finish A's session", "POST", "/api/v1/sessions/{session_id}/finish",
          lambda o: f"/sessions/{o['session']}/finish", lambda o: {"reason": {"type": "success"}}),
    Probe("get_session", "GET", "/api/v1/sessions/{session_id}", lambda o: f"/sessions/{o['session']}"),
    Probe("assign project", "PUT", "/api/v1/sessions/{session_id}/project",
          lambda o: f"/sessions/{o['session']}/project", lambda o: {"project_id": "stolen"}),
    Probe("trace_export", "GET", "/api/v1/sessions/{session_id}/trace_export",
          lambda o: f"/sessions/{o['session']}/trace_export"),
    Probe("get_training_run", "GET", "/api/v1/training_runs/{model_id}", lambda o: f"/training_runs/{o['model']}"),
    Probe("list run checkpoints", "GET", "/api/v1/training_runs/{model_id}/checkpoints",
          lambda o: f"/training_runs/{o['model']}/checkpoints"),
    Probe("delete checkpoint", "DELETE", "/api/v1/training_runs/{model_id}/checkpoints/{segment}/{name}",
          lambda o: ckpt("weights/kept")(o)),
    Probe("publish", "POST", "/api/v1/training_runs/{model_id}/checkpoints/{segment}/{name}/publish",
          lambda o: ckpt("weights/kept")(o) + "/publish"),
    Probe("unpublish", "DELETE", "/api/v1/training_runs/{model_id}/checkpoints/{segment}/{name}/publish",
          lambda o: ckpt("weights/kept")(o) + "/publish"),
    Probe("set ttl", "PUT", "/api/v1/training_runs/{model_id}/checkpoints/{segment}/{name}/ttl",
          lambda o: ckpt("weights/kept")(o) + "/ttl", lambda o: {"ttl_seconds": 1}),
    Probe("download urls", "GET", "/api/v1/training_runs/{model_id}/checkpoints/{segment}/{name}/external_weights_urls",
          lambda o: ckpt("external_weights/ex")(o) + "/external_weights_urls"),
    Probe("archive (old SDKs)", "GET", "/api/v1/training_runs/{model_id}/checkpoints/{segment}/{name}/archive",
          lambda o: ckpt("weights/kept")(o) + "/archive"),
    Probe("weights_info", "POST", "/api/v1/weights_info", lambda o: "/weights_info",
          lambda o: {"tinker_path": o["weights"]}),
    Probe("copy_weights", "POST", "/api/v1/copy_weights", lambda o: "/copy_weights",
          lambda o: {"source_path": o["weights"], "destination_project_id": "stolen"}),
    Probe("export (peft)", "GET", "/twinkle/v1/export/{model_id}/{checkpoint_id:path}",
          lambda o: f"/export/{o['model']}/weights/kept", prefix="/twinkle/v1"),
    Probe("export (merged)", "GET", "/twinkle/v1/export/{model_id}/{checkpoint_id:path}",
          lambda o: f"/export/{o['model']}/sampler_weights/sw?format=merged", prefix="/twinkle/v1"),
    Probe("dashboard curve", "GET", "/twinkle/v1/dashboard/runs/{model_id}/curve",
          lambda o: f"/dashboard/runs/{o['model']}/curve", prefix="/twinkle/v1"),
    Probe("dashboard checkpoint link", "GET", "/twinkle/v1/dashboard/checkpoint_link",
          lambda o: f"/dashboard/checkpoint_link?path={o['weights']}", prefix="/twinkle/v1"),
    Probe("openai model", "GET", "/v1/models/{model:path}", lambda o: f"/models/{o['sampler']}", prefix="/v1"),
    Probe("openai completion", "POST", "/v1/completions", lambda o: "/completions",
          lambda o: {"model": o["sampler"], "prompt": "x", "max_tokens": 1}, prefix="/v1"),
    Probe("openai chat completion", "POST", "/v1/chat/completions", lambda o: "/chat/completions",
          lambda o: {"model": o["sampler"], "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
          prefix="/v1"),
    Probe("openai bridge model", "GET", "/api/v1/models/{model:path}", lambda o: f"/models/{o['sampler']}"),
    Probe("openai bridge completion", "POST", "/api/v1/completions", lambda o: "/completions",
          lambda o: {"model": o["sampler"], "prompt": "x", "max_tokens": 1}),
    Probe("openai bridge chat", "POST", "/api/v1/chat/completions", lambda o: "/chat/completions",
          lambda o: {"model": o["sampler"], "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
    Probe("native model op", "POST", "/api/v1/model/{base:path}/twinkle/{op}",
          lambda o: f"/model/{BASE}/twinkle/forward_backward",
          lambda o: {"adapter_name": "N", "inputs": [{"input_ids": [1, 2], "labels": [2, -100]}]}, native=True),
    Probe("native sampler adapter_uri", "POST", "/api/v1/sampler/{base:path}/twinkle/{op}",
          lambda o: f"/sampler/{BASE}/twinkle/sample",
          lambda o: {"inputs": [{"input_ids": [1, 2], "labels": [-100, -100]}], "sampling_params": {"max_tokens": 1},
                     "adapter_uri": o["sampler"].replace("tinker://", "twinkle://")}, native=True),
    Probe("native heartbeat", "POST", "/api/v1/twinkle/session_heartbeat", lambda o: "/twinkle/session_heartbeat",
          lambda o: {"session_id": o["native_session"]}, native=True),
    Probe("native training run", "GET", "/api/v1/twinkle/training_runs/{run_id}",
          lambda o: f"/twinkle/training_runs/{o['model']}", native=True),
    Probe("native run checkpoints", "GET", "/api/v1/twinkle/training_runs/{run_id}/checkpoints",
          lambda o: f"/twinkle/training_runs/{o['model']}/checkpoints", native=True),
    Probe("native checkpoint path", "GET", "/api/v1/twinkle/checkpoint_path/{run_id}/{checkpoint_id:path}",
          lambda o: f"/twinkle/checkpoint_path/{o['model']}/weights/kept", native=True),
    Probe("native delete checkpoint", "DELETE", "/api/v1/twinkle/training_runs/{run_id}/checkpoints/{checkpoint_id:path}",
          lambda o: f"/twinkle/training_runs/{o['model']}/checkpoints/weights/kept", native=True),
    Probe("native weights_info", "POST", "/api/v1/twinkle/weights_info", lambda o: "/twinkle/weights_info",
          lambda o: {"twinkle_path": o["weights"].replace("tinker://", "twinkle://")}, native=True),
    Probe("native processor call", "POST", "/api/v1/processor/twinkle/call", lambda o: "/processor/twinkle/call",
          lambda o: {"processor_id": o["pid"], "function": "__len__"}, native=True),
    Probe("native processor create", "POST", "/api/v1/processor/twinkle/create", lambda o: "/processor/twinkle/create",
          lambda o: {"processor_type": "dataloader", "class_type": "DataLoader", "dataset": o["pid"], "batch_size": 1},
          native=True),
    *(Probe(f"{what} ({prefix})", method, f"{prefix}/files/{{file_id}}{tail}", lambda o, tail=tail: f"/files/{o['file']}{tail}",
            prefix=prefix)
      for prefix in ("/v1", "/api/v1")
      for what, method, tail in (("file", "GET", ""), ("file content", "GET", "/content"), ("delete file", "DELETE", ""))),
]

NOT_OBJECT_SCOPED = {
    "/openapi.json": "API schema", "/docs": "API docs", "/docs/oauth2-redirect": "API docs", "/redoc": "API docs",
    "/api/v1/healthz": "no objects", "/api/v1/client/config": "no objects", "/api/v1/client/dynamic_config": "no objects",
    "/api/v1/telemetry": "write-only sink", "/api/v1/get_server_capabilities": "the served model, the same for all",
    "/api/v1/create_session": "creates the caller's own session",
    "/api/v1/training_runs": "lists the caller's own runs (checked below)",
    "/api/v1/checkpoints": "lists the caller's own checkpoints (checked below)",
    "/api/v1/sessions": "lists the caller's own sessions (checked below)",
    "/api/v1/sessions/search": "searches the caller's own sessions (checked below)",
    "/api/v1/training_runs/{model_id}/checkpoints/{rest:path}": "catch-all answering malformed checkpoint ids",
    "/api/v1/signed/{object_path:path}": "bearer links: a stranger cannot obtain one (download urls probe)",
    "/api/v1/audit": "hosted-only, 404 for everyone", "/api/v1/billing/usage/events": "hosted-only",
    "/api/v1/billing/usage/checkpoints/current": "hosted-only", "/api/v1/auth/apikey/me": "hosted-only",
    "/twinkle/v1/capacity": "the caller's own usage", "/twinkle/v1/status": "the caller's own usage",
    "/v1/models": "the base models and the caller's own checkpoints (tests/integration/test_openai_api.py)",
    "/v1/{rest:path}": "catch-all answering unknown /v1 routes",
    "/api/v1/models": "the base models and the caller's own checkpoints (the OpenAI bridge of the native API)",
    "/api/v1/twinkle/create_session": "creates the caller's own session",
    "/api/v1/twinkle/get_server_capabilities": "the served models, the same for all",
    "/api/v1/twinkle/healthz": "no objects", "/api/v1/twinkle/capacity_info": "the caller's own usage",
    "/api/v1/twinkle/training_runs": "lists the caller's own runs",
    "/v1/files": "uploads or lists the caller's own files (tests/unit/test_files_api.py)",
    "/api/v1/files": "uploads or lists the caller's own files (tests/unit/test_files_api.py)",
    "/dashboard": "the page, no data", "/dashboard/{asset}": "the page's script and style",
    "/twinkle/v1/dashboard/overview": "the caller's own objects, every tenant's for the admin (tests/unit/test_dashboard.py)",
    "/metrics": "counters by tenant id; the admin key in keys mode (tests/unit/test_metrics.py)",
    # Open: the served base models' tokenizer and config files, the same for all (docs/hf-files.md)
    "/hf/api/models/{repo_id:path}/tree/{revision}": "base models' tokenizer files (tests/unit/test_hf_files.py)",
    "/hf/api/models/{repo_id:path}/tree/{revision}/{path:path}": "base models' tokenizer files",
    "/hf/api/models/{repo_id:path}/revision/{revision}": "base models' tokenizer files",
    "/hf/api/models/{repo_id:path}": "base models' tokenizer files",
    "/hf/{repo_id:path}/resolve/{revision}/{filename:path}": "base models' tokenizer files",
}
ADMIN_PREFIX = "/twinkle/v1/admin"  # admin-key guarded, tested in tests/unit/test_admin.py


def test_every_route_is_probed_or_classified(server) -> None:
    from gateway.app import create_app
    from server.boot import build_runtime
    from server.config import Settings

    app = create_app(build_runtime(Settings(base_model=BASE)))
    routes = {r.path for r in app.routes}
    probed = {p.route for p in PROBES}
    unclassified = routes - probed - set(NOT_OBJECT_SCOPED) - {r for r in routes if r.startswith(ADMIN_PREFIX)}
    assert not unclassified, f"routes neither probed nor classified: {sorted(unclassified)}"


def neg_ll(logprobs: torch.Tensor, weights: torch.Tensor):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/neg_ll:sum": loss}


@pytest.fixture(scope="module")
def objects(server, token_rows) -> dict:
    """Tenant A's objects (and a few of B's own, for probes that mix them)."""
    a = tinker.ServiceClient(base_url=server.base_url, api_key=KEY_A)
    tc = a.create_lora_training_client(BASE, rank=4, seed=0).result()
    data = make_data(token_rows)
    fwd = tc.forward(data, "cross_entropy")
    weights = tc.save_state("kept").result().path
    sampler = tc.save_weights_for_sampler("sw").result().path
    tc.save_weights_external("ex").result()
    sampling = a.create_sampling_client(model_path=sampler).result()
    handle = a.create_custom_loss(neg_ll, {"logprobs": 1, "weights": 1}).result()
    b = tinker.ServiceClient(base_url=server.base_url, api_key=KEY_B)
    tb = b.create_lora_training_client(BASE, rank=4, seed=0).result()
    b_weights = tb.save_state("mine").result().path
    fwd.result()
    # A native adapter "N" of tenant A, in a native session.
    native = {"Authorization": f"Bearer {KEY_A}", "Twinkle-Authorization": f"Bearer {KEY_A}"}
    native_session = httpx.post(f"{server.base_url}/api/v1/twinkle/create_session", json={"metadata": None},
                                headers=native).json()["session_id"]
    lora = json.dumps({"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "_TWINKLE_TYPE_": "LoraConfig"})
    added = httpx.post(f"{server.base_url}/api/v1/model/{BASE}/twinkle/add_adapter_to_model", timeout=60,
                       json={"adapter_name": "N", "config": lora}, headers={**native, "X-Twinkle-Session-Id": native_session})
    assert added.status_code == 200, added.text
    objs = {
        "session": a.holder.get_session_id(), "native_session": native_session, "model": tc.model_id, "weights": weights, "sampler": sampler,
        "sampling": sampling._sampling_session_id,
        "loss_id": handle.loss_id, "data": data, "b_model": tb.model_id, "b_session": b.holder.get_session_id(),
        "b_weights": b_weights, "clients": (a, b, tc, sampling),
        "loss_body": {"name": "neg_ll", "inputs": [{"name": "logprobs", "rank": 1}, {"name": "weights", "rank": 1}],
                      "graph": {"format": 1, "nodes": []}},
    }
    objs["custom_proto"] = lambda o: custom_proto(o["b_model"], o["loss_id"], o["data"])
    # A server-side dataset of tenant A, in its native session (the processor app).
    rows = json.dumps({"data": [{"x": 1}], "_TWINKLE_TYPE_": "DatasetMeta"})
    made = httpx.post(f"{server.base_url}/api/v1/processor/twinkle/create", timeout=60,
                      json={"processor_type": "dataset", "class_type": "Dataset", "dataset_meta": rows},
                      headers={**native, "X-Twinkle-Session-Id": native_session})
    assert made.status_code == 200, made.text
    objs["pid"] = made.json()["processor_id"]
    uploaded = httpx.post(f"{server.base_url}/v1/files", files={"file": ("rows.jsonl", b'{"x": 1}\n')},
                          data={"purpose": "fine-tune"}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert uploaded.status_code == 200, uploaded.text
    objs["file"] = uploaded.json()["id"]
    # the SDK keeps request ids to itself: submit one directly
    submitted = httpx.post(f"{server.base_url}/api/v1/forward_backward", content=fwdbwd_proto(tc.model_id, data, seq_id=50),
                           headers={"X-API-Key": KEY_A, "Content-Type": "application/x-protobuf"}).json()
    objs["future"] = submitted["request_id"]
    yield objs
    a.close("success").result()
    b.close("success").result()


def custom_proto(model_id: str, loss_id: str, data: list) -> bytes:
    from tinker.proto.request_conv import forward_backward_request_to_proto

    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="custom", loss_fn_config={"loss_id": loss_id}),
        model_id=model_id, seq_id=98)
    return forward_backward_request_to_proto(request).SerializeToString()


def fake(objects: dict) -> dict:
    """The same shapes with ids that exist nowhere."""
    sess = f"sess-{secrets.token_hex(12)}"
    model = f"{sess}:train:0"
    return {**objects, "session": sess, "native_session": f"sess-{secrets.token_hex(12)}", "model": model,
            "sampling": f"{sess}:sample:0",
            "weights": f"tinker://{model}/weights/kept", "sampler": f"tinker://{model}/sampler_weights/sw",
            "future": f"req-{secrets.token_hex(12)}", "loss_id": f"loss-{secrets.token_hex(12)}",
            "pid": f"pid:{secrets.token_hex(16)}", "file": f"file-{secrets.token_hex(12)}"}


def send(server, probe: Probe, objs: dict) -> httpx.Response:
    url = f"{server.base_url}{probe.prefix}{probe.path(objs)}"
    headers = {"X-API-Key": KEY_B}
    if probe.native:  # tenant B, claiming tenant A's native session
        headers = {"Authorization": f"Bearer {KEY_B}", "X-Twinkle-Session-Id": objs["native_session"]}
    if probe.proto is not None:
        headers["Content-Type"] = "application/x-protobuf"
        return httpx.request(probe.method, url, content=probe.proto(objs), headers=headers, timeout=30)
    return httpx.request(probe.method, url, json=probe.json(objs) if probe.json else None, headers=headers, timeout=30)


def outcome(response: httpx.Response, objs: dict, server) -> tuple[int, str]:
    """Status and message, with the probed ids blanked so a real and a fake object compare."""
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        if response.status_code == 200 and "request_id" in body:  # accepted: the verdict is in the future
            body = httpx.post(f"{server.base_url}/api/v1/retrieve_future", json={"request_id": body["request_id"]},
                              headers={"X-API-Key": KEY_B}, timeout=30).json()
        text = str(body.get("error", body.get("detail", body)))
    else:
        text = f"<{response.headers.get('content-type')}>"
    for key in ("model", "session", "sampling", "weights", "sampler", "future", "loss_id", "pid", "file"):
        text = text.replace(str(objs[key]), f"<{key}>")
    text = re.sub(r"sess-[0-9a-f]{24}", "<sess>", text)
    return response.status_code, text


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_a_stranger_gets_not_found_exactly_as_for_a_missing_object(server, objects, probe) -> None:
    real = outcome(send(server, probe, objects), objects, server)
    missing_objs = fake(objects)
    missing = outcome(send(server, probe, missing_objs), missing_objs, server)
    assert real == missing, f"{probe.name}: {real} vs missing {missing}"
    assert real[0] == 404 and "not found" in real[1], real


def test_the_owners_objects_are_unchanged(server, objects, token_rows) -> None:
    a, _, tc, sampling = objects["clients"]
    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY_A)
    checkpoints = {c.checkpoint_id: c for c in rest.list_checkpoints(objects["model"]).result().checkpoints}
    assert set(checkpoints) == {"weights/kept", "sampler_weights/sw", "external_weights/ex"}
    assert not any(c.public or c.expires_at for c in checkpoints.values())
    session = rest.get_session(objects["session"]).result()
    assert session.training_run_ids == [objects["model"]]
    heartbeat = httpx.post(f"{server.base_url}/api/v1/session_heartbeat", json={"session_id": objects["session"]},
                           headers={"X-API-Key": KEY_A})
    assert heartbeat.status_code == 200  # not finished by the stranger
    assert tc.forward_backward(objects["data"], "cross_entropy").result().metrics["loss:sum"] > 0
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert len(sampling.sample(types.ModelInput.from_ints([5, 6]), 1, types.SamplingParams(max_tokens=2)).result()
               .sequences) == 1
    assert "stolen" not in str(rest.list_checkpoints(objects["model"]).result())
    strangers_view = tinker.RestClient(base_url=server.base_url, api_key=KEY_B)
    assert objects["model"] not in {r.training_run_id for r in strangers_view.list_training_runs().result().training_runs}
    assert not [c for c in strangers_view.list_user_checkpoints().result().checkpoints
                if c.tinker_path.startswith(f"tinker://{objects['model']}")]
    assert objects["session"] not in strangers_view.list_sessions().result().sessions
    owner = {"Authorization": f"Bearer {KEY_A}"}
    assert httpx.get(f"{server.base_url}/v1/files/{objects['file']}/content", headers=owner).content == b'{"x": 1}\n'
    stranger_files = httpx.get(f"{server.base_url}/v1/files", headers={"Authorization": f"Bearer {KEY_B}"}).json()
    assert objects["file"] not in {f["id"] for f in stranger_files["data"]}
