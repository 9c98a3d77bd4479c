"""The /v1 routes in-process (FastAPI TestClient, real runtime on tiny-qwen3): keys in either
header, errors in OpenAI's shape, and an error after a stream began as its last event."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from server.errors import Busy, OperationFailed
from server.kinds import ErrorCategory
from server.ops import sampling
from tests.support.http import local_client

BEARER = {"Authorization": "Bearer tml-openai-unit"}
CHAT = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TestClient]:
    data_dir = tmp_path_factory.mktemp("openai")
    (data_dir / "models").symlink_to(tiny_model_dir.parent)
    settings = Settings(data_dir=data_dir, base_model="tiny-qwen3", torch_threads=1, long_poll_seconds=2)
    with local_client(create_app(build_runtime(settings))) as c:
        yield c


def events(response) -> list:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_the_key_goes_in_a_bearer_or_an_x_api_key_header(client: TestClient) -> None:
    assert client.get("/v1/models", headers=BEARER).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": "tml-openai-unit"}).status_code == 200
    for headers in ({}, {"Authorization": "Basic dG1sLXg6"}, {"Authorization": "Bearer"}):
        answer = client.get("/v1/models", headers=headers)
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"


def test_a_stream_sends_the_role_then_the_text_then_done(client: TestClient) -> None:
    with client.stream("POST", "/v1/chat/completions", headers=BEARER, json={**CHAT, "stream": True}) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        sent = events(answer)
    assert sent[-1] == "[DONE]"
    chunks = [json.loads(e) for e in sent[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    whole = client.post("/v1/chat/completions", headers=BEARER, json=CHAT).json()
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole["choices"][0]["message"]["content"]


def test_a_refused_submission_is_a_plain_429_even_when_streamed(client: TestClient, monkeypatch) -> None:
    async def busy(*_: object, **__: object) -> None:
        raise Busy("sampling queue is full", retry_after=2)

    monkeypatch.setattr(sampling, "submit_generate", busy)
    for stream in (True, False):
        answer = client.post("/v1/chat/completions", headers=BEARER, json={**CHAT, "stream": stream})
        assert answer.status_code == 429 and answer.headers["retry-after"] == "2"
        assert answer.json()["error"] == {"message": "sampling queue is full", "type": "rate_limit_error",
                                          "param": None, "code": "rate_limit_exceeded"}


def test_an_error_after_the_stream_began_is_its_last_event(client: TestClient, monkeypatch) -> None:
    async def failing(*_: object, **__: object) -> asyncio.Future:
        waiter = asyncio.get_running_loop().create_future()
        waiter.set_exception(OperationFailed("the sampler ran out of memory", ErrorCategory.SERVER))
        return waiter

    monkeypatch.setattr(sampling, "submit_generate", failing)
    with client.stream("POST", "/v1/chat/completions", headers=BEARER, json={**CHAT, "stream": True}) as answer:
        assert answer.status_code == 200
        sent = events(answer)
    assert json.loads(sent[0])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(sent[-1])["error"]["message"] == "the sampler ran out of memory"


def test_bad_input_before_a_stream_is_a_plain_json_400(client: TestClient) -> None:
    answer = client.post("/v1/chat/completions", headers=BEARER, json={**CHAT, "stream": True, "n": "many"})
    assert answer.status_code == 400 and answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]["param"] == "n"
    answer = client.post("/v1/completions", headers=BEARER, content=b"{not json")
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
