"""The native Twinkle API's model app over HTTP (FastAPI TestClient, a real runtime on tiny-qwen3):
the minimal flow as twinkle_client sends it, checkpoints shared with Tinker, isolation and bad
input answered with {"detail", "field"}."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from tests.support.http import local_client

BASE = "tiny-qwen3"
URL = f"/api/v1/model/{BASE}/twinkle"
ROWS = [[5, 9, 33, 71, 12, 8, 40], [7, 3, 99, 14, 5]]
INPUTS = [{"input_ids": r, "labels": r[1:] + [-100]} for r in ROWS]
LORA = json.dumps({"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0,
                   "_TWINKLE_TYPE_": "LoraConfig"})


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TestClient]:
    data_dir = tmp_path_factory.mktemp("native")
    (data_dir / "models").symlink_to(tiny_model_dir.parent)
    settings = Settings(data_dir=data_dir, base_model=BASE, torch_threads=1, long_poll_seconds=2)
    with local_client(create_app(build_runtime(settings))) as c:
        yield c


def session(client: TestClient, key: str = "tml-native-a") -> dict[str, str]:
    """Headers of a fresh session, as twinkle_client sends them (both auth headers)."""
    sid = client.post("/api/v1/create_session", headers={"X-API-Key": key},
                      json={"tags": [], "sdk_version": "twinkle"}).json()["session_id"]
    bearer = f"Bearer {key}"
    return {"Authorization": bearer, "Twinkle-Authorization": bearer, "X-Twinkle-Session-Id": sid}


def op(client: TestClient, headers: dict, name: str, body: dict | None = None, status: int = 200):
    answer = client.post(f"{URL}/{name}", headers=headers, json=body if body is not None else {})
    assert answer.status_code == status, answer.text
    return answer.json()


def test_the_minimal_flow(client: TestClient) -> None:
    h = session(client)
    assert op(client, h, "create") == {"status": "ok"}
    added = op(client, h, "add_adapter_to_model", {"adapter_name": "A", "config": LORA,
                                                   "gradient_accumulation_steps": 1})
    assert added["status"] == "ok" and added["adapter_name"].endswith("-A")
    assert op(client, h, "set_loss", {"adapter_name": "A", "loss_cls": "CrossEntropyLoss"}) is None
    assert op(client, h, "set_template", {"adapter_name": "A", "template_cls": "Template"}) is None
    assert op(client, h, "set_optimizer", {"adapter_name": "A", "optimizer_cls": "AdamW", "lr": 1e-2}) is None
    losses = []
    for _ in range(5):
        result = op(client, h, "forward_backward", {"adapter_name": "A", "inputs": INPUTS})["result"]
        losses.append(result["loss"])
        assert op(client, h, "clip_grad_and_step", {"adapter_name": "A", "max_grad_norm": 1.0, "norm_type": 2}) is None
    assert losses[-1] < losses[0]
    assert len(result["logps"]) == 2 and result["logits"] is None
    metric = op(client, h, "calculate_metric", {"adapter_name": "A", "is_training": True})["result"]
    assert isinstance(metric["loss"], str) and float(metric["loss"]) > 0
    saved = op(client, h, "save", {"adapter_name": "A", "name": "final"})
    assert saved["twinkle_path"] == f"twinkle://{added['adapter_name']}/weights/final"
    sampler = op(client, h, "save", {"adapter_name": "A", "name": "sampler", "is_sampler": True})
    again = op(client, h, "save", {"adapter_name": "A", "name": "sampler", "is_sampler": True})
    assert sampler["twinkle_path"] != again["twinkle_path"]  # a new path every time
    # twinkle:// and tinker:// name the same checkpoint: Tinker's REST API lists it.
    tinker = saved["twinkle_path"].replace("twinkle://", "tinker://")
    listed = client.get(f"/api/v1/training_runs/{added['adapter_name']}/checkpoints",
                        headers={"X-API-Key": "tml-native-a"}).json()["checkpoints"]
    assert tinker in [c["tinker_path"] for c in listed]
    assert op(client, h, "load", {"adapter_name": "A", "name": saved["twinkle_path"]}) is None


def test_resume_from_checkpoint_restores_the_optimizer_and_the_progress(client: TestClient) -> None:
    h = session(client)
    op(client, h, "add_adapter_to_model", {"adapter_name": "R", "config": LORA})
    op(client, h, "set_optimizer", {"adapter_name": "R", "optimizer_cls": "AdamW", "lr": 1e-2})
    op(client, h, "set_lr_scheduler", {"adapter_name": "R", "scheduler_cls": "StepLR", "step_size": 1, "gamma": 0.5})
    for _ in range(3):
        op(client, h, "forward_backward", {"adapter_name": "R", "inputs": INPUTS})
        op(client, h, "clip_grad_and_step", {"adapter_name": "R"})
    saved = op(client, h, "save", {"adapter_name": "R", "name": "mid", "save_optimizer": True,
                                   "consumed_train_samples": 6})
    weights_only = op(client, h, "save", {"adapter_name": "R", "name": "light"})
    # Training on, then back to the save: the next step must be the one the save would have taken.
    op(client, h, "forward_backward", {"adapter_name": "R", "inputs": INPUTS})
    op(client, h, "clip_grad_and_step", {"adapter_name": "R"})
    resumed = op(client, h, "resume_from_checkpoint", {"adapter_name": "R", "name": saved["twinkle_path"]})["result"]
    assert resumed == {"cur_step": 3, "consumed_train_samples": 6, "gradient_accumulation_steps": 1}
    after_resume = op(client, h, "forward_backward", {"adapter_name": "R", "inputs": INPUTS})["result"]["loss"]
    h2 = session(client)  # the same save resumed in a fresh adapter of another session gives the same loss
    op(client, h2, "add_adapter_to_model", {"adapter_name": "R", "config": LORA})
    op(client, h2, "resume_from_checkpoint", {"adapter_name": "R", "name": saved["twinkle_path"]})
    assert op(client, h2, "forward_backward", {"adapter_name": "R", "inputs": INPUTS})["result"]["loss"] == after_resume
    for headers in (h, h2):  # one more step each: equal only if the optimizer and scheduler state came back
        op(client, headers, "clip_grad_and_step", {"adapter_name": "R"})
    next_losses = [op(client, headers, "forward_backward", {"adapter_name": "R", "inputs": INPUTS})["result"]["loss"]
                   for headers in (h, h2)]
    assert next_losses[0] == pytest.approx(next_losses[1], abs=1e-6)
    fresh = session(client)  # the weights alone (no optimizer state): a different step
    op(client, fresh, "add_adapter_to_model", {"adapter_name": "R", "config": LORA})
    op(client, fresh, "resume_from_checkpoint", {"adapter_name": "R", "name": saved["twinkle_path"],
                                                "resume_only_model": True})
    op(client, fresh, "set_optimizer", {"adapter_name": "R", "optimizer_cls": "AdamW", "lr": 1e-2})
    op(client, fresh, "forward_backward", {"adapter_name": "R", "inputs": INPUTS})
    op(client, fresh, "clip_grad_and_step", {"adapter_name": "R"})
    other = op(client, fresh, "forward_backward", {"adapter_name": "R", "inputs": INPUTS})["result"]["loss"]
    assert other != pytest.approx(next_losses[0], abs=1e-6)
    answer = client.post(f"{URL}/resume_from_checkpoint", headers=h,
                         json={"adapter_name": "R", "name": weights_only["twinkle_path"]})
    assert answer.status_code == 400 and "optimizer" in answer.json()["detail"]  # saved without it


def test_another_session_or_tenant_cannot_reach_an_adapter(client: TestClient) -> None:
    h = session(client)
    op(client, h, "add_adapter_to_model", {"adapter_name": "B", "config": LORA})
    other_session = session(client)
    other_tenant = session(client, key="tml-native-b")
    for headers in (other_session, other_tenant):
        answer = client.post(f"{URL}/forward_backward", headers=headers, json={"adapter_name": "B", "inputs": INPUTS})
        assert answer.status_code == 404, answer.text
    stolen = {**other_tenant, "X-Twinkle-Session-Id": h["X-Twinkle-Session-Id"]}
    assert client.post(f"{URL}/forward_backward", headers=stolen,
                       json={"adapter_name": "B", "inputs": INPUTS}).status_code == 404


@pytest.mark.parametrize("name,body,status,field", [
    ("set_loss", {"loss_cls": "NoSuchLoss"}, 400, "loss_cls"),
    ("set_loss", {"loss_cls": "GRPOLoss", "epsilonn": 0.2}, 400, "epsilonn"),
    ("set_optimizer", {"optimizer_cls": "torch.optim.AdamW"}, 400, "optimizer_cls"),
    ("forward_backward", {"inputs": [{"input_ids": [1, 2, 3], "labels": [2, 3]}]}, 400, "inputs"),
    ("forward_backward", {"inputs": "not a list"}, 400, "inputs"),
    ("clip_grad_and_step", {"max_grad_norm": "big"}, 400, "max_grad_norm"),
    ("apply_patch", {"patch_cls": "X"}, 400, "op"),
    ("upload_to_hub", {}, 501, "op"),
    ("no_such_op", {}, 404, "op"),
    ("set_template", {}, 400, "template_cls"),
    ("set_template", {"template_cls": "os.system"}, 400, "template_cls"),
])
def test_bad_input_is_a_4xx_naming_the_field(client: TestClient, name: str, body: dict, status: int, field: str) -> None:
    h = session(client)
    op(client, h, "add_adapter_to_model", {"adapter_name": "C", "config": LORA})
    answer = client.post(f"{URL}/{name}", headers=h, json={"adapter_name": "C", **body})
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field and answer.json()["detail"].startswith(field)


@pytest.mark.parametrize("config,field", [
    (None, "config"),
    ("{not json", "config"),
    (json.dumps({"r": 0}), "config.r"),
    (json.dumps({"r": 4, "target_modules": ["q_proj"]}), "config.target_modules"),
    (json.dumps({"r": 4, "lora_dropout": 0.1}), "config.lora_dropout"),
])
def test_a_bad_lora_config_names_its_field(client: TestClient, config: str | None, field: str) -> None:
    answer = client.post(f"{URL}/add_adapter_to_model", headers=session(client),
                         json={"adapter_name": "D", "config": config})
    assert answer.status_code == 400 and answer.json()["field"] == field, answer.text


def test_calls_need_a_key_a_session_and_a_served_base(client: TestClient) -> None:
    h = session(client)
    assert client.post(f"{URL}/create", json={}).status_code == 401
    assert client.post("/api/v1/model/no-such-model/twinkle/create", headers=h, json={}).status_code == 404
    no_session = {k: v for k, v in h.items() if k != "X-Twinkle-Session-Id"}
    answer = client.post(f"{URL}/set_loss", headers=no_session, json={"adapter_name": "A", "loss_cls": "MSELoss"})
    assert answer.status_code == 400 and answer.json()["field"] == "X-Twinkle-Session-Id"
