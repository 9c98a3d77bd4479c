"""The native Twinkle API's processor app (server-side datasets and data loaders) over HTTP (FastAPI
TestClient, a real runtime on tiny-qwen3), and Twinkle's template encoding on a character-level
tokenizer whose renders are easy to read. The real client: tests/integration/test_twinkle_client.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from server.errors import InvalidRequest
from server.ops import native_data, native_store
from server.ops.native_encode import DataTemplate, encode_row
from tests.support.http import local_client

BASE = "tiny-qwen3"
URL = "/api/v1/processor/twinkle"
KEY, OTHER = "tml-native-data", "tml-native-data-other"
CHATS = [
    {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
    for i in range(5)
]
LORA = json.dumps({"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0,
                   "_TWINKLE_TYPE_": "LoraConfig"})


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TestClient]:
    data_dir = tmp_path_factory.mktemp("native-data")
    (data_dir / "models").symlink_to(tiny_model_dir.parent)
    settings = Settings(data_dir=data_dir, base_model=BASE, torch_threads=1, long_poll_seconds=2)
    with local_client(create_app(build_runtime(settings))) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def session(client: TestClient, key: str = KEY) -> dict[str, str]:
    """Headers of a fresh session, as twinkle_client sends them."""
    sid = client.post("/api/v1/create_session", headers={"X-API-Key": key},
                      json={"tags": [], "sdk_version": "twinkle"}).json()["session_id"]
    bearer = f"Bearer {key}"
    return {"Authorization": bearer, "Twinkle-Authorization": bearer, "X-Twinkle-Session-Id": sid}


def meta(rows: Any = CHATS, **fields: Any) -> str:
    """DatasetMeta as the client serialises it: a JSON string tagged with its type."""
    return json.dumps({"dataset_id": "", "subset_name": "default", "split": "train", "data_slice": None,
                       "data": rows, **fields, "_TWINKLE_TYPE_": "DatasetMeta"})


def make(client: TestClient, h: dict, processor_type: str, class_type: str, status: int = 200, **kwargs: Any):
    answer = client.post(f"{URL}/create", headers=h,
                         json={"processor_type": processor_type, "class_type": class_type, **kwargs})
    assert answer.status_code == status, answer.text
    return answer.json()["processor_id"] if status == 200 else answer.json()


def run(client: TestClient, h: dict, pid: str, function: str, status: int = 200, **kwargs: Any):
    answer = client.post(f"{URL}/call", headers=h, json={"processor_id": pid, "function": function, **kwargs})
    assert answer.status_code == status, answer.text
    body = json.loads(answer.text, parse_constant=lambda c: pytest.fail(f"the answer holds {c}"))
    if status != 200:
        assert set(body) == {"detail", "field"} and "Traceback" not in answer.text
        return body
    return body["result"]


def dataset(client: TestClient, h: dict, rows: Any = CHATS, class_type: str = "Dataset", **template: Any) -> str:
    pid = make(client, h, "dataset", class_type, dataset_meta=meta(rows))
    assert run(client, h, pid, "set_template", template_func="Template", model_id=f"ms://{BASE}", **template) is None
    return pid


def trained_text(tokenizer, feature: dict) -> str:
    """What the labels train, as text (labels are next-token aligned: labels[i] predicts input_ids[i+1])."""
    ids, labels = feature["input_ids"], feature["labels"]
    for i, label in enumerate(labels):
        assert label == -100 or label == ids[i + 1]
    assert labels[-1] == -100
    return tokenizer.decode([t for t in labels if t != -100])


# ----- datasets ------------------------------------------------------------------------------------
def test_a_dataset_of_chats_encodes_as_twinkles_template(client: TestClient, tokenizer) -> None:
    h = session(client)
    pid = dataset(client, h)
    assert run(client, h, pid, "__len__") == 5
    assert run(client, h, pid, "__getitem__", idx=1) == CHATS[1]
    assert run(client, h, pid, "encode", add_generation_prompt=False, batched=True) is None
    row = run(client, h, pid, "__getitem__", idx=1)
    chat = tokenizer.apply_chat_template(CHATS[1]["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert row["input_ids"] == list(chat) and row["messages"] == CHATS[1]["messages"]
    assert trained_text(tokenizer, row) == "Answer 1.<|im_end|>\n"  # the assistant's content and end of turn
    n = len(chat)
    assert row["attention_mask"] == [1] * n and row["position_ids"] == list(range(n)) and row["length"] == n
    assert run(client, h, pid, "__getitem__", idx=-1)["input_ids"][-3:] == run(client, h, pid, "__getitem__", idx=4)[
        "input_ids"][-3:]


def test_add_generation_prompt_trains_nothing(client: TestClient, tokenizer) -> None:
    h = session(client)
    pid = dataset(client, h, [{"messages": CHATS[0]["messages"][:1]}])
    run(client, h, pid, "encode", add_generation_prompt=True)
    row = run(client, h, pid, "__getitem__", idx=0)
    assert set(row["labels"]) == {-100}
    assert tokenizer.decode(row["input_ids"]).endswith("<|im_start|>assistant\n")


def test_named_preprocessors_map_rows_to_chats(client: TestClient, tokenizer) -> None:
    h = session(client)
    rows = [{"query": "Who are you?", "response": "I am {{NAME}}, made by {{AUTHOR}}."}]
    pid = dataset(client, h, rows)
    run(client, h, pid, "map", preprocess_func="SelfCognitionProcessor", dataset_meta=None,
        init_args={"model_name": "Twinkle", "model_author": "us"})
    row = run(client, h, pid, "__getitem__", idx=0)
    assert row["query"] == "Who are you?"  # the preprocessor's columns are merged in, as datasets.map does
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][2]["content"] == "I am Twinkle, made by us."
    run(client, h, pid, "encode")
    assert trained_text(tokenizer, run(client, h, pid, "__getitem__", idx=0)) == "I am Twinkle, made by us.<|im_end|>\n"

    alpaca = dataset(client, h, [{"instruction": "Add", "input": "1 and 2", "output": "3"}])
    run(client, h, alpaca, "map", preprocess_func="AlpacaProcessor", remove_columns=["instruction"])
    row = run(client, h, alpaca, "__getitem__", idx=0)
    assert "instruction" not in row and row["messages"][0] == {"role": "user", "content": "Add\n1 and 2"}
    gsm = dataset(client, h, [{"question": "2+2?", "answer": "It is 4.\n#### 4"}])
    run(client, h, gsm, "map", preprocess_func="GSM8KProcessor")
    assert run(client, h, gsm, "__getitem__", idx=0)["user_data"] == [["ground_truth", "4"]]
    share = dataset(client, h, [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    run(client, h, share, "map", preprocess_func="ShareGPTProcessor")
    assert run(client, h, share, "__getitem__", idx=0)["messages"][1] == {"role": "assistant", "content": "yo"}


def test_filters_and_check(client: TestClient) -> None:
    h = session(client)
    rows = [*CHATS[:2], {"messages": [{"role": "user", "content": "alone"}]}, {"messages": "not a chat"}]
    pid = dataset(client, h, rows)
    run(client, h, pid, "filter", filter_func="HasAssistantFilter")
    assert run(client, h, pid, "__len__") == 2
    bad = run(client, h, pid, "filter", 400, filter_func="MaxLengthFilter", init_args={"max_length": 4})
    assert bad["field"] == "filter_func" and "encode first" in bad["detail"]
    run(client, h, pid, "encode")
    run(client, h, pid, "filter", filter_func="MaxLengthFilter", init_args={"max_length": 4})
    assert run(client, h, pid, "__len__") == 0
    checked = dataset(client, h, rows)
    run(client, h, checked, "check")  # the row that is not a chat does not encode
    assert run(client, h, checked, "__len__") == 3
    kept = dataset(client, h, [{"a": "x", "b": ""}, {"a": "y", "b": "z"}])
    run(client, h, kept, "filter", filter_func="NonEmptyFilter", init_args={"columns": ["a", "b"]})
    assert run(client, h, kept, "__getitem__", idx=0) == {"a": "y", "b": "z"}


def test_max_length_and_truncation(client: TestClient) -> None:
    h = session(client)
    long_chat = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    rows = [CHATS[0], long_chat]
    raising = dataset(client, h, rows, max_length=30)
    answer = run(client, h, raising, "encode", 400)
    assert answer["field"] == "dataset[1]" and "max_length 30" in answer["detail"]
    assert run(client, h, raising, "__len__") == 2  # nothing changed
    for strategy, count, length in (("delete", 1, None), ("left", 2, 30), ("right", 2, 30)):
        pid = dataset(client, h, rows, max_length=30, truncation_strategy=strategy)
        run(client, h, pid, "encode")
        assert run(client, h, pid, "__len__") == count
        if length:
            feature = run(client, h, pid, "__getitem__", idx=1)
            assert len(feature["input_ids"]) == length == len(feature["labels"]) and feature["labels"][-1] == -100
    checked = dataset(client, h, rows, max_length=30)
    run(client, h, checked, "check")
    assert run(client, h, checked, "__len__") == 1


def test_a_lazy_dataset_encodes_each_row_when_read(client: TestClient, tokenizer) -> None:
    h = session(client)
    long_chat = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    pid = dataset(client, h, [*CHATS[:2], long_chat], class_type="LazyDataset", max_length=30,
                  truncation_strategy="delete")
    run(client, h, pid, "encode")
    assert run(client, h, pid, "__len__") == 3  # not encoded yet: a dropped row shows when read
    assert trained_text(tokenizer, run(client, h, pid, "__getitem__", idx=0)) == "Answer 0.<|im_end|>\n"
    assert run(client, h, pid, "__getitem__", idx=2) is None
    loader = make(client, h, "dataloader", "DataLoader", dataset=pid, batch_size=2)
    assert [len(b) for b in iterate(client, h, loader)] == [2]  # the dropped row is passed over


def test_add_and_mix_datasets(client: TestClient) -> None:
    h = session(client)
    a = [{"x": f"a{i}"} for i in range(3)]
    b = [{"x": f"b{i}"} for i in range(2)]
    pid = make(client, h, "dataset", "Dataset", dataset_meta=meta(a))
    run(client, h, pid, "add_dataset", dataset_meta=meta(b))
    assert run(client, h, pid, "__len__") == 3  # before mixing, the first dataset is what shows (Twinkle's)
    run(client, h, pid, "map", preprocess_func="AlpacaProcessor", dataset_meta=meta(b))  # only the second
    run(client, h, pid, "mix_dataset", interleave=True)
    mixed = [run(client, h, pid, "__getitem__", idx=i) for i in range(run(client, h, pid, "__len__"))]
    assert [r["x"] for r in mixed] == ["a0", "b0", "a1", "b1"] and "messages" in mixed[1] and "messages" not in mixed[0]
    run(client, h, pid, "mix_dataset", interleave=False)
    assert run(client, h, pid, "__len__") == 5
    sliced = make(client, h, "dataset", "Dataset",
                  dataset_meta=meta(a, data_slice={"_slice_type_": "range", "start": 1, "stop": 5, "step": 1}))
    assert [run(client, h, sliced, "__getitem__", idx=i)["x"] for i in range(4)] == ["a1", "a2", "a0", "a1"]
    columns = make(client, h, "dataset", "Dataset", dataset_meta=meta({"x": ["c0", "c1"]}))
    assert run(client, h, columns, "__getitem__", idx=1) == {"x": "c1"}


# ----- data loaders --------------------------------------------------------------------------------
def iterate(client: TestClient, h: dict, loader: str) -> list[list[dict]]:
    """As the client's for loop: __iter__, then __next__ until the 410."""
    assert run(client, h, loader, "__iter__") == "ok"
    batches = []
    while True:
        answer = client.post(f"{URL}/call", headers=h, json={"processor_id": loader, "function": "__next__"})
        if answer.status_code == 410:
            assert answer.json() == {"detail": "Iterator exhausted", "field": None}
            return batches
        assert answer.status_code == 200, answer.text
        batches.append(answer.json()["result"])


