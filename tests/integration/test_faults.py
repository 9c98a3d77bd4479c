"""Faults of the services a scaled-out server depends on: Redis going down and coming back, and
PostgreSQL restarting (its connections cut) or refusing connections for a while. Each test uses
its own Redis (a private redis-server) or its own PostgreSQL database, never the machine's state."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
import tinker
from tinker import types

from server.cli import main
from server.process import running_server
from tests.conftest import PG_ADMIN
from tests.support.data import make_data

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
KEY = {"X-API-Key": "tml-faults"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def private_redis(workdir: Path) -> Iterator[tuple[int, callable, callable]]:
    """A redis-server on a port of its own; yields (port, stop, start)."""
    port = _free_port()
    binary = shutil.which("redis-server")
    assert binary, "redis-server is installed on every machine of this project"

    def start() -> None:
        subprocess.run([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                        "--daemonize", "yes", "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
                       check=True)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)

    def stop() -> None:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)

    start()
    try:
        yield port, stop, start
    finally:
        stop()


def fresh_data_dir(path: Path, tiny_model_dir: Path) -> Path:
    (path / "models").mkdir(parents=True)
    (path / "models" / BASE).symlink_to(tiny_model_dir)
    return path


def _create_model(api: str, session: str, seq: int) -> httpx.Response:
    return httpx.post(f"{api}/create_model", headers=KEY, timeout=30, json={
        "session_id": session, "model_seq_id": seq, "base_model": BASE, "lora_config": {"rank": 2}})


def test_redis_down_fails_submissions_fast_with_a_503_and_they_recover(tmp_path, tiny_model_dir) -> None:
    with private_redis(tmp_path) as (port, stop_redis, start_redis), \
            running_server(fresh_data_dir(tmp_path / "data", tiny_model_dir),
                           extra_args=["--redis-url", f"redis://127.0.0.1:{port}/0"]) as server:
        api = f"{server.base_url}/api/v1"
        session = httpx.post(f"{api}/create_session", json={"sdk_version": "raw"}, headers=KEY).json()["session_id"]
        assert _create_model(api, session, 0).status_code == 200
        stop_redis()
        started = time.monotonic()
        down = _create_model(api, session, 1)
        assert time.monotonic() - started < 3
        assert down.status_code == 503 and down.headers["retry-after"], down.text
        assert down.json()["category"] == "server" and "Redis" in down.json()["error"]
        start_redis()
        assert _create_model(api, session, 1).status_code == 200  # the same request, now it goes through


def _pg_admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(sql)


def test_postgresql_restarting_or_refusing_connections(tmp_path, tiny_model_dir, token_rows, make_pg_database) -> None:
    url = make_pg_database()
    name = url.rsplit("/", 1)[1]
    assert main(["db", "upgrade", "--database-url", url]) == 0
    cut = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    data = make_data(token_rows)
    with running_server(fresh_data_dir(tmp_path, tiny_model_dir), extra_args=["--database-url", url]) as server, \
            tinker.ServiceClient(base_url=server.base_url, api_key="tml-faults") as sc:
        tc = sc.create_lora_training_client(BASE, rank=2, seed=0).result()
        tc.forward_backward(data, "cross_entropy").result()
        _pg_admin(cut)  # what a restart does to the server's connections
        tc.forward_backward(data, "cross_entropy").result()  # reconnected, unnoticed by the client
        # Refusing connections for a while: a clear 503, then the same request goes through.
        _pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        try:
            _pg_admin(cut)
            api = f"{server.base_url}/api/v1"
            refused = httpx.post(f"{api}/create_session", json={"sdk_version": "raw"}, headers=KEY, timeout=30)
            assert refused.status_code == 503 and refused.json()["category"] == "server", refused.text
            assert "database" in refused.json()["error"]
        finally:
            _pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        assert httpx.post(f"{api}/create_session", json={"sdk_version": "raw"}, headers=KEY).status_code == 200
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        assert "database_unavailable" in server.log()
