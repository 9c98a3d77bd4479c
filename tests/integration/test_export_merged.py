"""Twinkle's export route (/twinkle/v1/export): a checkpoint as a plain peft folder, and as a full
model folder with the LoRA merged in, each computing what the server computes (fp32, 1e-5). The
adapter trains lm_head, which tiny-qwen3 ties to the input embedding: the merge must not move it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pyrage
import pytest
import tinker
import torch
from peft import PeftModel
from tinker import types
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.data import make_data
from tests.support.http import error
from tests.support.sdk import close

# peft warns that lm_head is tied when the test loads the peft export: the point of these tests.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")]
BASE, KEY, OTHER = "tiny-qwen3", "tml-merge", "tml-merge-other"


@pytest.fixture(scope="module")
def trained(server, token_rows):
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=KEY)
    tc = sc.create_lora_training_client(BASE, rank=4, seed=3).result()  # train_unembed: lm_head too
    data = make_data(token_rows)
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    tc.save_state("merge-state").result()
    tc.save_weights_for_sampler("merge-sampler").result()
    yield tc
    close(sc)


def export(server, model_id: str, checkpoint_id: str, fmt: str | None = None, key: str = KEY) -> httpx.Response:
    params = {} if fmt is None else {"format": fmt}
    return httpx.get(f"{server.base_url}/twinkle/v1/export/{model_id}/{checkpoint_id}", params=params,
                     headers={"X-API-Key": key}, timeout=300)


def download(links: dict[str, str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, url in links.items():
        (folder / name).write_bytes(httpx.get(url, timeout=60).raise_for_status().content)
    return folder


def logprobs_of(model: torch.nn.Module, row: list[int]) -> np.ndarray:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([row[:-1]])).logits[0].float(), dim=-1)
    return logprobs.gather(-1, torch.tensor(row[1:]).unsqueeze(-1)).squeeze(-1).numpy()


def served(tc: tinker.TrainingClient, row: list[int]) -> np.ndarray:
    return tc.forward(make_data([row]), "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def base_model(tiny_model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def test_peft_export_is_the_adapter_alone_and_loads_with_plain_peft(server, trained, token_rows, tiny_model_dir,
                                                                   tmp_path) -> None:
    answer = export(server, trained.model_id, "weights/merge-state")  # peft is the default
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["format"] == "peft" and set(body["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    model = PeftModel.from_pretrained(base_model(tiny_model_dir), str(download(body["files"], tmp_path))).eval()
    row = token_rows[1]
    np.testing.assert_allclose(logprobs_of(model, row), served(trained, row), atol=1e-5, rtol=0)


def test_merged_export_is_a_model_folder_computing_the_same_logprobs(server, trained, token_rows, tiny_model_dir,
                                                                     tmp_path) -> None:
    answer = export(server, trained.model_id, "sampler_weights/merge-sampler", "merged")
    assert answer.status_code == 200, answer.text
    files = answer.json()["files"]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= set(files)
    folder = download(files, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for row in token_rows[:2]:
        np.testing.assert_allclose(logprobs_of(merged, row), served(trained, row), atol=1e-5, rtol=0)
    # lm_head's LoRA went into an output embedding of its own; the input embedding is the base's.
    base = base_model(tiny_model_dir)
    assert merged.config.tie_word_embeddings is False
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(merged.get_output_embeddings().weight, base.get_output_embeddings().weight)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer("def f(x):")["input_ids"] == AutoTokenizer.from_pretrained(str(tiny_model_dir))("def f(x):")["input_ids"]


def test_a_merged_folder_is_built_once_and_removed_with_its_checkpoint(server, trained, data_dir) -> None:
    trained.save_weights_for_sampler("merge-doomed").result()
    first = export(server, trained.model_id, "sampler_weights/merge-doomed", "merged").json()["files"]
    again = export(server, trained.model_id, "sampler_weights/merge-doomed", "merged").json()["files"]
    object_path = urlparse(first["config.json"]).path.split("/signed/", 1)[1]  # merged/<checkpoint>/<version>/config.json
    assert object_path == urlparse(again["config.json"]).path.split("/signed/", 1)[1]
    folder = data_dir / "exports" / Path(object_path).parent
    assert (folder / "model.safetensors").is_file()
    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY)
    rest.delete_checkpoint_from_tinker_path(f"tinker://{trained.model_id}/sampler_weights/merge-doomed").result()
    assert not folder.parent.exists()
    assert httpx.get(first["config.json"], timeout=30).status_code == 404


def test_bad_exports_are_json_errors_naming_the_field(server, trained) -> None:
    assert error(export(server, trained.model_id, "weights/no-such"), 404)["field"] == "checkpoint_id"
    assert error(export(server, "no-such-run", "weights/merge-state", "merged"), 404)["field"] == "checkpoint_id"
    assert error(export(server, trained.model_id, "weights/merge-state", "zip"), 400)["field"] == "format"
    assert error(export(server, trained.model_id, "merge-state"), 400)["field"] == "checkpoint_id"
    for fmt in ("peft", "merged"):  # another tenant's unpublished checkpoint does not exist for them
        assert error(export(server, trained.model_id, "weights/merge-state", fmt, key=OTHER), 404)["field"] == \
            "checkpoint_id"


def test_an_encrypted_checkpoint_cannot_be_exported(server, trained) -> None:
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    trained.save_weights_external("merge-age", age_encryption_recipients=[recipient]).result()
    for fmt in ("peft", "merged"):
        body = error(export(server, trained.model_id, "external_weights/merge-age", fmt), 400)
        assert body["field"] == "checkpoint_id" and "encrypted" in body["error"]


def test_a_published_checkpoint_is_exported_for_every_tenant(server, trained) -> None:
    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY)
    path = trained.save_weights_for_sampler("merge-public").result().path
    rest.publish_checkpoint_from_tinker_path(path).result()
    answer = export(server, trained.model_id, "sampler_weights/merge-public", key=OTHER)
    assert answer.status_code == 200 and set(answer.json()["files"]) == {"adapter_config.json",
                                                                       "adapter_model.safetensors"}