def test_a_data_loader_serves_batches_then_410(client: TestClient) -> None:
    h = session(client)
    pid = dataset(client, h)
    run(client, h, pid, "encode")
    loader = make(client, h, "dataloader", "DataLoader", dataset=pid, batch_size=2, num_workers=0)
    assert run(client, h, loader, "__len__") == 3
    batches = iterate(client, h, loader)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [r["messages"] for b in batches for r in b] == [c["messages"] for c in CHATS]
    assert all({"input_ids", "labels", "attention_mask", "position_ids", "length"} <= set(r) for b in batches for r in b)
    assert run(client, h, loader, "__next__", 410) == {"detail": "Iterator exhausted", "field": None}  # stays ended
    assert run(client, h, loader, "get_state") == {"consumed_train_samples": 5}
    dropping = make(client, h, "dataloader", "DataLoader", dataset=pid, batch_size=2, drop_last=True)
    assert run(client, h, dropping, "__len__") == 2 and [len(b) for b in iterate(client, h, dropping)] == [2, 2]
    fresh = make(client, h, "dataloader", "DataLoader", dataset=pid, batch_size=3)
    assert len(run(client, h, fresh, "__next__")) == 3  # next() without iter() begins the first epoch


def test_shuffle_is_seeded_and_skip_resumes(client: TestClient) -> None:
    h = session(client)
    pid = make(client, h, "dataset", "Dataset", dataset_meta=meta([{"i": i} for i in range(10)]))

    def order(loader: str) -> list[int]:
        return [r["i"] for b in iterate(client, h, loader) for r in b]

    one = make(client, h, "dataloader", "DataLoader", dataset=pid, batch_size=4, shuffle=True, seed=7)
    two = make(client, h, "dataloader", "DataLoader", dataset=pid, batch_size=4, shuffle=True, seed=7)
    first = order(one)
    assert sorted(first) == list(range(10)) and first != list(range(10)) and order(two) == first
    assert order(one) != first  # the next epoch has its own order
    resumed = make(client, h, "dataloader", "DataLoader", dataset=pid, batch_size=4, shuffle=True, seed=7)
    run(client, h, resumed, "resume_from_checkpoint", consumed_train_samples=4)
    assert order(resumed) == first[4:]  # the rest of the first epoch
    assert run(client, h, resumed, "get_state") == {"consumed_train_samples": 10}
    run(client, h, resumed, "skip_consumed_samples", consumed_train_samples=18)
    assert order(resumed) == order(two)[8:]  # epoch 1 (two's second), from its ninth row
    assert run(client, h, resumed, "set_processor", processor_cls="InputProcessor", padding_side="right") is None
    proc = make(client, h, "processor", "InputProcessor", padding_free=False, framework="transformers")
    assert run(client, h, resumed, "set_processor", processor_cls=proc) is None
    refused = run(client, h, proc, "__call__", 400, inputs=[])
    assert refused["field"] == "function" and "forward_backward" in refused["detail"]


