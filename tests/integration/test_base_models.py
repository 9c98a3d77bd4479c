"""One server, several base models (--base-model repeated): each request goes to its own model's
engine, chosen by the base model it names, or by its model, checkpoint or sampler."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import types
from transformers import AutoModelForCausalLM

from server.process import running_server
from tests.support.data import make_data
from workers.base_models import TINY_LLAMA, TINY_QWEN3, resolve_base_model

pytestmark = pytest.mark.slow
KEY = "tml-two-models"


def base_logprobs(model_dir, row: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([row[:-1]])).logits[0], dim=-1)
    return logprobs.gather(-1, torch.tensor(row[1:]).unsqueeze(-1)).squeeze(-1).numpy()


def test_two_base_models_on_one_server(tmp_path, tiny_model_dir, token_rows) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / TINY_QWEN3).symlink_to(tiny_model_dir)
    llama_dir = resolve_base_model(TINY_LLAMA, tmp_path)
    row = token_rows[1]
    with running_server(tmp_path, base_model=TINY_QWEN3, extra_args=["--base-model", TINY_LLAMA]) as server:
        with tinker.ServiceClient(base_url=server.base_url, api_key=KEY) as sc:
            served = sc.get_server_capabilities().supported_models
            assert [m.model_name for m in served] == [TINY_QWEN3, TINY_LLAMA]
            clients = {name: sc.create_lora_training_client(name, rank=4, seed=0).result()
                       for name in (TINY_QWEN3, TINY_LLAMA)}
            for name, model_dir in ((TINY_QWEN3, tiny_model_dir), (TINY_LLAMA, llama_dir)):
                tc = clients[name]
                # A fresh adapter changes nothing: the logprobs are those of the base model it is on.
                got = tc.forward(make_data([row]), "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
                np.testing.assert_allclose(got, base_logprobs(model_dir, row), atol=1e-5, rtol=0)
                assert tc.get_info().model_data.model_name == name
                tc.forward_backward(make_data(token_rows), "cross_entropy").result()
                tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
                sampler = tc.save_weights_and_get_sampling_client().result()
                out = sampler.sample(types.ModelInput.from_ints(row[:4]), 1, types.SamplingParams(max_tokens=3)).result()
                assert len(out.sequences[0].tokens) == 3
                # A training client made from its checkpoint is on the same base model.
                path = tc.save_state(f"state-{name}").result().path
                resumed = sc.create_training_client_from_state(path).result()
                assert resumed.get_info().model_data.model_name == name
            bare = sc.create_sampling_client(base_model=TINY_LLAMA)
            prompt = types.ModelInput.from_ints(row[:4])
            assert bare.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result().sequences
            refused = httpx.post(f"{server.base_url}/api/v1/create_model", headers={"X-API-Key": KEY}, json={
                "session_id": sc.holder.get_session_id(), "model_seq_id": 99, "base_model": "tiny-gpt",
                "lora_config": {"rank": 2}})
            assert refused.status_code == 400 and refused.json()["field"] == "base_model"
            assert f"serves '{TINY_QWEN3}', '{TINY_LLAMA}'" in refused.json()["error"]
        status = httpx.get(f"{server.base_url}/twinkle/v1/status", headers={"X-API-Key": KEY}).json()
        assert status["base_models"] == [TINY_QWEN3, TINY_LLAMA] and set(status["capacity"]["pools"]) == {
            TINY_QWEN3, TINY_LLAMA}
