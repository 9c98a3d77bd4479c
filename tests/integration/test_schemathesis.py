"""The API against its own OpenAPI description (schemathesis): for every operation in
`/openapi.json`, generated requests (valid and invalid by the schema) never get a 5xx, and every
4xx has a JSON body. A real server process on tiny-qwen3, with a valid key on every request so
that the generated values reach the routes' own checks instead of stopping at the 401."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from server.process import ServerProcess, running_server

KEY = "tml-schemathesis"
AUTH = {"X-API-Key": KEY, "Authorization": f"Bearer {KEY}", "Twinkle-Authorization": f"Bearer {KEY}"}



def described_operations() -> dict[str, object]:
    """The operations /openapi.json describes, by label ("POST /api/v1/create_model"): the app's own
    schema, as the server process serves it (this pytest plugin of schemathesis does not run on
    pytest 9, so the operations are parametrized here)."""
    from gateway.app import create_app
    from server.boot import build_runtime
    from server.config import Settings

    described = schemathesis.openapi.from_dict(create_app(build_runtime(Settings(base_model="tiny-qwen3"))).openapi())
    return {op.label: op for op in (result.ok() for result in described.get_all_operations())}


OPERATIONS = described_operations()


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("schemathesis")
    (data_dir / "models").mkdir()
    (data_dir / "models" / "tiny-qwen3").symlink_to(tiny_model_dir)
    # Long-polls answer at once (generated ids are unknown anyway); a generous failed-auth limit.
    env = {"TWINKLE_LONG_POLL_SECONDS": "0.2", "TWINKLE_AUTH_FAILURES_PER_MINUTE": "100000"}
    with running_server(data_dir, env=env) as proc:
        yield proc


def test_every_route_is_described() -> None:
    assert len(OPERATIONS) >= 80


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_server_error_and_every_client_error_is_json(label: str, fuzzed_server: ServerProcess) -> None:
    operation = OPERATIONS[label]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(cases)
    @settings(max_examples=int(os.environ.get("TWINKLE_FUZZ_EXAMPLES", "12")), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:  # noqa: ANN001 - a schemathesis Case
        response = case.call(base_url=fuzzed_server.base_url, headers=AUTH, timeout=60)
        where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
        assert response.status_code < 500, where
        if response.status_code >= 400:
            assert (response.headers.get("content-type") or [""])[0].startswith("application/json"), where
            assert isinstance(response.json(), dict), where

    run()