def test_batches_feed_forward_backward(client: TestClient) -> None:
    h = session(client)
    pid = dataset(client, h)
    run(client, h, pid, "encode")
    loader = make(client, h, "dataloader", "DataLoader", dataset=pid, batch_size=2)
    model = f"/api/v1/model/{BASE}/twinkle"
    assert client.post(f"{model}/add_adapter_to_model", headers=h,
                       json={"adapter_name": "D", "config": LORA}).status_code == 200
    for batch in iterate(client, h, loader)[:2]:
        answer = client.post(f"{model}/forward_backward", headers=h, json={"adapter_name": "D", "inputs": batch})
        assert answer.status_code == 200, answer.text
        result = answer.json()["result"]
        assert result["loss"] > 0 and result["num_tokens"] == sum(
            sum(t != -100 for t in r["labels"]) for r in batch)


# ----- datasets from uploaded files ----------------------------------------------------------------
def uploaded(client: TestClient, key: str, content: bytes, name: str = "chats.jsonl") -> str:
    answer = client.post("/v1/files", headers={"Authorization": f"Bearer {key}"},
                         files={"file": (name, content)}, data={"purpose": "fine-tune"})
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def file_meta(file_id: str, **fields: Any) -> str:
    return meta(None, dataset_id=file_id, **fields)


