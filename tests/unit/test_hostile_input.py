"""The limits table: what a hostile client sends, route by route, and the 4xx that names the field,
on SQLite and on PostgreSQL (whose columns refuse over-long text and NUL bytes, where SQLite
stores anything: a value that reaches the database unchecked is a 500 there).

Body sizes and chunked bodies: tests/unit/test_guard.py; decoders under random input:
tests/unit/test_fuzz_wire.py; every operation against its schema: tests/integration/test_schemathesis.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from server.store.database import Database
from tests.support.http import error, local_client

KEY = {"X-API-Key": "tml-hostile"}
API = "/api/v1"
MB = "x" * (1 << 20)  # a megabyte of text
NAMES = {"dot-dot": "..", "slash": "a/b", "nul": "a\x00b", "megabyte": MB}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           tiny_model_dir: Path) -> Iterator[TestClient]:
    data_dir = tmp_path_factory.mktemp("hostile")
    (data_dir / "models").symlink_to(tiny_model_dir.parent)
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("make_pg_database")()
        Database(url, threads=1).migrate()
    settings = Settings(data_dir=data_dir, base_model="tiny-qwen3", torch_threads=1, long_poll_seconds=1,
                        database_url=url, max_datums_per_request=64)
    with local_client(create_app(build_runtime(settings))) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: TestClient) -> str:
    session = client.post(f"{API}/create_session", json={"sdk_version": "x"}, headers=KEY).json()["session_id"]
    made = client.post(f"{API}/create_model", headers=KEY, json={
        "session_id": session, "model_seq_id": 0, "base_model": "tiny-qwen3", "lora_config": {"rank": 2}}).json()
    return client.post(f"{API}/retrieve_future", json={"request_id": made["request_id"]}, headers=KEY).json()["model_id"]


def session_with(**fields: object) -> Callable[[TestClient, str], object]:
    return lambda c, _: c.post(f"{API}/create_session", json={"sdk_version": "x", **fields}, headers=KEY)


def create_model_with(**fields: object) -> Callable[[TestClient, str], object]:
    def send(c: TestClient, _: str) -> object:
        session = c.post(f"{API}/create_session", json={"sdk_version": "x"}, headers=KEY).json()["session_id"]
        return c.post(f"{API}/create_model", headers=KEY, json={
            "session_id": session, "model_seq_id": 0, "base_model": "tiny-qwen3", **fields})
    return send


def save(route: str, name: str) -> Callable[[TestClient, str], object]:
    return lambda c, model: c.post(f"{API}/{route}", json={"model_id": model, "path": name, "seq_id": 1000}, headers=KEY)


def sampler_of(path: str) -> Callable[[TestClient, str], object]:
    def send(c: TestClient, _: str) -> object:
        session = c.post(f"{API}/create_session", json={"sdk_version": "x"}, headers=KEY).json()["session_id"]
        return c.post(f"{API}/create_sampling_session", headers=KEY, json={
            "session_id": session, "sampling_session_seq_id": 0, "model_path": path})
    return send


def datums(n: int = 1, tokens: int = 4, **inputs: np.ndarray) -> list:
    from tinker import types

    row = list(range(5, 5 + tokens + 1))
    fields = {"target_tokens": row[1:], "weights": np.ones(tokens, dtype=np.float32), **inputs}
    return [types.Datum(model_input=types.ModelInput.from_ints(row[:-1]), loss_fn_inputs=fields) for _ in range(n)]


def fwdbwd(data: Callable[[], list], loss_fn: str = "cross_entropy") -> Callable[[TestClient, str], object]:
    def send(c: TestClient, model: str) -> object:
        from tests.support.data import fwdbwd_proto

        return c.post(f"{API}/forward_backward", content=fwdbwd_proto(model, data(), loss_fn, seq_id=1000),
                      headers={**KEY, "Content-Type": "application/x-protobuf"})
    return send


NAN = np.array([1, np.nan, 1, 1], dtype=np.float32)
INF = np.array([0, 0, np.inf, 0], dtype=np.float32)
# (case, request, status, the field the error names). 422: refused by the body's schema; 400: by
# the server's checks; 404: well-formed, names nothing there.
SHORT = {k: v for k, v in NAMES.items() if k in ("nul", "megabyte")}
TABLE = [
    *[(f"session sdk_version {k}", session_with(sdk_version=v), 422, "sdk_version") for k, v in SHORT.items()],
    *[(f"session {f} {k}", session_with(**{f: v}), 422, f) for f in ("display_name", "project_id")
      for k, v in SHORT.items()],
    ("session tag of a megabyte", session_with(tags=[MB]), 422, "tags.0"),
    ("session tag with NUL", session_with(tags=["a\x00b"]), 422, "tags.0"),
    ("session of 101 tags", session_with(tags=["t"] * 101), 422, "tags"),
    ("session metadata of a megabyte", session_with(user_metadata={"k": MB}), 422, "user_metadata"),
    ("session metadata with NUL", session_with(user_metadata={"k\x00": "v"}), 422, "user_metadata"),
    ("base_model dot-dot", create_model_with(base_model=".."), 400, "base_model"),
    ("base_model slash", create_model_with(base_model="../../etc"), 400, "base_model"),
    *[(f"base_model {k}", create_model_with(base_model=v), 422, "base_model") for k, v in SHORT.items()],
    ("model metadata of a megabyte", create_model_with(user_metadata={"k": MB}), 422, "user_metadata"),
    *[(f"{route} name {k}", save(route, v), 422, "path") for route in ("save_weights", "save_weights_for_sampler")
      for k, v in NAMES.items()],
    ("sampler model_path dot-dot", sampler_of("tinker://../weights/x"), 404, "model_path"),
    ("sampler model_path slash", sampler_of("tinker://a/b/weights/x"), 400, "model_path"),
    *[(f"sampler model_path {k}", sampler_of(f"tinker://{v}/weights/x"), 422, "model_path") for k, v in SHORT.items()],
    ("datums past max_datums_per_request", fwdbwd(lambda: datums(65)), 400, "data"),
    ("a datum past the context length", fwdbwd(lambda: datums(tokens=50_000)), 400, "data[0].model_input"),
    ("weights of another length", fwdbwd(lambda: datums(weights=np.ones(3, np.float32))), 400,
     "data[0].loss_fn_inputs.weights"),
    ("2-D weights", fwdbwd(lambda: datums(weights=np.ones((2, 2), np.float32))), 400, "data[0].loss_fn_inputs.weights"),
    ("NaN weights", fwdbwd(lambda: datums(weights=NAN)), 400, "data[0].loss_fn_inputs.weights"),
    ("infinite advantages", fwdbwd(lambda: datums(advantages=INF, logprobs=np.zeros(4, np.float32)),
                                   "importance_sampling"), 400, "data[0].loss_fn_inputs.advantages"),
    ("a token id past the vocabulary", fwdbwd(lambda: datums(target_tokens=[1, 2, 3, 10**9])), 400,
     "data[0].loss_fn_inputs.target_tokens"),
    ("a negative token id", fwdbwd(lambda: datums(target_tokens=[1, 2, 3, -1])), 400,
     "data[0].loss_fn_inputs.target_tokens"),
]


@pytest.mark.parametrize("case", [row[0] for row in TABLE])
def test_hostile_input_gets_a_4xx_naming_the_field(client: TestClient, model: str, case: str) -> None:
    _, send, status, field = next(row for row in TABLE if row[0] == case)
    body = error(send(client, model), status)
    assert body["field"].removeprefix("body.") == field, body
    assert len(body["error"]) < 2000  # what was sent is not echoed back in full
    assert client.get(f"{API}/healthz").status_code == 200  # and the server serves on
