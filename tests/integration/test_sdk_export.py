"""Exporting an adapter (save_weights_external, optionally age-encrypted) and downloading it through
the signed URLs; unloading a model."""

from __future__ import annotations

import httpx
import numpy as np
import pyrage
import pytest
import tinker
import torch
from peft import PeftModel
from safetensors.torch import load as load_safetensors
from tinker import types
from transformers import AutoModelForCausalLM

from tests.support.data import fwdbwd_proto, make_data

pytestmark = pytest.mark.slow
BASE, KEY = "tiny-qwen3", "tml-export"


def download(rest: tinker.RestClient, path: str) -> dict[str, bytes]:
    urls = rest.get_external_weights_urls(path).result().urls
    return {name: httpx.get(url, timeout=30).raise_for_status().content for name, url in urls.items()}


@pytest.fixture(scope="module")
def trained(server, token_rows):
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=KEY)
    tc = sc.create_lora_training_client(BASE, rank=4, seed=3).result()
    data = make_data(token_rows)
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    yield tc
    sc.close("success").result()


def test_exported_adapter_loads_with_plain_peft(server, trained, token_rows, tiny_model_dir, tmp_path) -> None:
    saved = trained.save_weights_external("export-plain").result()
    assert saved.path == f"tinker://{trained.model_id}/external_weights/export-plain"
    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY)
    listed = {c.checkpoint_id: c for c in rest.list_checkpoints(trained.model_id).result().checkpoints}
    assert listed["external_weights/export-plain"].checkpoint_type == "external"
    files = download(rest, saved.path)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(files)
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    row = token_rows[1]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([row[:-1]])).logits[0], dim=-1)
    expected = logprobs.gather(-1, torch.tensor(row[1:]).unsqueeze(-1)).squeeze(-1).numpy()
    served = trained.forward(make_data([row]), "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)


def test_export_encrypted_to_an_age_recipient(server, trained) -> None:
    identity = pyrage.x25519.Identity.generate()
    saved = trained.save_weights_external("export-age", age_encryption_recipients=[str(identity.to_public())]).result()
    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY)
    files = download(rest, saved.path)
    assert files and all(name.endswith(".age") for name in files)
    weights = pyrage.decrypt(files["adapter_model.safetensors.age"], [identity])
    plain = download(rest, f"tinker://{trained.model_id}/external_weights/export-plain")["adapter_model.safetensors"]
    a, b = load_safetensors(weights), load_safetensors(plain)  # no step in between: the same weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_with_a_bad_recipient_names_it(trained) -> None:
    with pytest.raises(tinker.BadRequestError) as err:
        trained.save_weights_external("export-bad", age_encryption_recipients=["age1notakey"]).result()
    assert "age_encryption_recipients[0]" in str(err.value)


def test_unload_model_frees_it_and_later_steps_say_so(server, token_rows) -> None:
    key = {"X-API-Key": "tml-unload"}
    with tinker.ServiceClient(base_url=server.base_url, api_key="tml-unload") as sc:
        tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
        path = tc.save_state("before-unload").result().path
        api = f"{server.base_url}/api/v1"
        submitted = httpx.post(f"{api}/unload_model", json={"model_id": tc.model_id}, headers=key).json()
        done = httpx.post(f"{api}/retrieve_future", json={"request_id": submitted["request_id"]}, headers=key,
                          timeout=30).json()
        assert done == {"model_id": tc.model_id, "type": "unload_model"}
        step = httpx.post(f"{api}/forward_backward", content=fwdbwd_proto(tc.model_id, make_data(token_rows), seq_id=2),
                          headers={**key, "Content-Type": "application/x-protobuf"}).json()
        failed = httpx.post(f"{api}/retrieve_future", json={"request_id": step["request_id"]}, headers=key,
                            timeout=30).json()
        assert failed["category"] == "user" and "unloaded" in failed["error"]
        resumed = sc.create_training_client_from_state(path).result()  # its checkpoints stay usable
        assert len(resumed.forward(make_data(token_rows), "cross_entropy").result().loss_fn_outputs) == len(token_rows)
        stranger = httpx.post(f"{api}/unload_model", json={"model_id": tc.model_id}, headers={"X-API-Key": "tml-other"})
        assert stranger.status_code == 404