def test_a_dataset_reads_a_file_the_tenant_uploaded(client: TestClient, tokenizer) -> None:
    jsonl = "".join(json.dumps(row) + "\n" for row in CHATS).encode()
    file_id = uploaded(client, KEY, jsonl)
    h = session(client)
    for name in (file_id, f"file://{file_id}"):
        pid = make(client, h, "dataset", "Dataset", dataset_meta=file_meta(name))
        assert run(client, h, pid, "__len__") == 5 and run(client, h, pid, "__getitem__", idx=2) == CHATS[2]
    sliced = make(client, h, "dataset", "Dataset", dataset_meta=file_meta(
        file_id, data_slice={"_slice_type_": "range", "start": 1, "stop": 3, "step": 1}))
    assert run(client, h, sliced, "__len__") == 2 and run(client, h, sliced, "__getitem__", idx=0) == CHATS[1]
    run(client, h, sliced, "add_dataset", dataset_meta=file_meta(file_id))
    run(client, h, sliced, "filter", filter_func="HasAssistantFilter", dataset_meta=file_meta(file_id))
    csv_id = uploaded(client, KEY, b"instruction,output\nSay hi.,hi\n", "alpaca.csv")
    alpaca = make(client, h, "dataset", "Dataset", dataset_meta=file_meta(csv_id))
    run(client, h, alpaca, "map", preprocess_func="AlpacaProcessor")
    assert run(client, h, alpaca, "__getitem__", idx=0)["messages"][-1] == {"role": "assistant", "content": "hi"}


def test_a_file_dataset_is_the_uploaders_alone_and_bounded(client: TestClient, monkeypatch) -> None:
    file_id = uploaded(client, KEY, b'{"q": 1}\n{"q": 2}\n{"q": 3}\n')
    other = make(client, session(client, OTHER), "dataset", "Dataset", 404, dataset_meta=file_meta(file_id))
    missing = make(client, session(client, OTHER), "dataset", "Dataset", 404,
                   dataset_meta=file_meta("file-" + "0" * 24))
    assert other["field"] == "dataset_meta.dataset_id"
    assert other["detail"].replace(file_id, "X") == missing["detail"].replace("file-" + "0" * 24, "X")
    h = session(client)
    monkeypatch.setattr(native_data, "MAX_ROWS", 2)
    assert make(client, h, "dataset", "Dataset", 400, dataset_meta=file_meta(file_id))["field"] == \
        "dataset_meta.dataset_id"
    monkeypatch.undo()
    client.delete(f"/v1/files/{file_id}", headers={"Authorization": f"Bearer {KEY}"})
    assert make(client, h, "dataset", "Dataset", 404, dataset_meta=file_meta(file_id))["field"] == \
        "dataset_meta.dataset_id"


@pytest.mark.parametrize("fields,field", [
    ({"dataset_id": "ms://swift/self-cognition"}, "dataset_meta.dataset_id"),
    ({"dataset_id": "file:///etc/passwd"}, "dataset_meta.dataset_id"),
    ({"dataset_id": "file-../../x"}, "dataset_meta.dataset_id"),
    ({"dataset_id": "file-" + "0" * 24, "split": "test"}, "dataset_meta.split"),
    ({"dataset_id": "file-" + "0" * 24, "subset_name": "zh"}, "dataset_meta.subset_name"),
    ({"dataset_id": "file-" + "0" * 24, "data_slice": "1:3"}, "dataset_meta.data_slice"),
])
def test_a_dataset_id_names_an_uploaded_file_or_is_a_400(client: TestClient, fields: dict, field: str) -> None:
    refused = make(client, session(client), "dataset", "Dataset", 400, dataset_meta=meta(None, **fields))
    assert refused["field"] == field, refused


# ----- isolation, sessions, bounds -----------------------------------------------------------------
def test_another_tenant_or_session_sees_nothing(client: TestClient) -> None:
    h = session(client)
    pid = dataset(client, h)
    stolen = {**session(client, OTHER), "X-Twinkle-Session-Id": h["X-Twinkle-Session-Id"]}
    for other, field in ((session(client), "dataset"), (session(client, OTHER), "dataset"),
                         (stolen, "X-Twinkle-Session-Id")):
        found = run(client, other, pid, "__len__", 404)
        missing = run(client, other, "pid:" + "0" * 32, "__len__", 404)
        assert found["detail"].replace(pid, "X") == missing["detail"].replace("pid:" + "0" * 32, "X")
        assert make(client, other, "dataloader", "DataLoader", 404, dataset=pid, batch_size=1)["field"] == field


def test_objects_end_with_their_session(client: TestClient) -> None:
    h = session(client)
    pid = dataset(client, h)
    sid = h["X-Twinkle-Session-Id"]
    finish = client.post(f"/api/v1/sessions/{sid}/finish", headers={"X-API-Key": KEY},
                         json={"reason": {"type": "success"}})
    assert finish.status_code == 200, finish.text
    assert run(client, h, pid, "__len__", 404)["field"] == "X-Twinkle-Session-Id"  # 404, never a 410
    assert pid not in native_store.STORE.entries
    h2 = session(client)
    pid2 = dataset(client, h2)
    assert native_store.drop_session(h2["X-Twinkle-Session-Id"]) == 1
    assert run(client, h2, pid2, "__len__", 404)["field"] == "processor_id"


def test_bounds_per_tenant(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    h = session(client, "tml-native-data-bounds")
    monkeypatch.setattr(native_data, "MAX_ROWS", 8)
    first = make(client, h, "dataset", "Dataset", dataset_meta=meta(CHATS))
    over = make(client, h, "dataset", "Dataset", 400, dataset_meta=meta(CHATS))
    assert over["field"] == "dataset_meta.data" and "8" in over["detail"]
    assert run(client, h, first, "add_dataset", 400, dataset_meta=meta(CHATS[:4]))["field"] == "dataset_meta.data"
    monkeypatch.setattr(native_data, "MAX_ROWS", 100_000)
    monkeypatch.setattr(native_data, "MAX_BYTES", 1000)
    assert make(client, h, "dataset", "Dataset", 400, dataset_meta=meta(CHATS * 4))["field"] == "dataset_meta.data"
    monkeypatch.setattr(native_data, "MAX_OBJECTS", 2)
    make(client, h, "processor", "InputProcessor")
    assert make(client, h, "processor", "InputProcessor", 400)["field"] == "processor_type"
    client.post(f"/api/v1/sessions/{h['X-Twinkle-Session-Id']}/finish", headers={"X-API-Key": "tml-native-data-bounds"},
                json={"reason": {"type": "success"}})
    make(client, session(client, "tml-native-data-bounds"), "processor", "InputProcessor")  # the ended one's went


@pytest.mark.parametrize("kind,body,field", [
    ("create", {"processor_type": "dataset", "class_type": "PackingDataset"}, "class_type"),
    ("create", {"processor_type": "reward", "class_type": "MathReward"}, "processor_type"),
    ("create", {"processor_type": "dataset", "class_type": "Dataset", "dataset_meta": json.dumps(
        {"dataset_id": "ms://swift/self-cognition", "data": None, "_TWINKLE_TYPE_": "DatasetMeta"})},
     "dataset_meta.dataset_id"),
    ("create", {"processor_type": "dataset", "class_type": "Dataset", "dataset_meta": json.dumps(
        {"dataset_id": "/etc/passwd", "_TWINKLE_TYPE_": "DatasetMeta"})}, "dataset_meta.dataset_id"),
    ("create", {"processor_type": "dataset", "class_type": "Dataset", "cache_dir": "/tmp"}, "cache_dir"),
    ("create", {"processor_type": "dataset", "class_type": "Dataset", "dataset_meta": json.dumps(
        {"data": [1, 2], "_TWINKLE_TYPE_": "DatasetMeta"})}, "dataset_meta.data[0]"),
    ("create", {"processor_type": "dataloader", "class_type": "DataLoader", "dataset": "x", "batch_size": 2},
     "dataset"),
    ("call", {"function": "save_as", "output_path": "/tmp/out.jsonl"}, "function"),
    ("call", {"function": "no_such_method"}, "function"),
    ("call", {"function": "encode"}, "function"),  # before set_template
    ("call", {"function": "set_template", "template_func": "ChatML"}, "template_func"),
    ("call", {"function": "set_template", "template_func": "Template", "model_id": "ms://Other/model"}, "model_id"),
    ("call", {"function": "set_template", "template_func": "Template", "truncation_strategy": "split"},
     "truncation_strategy"),
    ("call", {"function": "map", "preprocess_func": "os.system"}, "preprocess_func"),
    ("call", {"function": "map", "preprocess_func": "SelfCognitionProcessor", "init_args": {"evil": 1}},
     "init_args.evil"),
    ("call", {"function": "map", "preprocess_func": "AlpacaProcessor", "with_indices": True}, "with_indices"),
    ("call", {"function": "filter", "filter_func": "lambda row: True"}, "filter_func"),
    ("call", {"function": "__getitem__", "idx": 99}, "idx"),
    ("call", {"function": "cast_column", "column": "image"}, "function"),
])
def test_bad_input_is_a_400_naming_the_field(client: TestClient, kind: str, body: dict, field: str) -> None:
    h = session(client)
    if kind == "create":
        found = client.post(f"{URL}/create", headers=h, json=body)
    else:
        pid = make(client, h, "dataset", "Dataset", dataset_meta=meta())
        found = client.post(f"{URL}/call", headers=h, json={"processor_id": pid, **body})
    assert found.status_code == 400, found.text
    assert found.json()["field"] == field and found.json()["detail"].startswith(field), found.text


def test_unknown_names_list_the_allowed_ones(client: TestClient) -> None:
    h = session(client)
    pid = make(client, h, "dataset", "Dataset", dataset_meta=meta())
    assert "SelfCognitionProcessor" in run(client, h, pid, "map", 400, preprocess_func="Nope")["detail"]
    assert "HasAssistantFilter" in run(client, h, pid, "filter", 400, filter_func="Nope")["detail"]
    assert "set_template" in run(client, h, pid, "nope", 400)["detail"]
    assert "DataLoader" in make(client, h, "dataset", "Nope", 400)["detail"]
    assert "Qwen3_5Template" in run(client, h, pid, "set_template", 400, template_func="Nope")["detail"]


def test_requests_need_a_key_a_session_and_strict_json(client: TestClient) -> None:
    h = session(client)
    body = {"processor_type": "processor", "class_type": "InputProcessor"}
    assert client.post(f"{URL}/create", json=body).status_code == 401
    no_session = {k: v for k, v in h.items() if k != "X-Twinkle-Session-Id"}
    answer = client.post(f"{URL}/create", headers=no_session, json=body)
    assert answer.status_code == 400 and answer.json()["field"] == "X-Twinkle-Session-Id"
    answer = client.post(f"{URL}/create", headers={**h, "Content-Type": "application/json"},
                         content=b'{"processor_type": "dataset", "class_type": "Dataset", "x": NaN}')
    assert answer.status_code == 422
    nan_rows = '{"data": [{"x": NaN}], "_TWINKLE_TYPE_": "DatasetMeta"}'
    assert make(client, h, "dataset", "Dataset", 400, dataset_meta=nan_rows)["field"] == "dataset_meta"


# ----- Twinkle's template, on a character-level tokenizer -----------------------------------------
class Chars:
    """Renders `<role>content</>` per turn (an assistant's reasoning as `[...]` first), one token per
    character; with `marks`, its template marks the assistant's tokens ({% generation %})."""

    chat_template = "chars"

    def __init__(self, marks: bool = False) -> None:
        self.marks = marks

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tools: Any = None,
                            return_assistant_tokens_mask: bool = False, **_: Any) -> dict[str, list[int]]:
        text, mask = "", []
        for m in messages:
            body = (f"[{m['reasoning_content']}]" if m.get("reasoning_content") else "") + m["content"] + "</>"
            text += f"<{m['role']}>" + body
            mask += [0] * (len(m["role"]) + 2) + [int(self.marks and m["role"] == "assistant")] * len(body)
        if add_generation_prompt:
            text += "<assistant>"
            mask += [0] * len("<assistant>")
        out = {"input_ids": [ord(c) for c in text]}
        if return_assistant_tokens_mask:
            out["assistant_masks"] = mask
        return out


def encoded(row: dict, tokenizer: Any = None, **options: Any) -> tuple[str, str]:
    """(the text, what it trains in input order) of a row encoded on Chars."""
    out = encode_row(tokenizer or Chars(), DataTemplate(base="chars", **options), row, "row")
    assert out is not None and out["labels"][-1] == -100
    trained = "".join(chr(t) for t in out["labels"] if t != -100)
    return "".join(chr(t) for t in out["input_ids"]), trained


def turns(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def test_each_assistant_turn_trains_its_content_and_end_of_turn() -> None:
    text, trained = encoded(turns(("user", "hi"), ("assistant", "yo"), ("user", "ok?"), ("assistant", "ok")))
    assert text == "<user>hi</><assistant>yo</><user>ok?</><assistant>ok</>" and trained == "yo</>ok</>"
    assert encoded(turns(("user", "hi"), ("assistant", "yo")), Chars(marks=True))[1] == "yo</>"


def test_the_pre_pipeline() -> None:
    text, trained = encoded(turns(("user", "hi"), ("assistant", "<think>\nhmm\n</think>\n\nyo")),
                            default_system="S")
    assert text == "<system>S</><user>hi</><assistant>[hmm]yo</>" and trained == "[hmm]yo</>"
    rows = turns(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    rows["user_data"] = [["key_rounds", "[3]"]]
    assert encoded(rows)[1] == "d</>"
    blocks = {"messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
                           {"role": "assistant", "content": "yo"}]}
    assert encoded(blocks)[0] == "<user>hi</><assistant>yo</>"


def test_without_a_chat_template_every_token_trains() -> None:
    text, trained = encoded(turns(("user", "abc")), use_chat_template=False)
    assert text == "abc" and trained == "bc"  # next-token aligned; the last predicts nothing
    with pytest.raises(InvalidRequest) as e:
        encoded(turns(("user", "a"), ("assistant", "b")), use_chat_template=False)
    assert e.value.field == "row.messages"


def test_images_are_refused() -> None:
    with pytest.raises(InvalidRequest) as e:
        encoded({**turns(("user", "<image>hi"), ("assistant", "yo")), "images": ["http://x/y.png"]})
    assert e.value.field == "row.images"


# ----- parity with Twinkle's own Template (twinkle-kit 0.5.1, in the reference venv) ---------------
# Qwen3's way with reasoning: <think> blocks after the last user turn, reasoning_content, tools,
# enable_thinking; on tiny-qwen3's tokenizer.
QWEN3_LIKE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}"
    "{{- messages[0].content + '\\n\\n' }}{%- endif %}{{- '# Tools\\n' }}{%- for tool in tools %}"
    "{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- else %}{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}{%- set ns.multi_step_tool = false %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
PARITY_CASES = [
    ({}, False, [
        turns(("user", "Hi"), ("assistant", "<think>\nhmm\n</think>\n\nHello!")),
        turns(("system", "Be brief."), ("user", "A?"), ("assistant", "B."), ("user", "C?"),
              ("assistant", "<think>x</think>D.")),
        turns(("user", "Q"), ("assistant", "one"), ("assistant", "two")),
        {**turns(("user", "Q"), ("assistant", "one"), ("user", "again"), ("assistant", "two")),
         "user_data": [["key_rounds", "[1]"]]},
        {**turns(("user", "tools?"), ("assistant", "yes")),
         "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]},
    ]),
    ({"default_system": "SYS", "enable_thinking": False}, False, [
        turns(("user", "Hi"), ("assistant", "Hello!")), turns(("system", "own"), ("user", "Hi"), ("assistant", "Yo")),
    ]),
    ({"max_length": 12, "truncation_strategy": "right"}, False, [turns(("user", "A long question, is it?"),
                                                                       ("assistant", "A long answer."))]),
    ({"enable_thinking": False}, True, [turns(("user", "Hi"))]),
]
REFERENCE_SCRIPT = """
import json, sys
from twinkle.template import Template
folder, cases = sys.argv[1], json.loads(sys.argv[2])
keys = ("input_ids", "labels", "attention_mask", "position_ids", "length")
out = []
for options, generation, rows in cases:
    encoded = Template(model_id=folder, **options).batch_encode(rows, add_generation_prompt=generation)
    out.append([{k: (r[k].tolist() if hasattr(r[k], "tolist") else r[k]) for k in keys} for r in encoded])
print("REFERENCE " + json.dumps(out))
"""


@pytest.mark.slow
def test_encoding_matches_twinkles_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess

    from tests.support.twinkle_ref import require_ref_python

    python = require_ref_python()
    folder = tmp_path / "qwen3-like"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    (folder / "chat_template.jinja").write_text(QWEN3_LIKE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(python), "-P", "-c", REFERENCE_SCRIPT, str(folder), json.dumps(PARITY_CASES)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REFERENCE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    reference = json.loads(lines[-1].removeprefix("REFERENCE "))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for (options, generation, rows), expected in zip(PARITY_CASES, reference, strict=True):
        template = DataTemplate(base="qwen3-like", **options)
        got = [encode_row(tokenizer, template, row, f"row{i}", add_generation_prompt=generation)
               for i, row in enumerate(rows)]
        assert [{k: r[k] for k in expected[0]} for r in got] == expected, options
