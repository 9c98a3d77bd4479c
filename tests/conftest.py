"""Shared fixtures. The test process uses one torch thread: the server process under test is the
one compute-heavy process that gets two (feasibility §7)."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir per test session, so tiny-qwen3 is built once."""
    return tmp_path_factory.mktemp("twinkle-data")


@pytest.fixture(scope="session")
def tiny_model_dir(data_dir: Path) -> Path:
    from workers.base_models import TINY_QWEN3, resolve_base_model

    return resolve_base_model(TINY_QWEN3, data_dir, allow_download=False)


PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
T = TypeVar("T")


def arun(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async test body (the suite does without pytest-asyncio)."""
    return asyncio.run(fn())  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def make_pg_database() -> Iterator[Callable[[], str]]:
    """Creates throwaway databases (random names) on the machine's PostgreSQL and drops them all
    at the end of the session. Returns SQLAlchemy URLs."""
    made: list[str] = []
    admin = psycopg.connect(PG_ADMIN, autocommit=True)

    def make() -> str:
        name = f"twinkle_test_{secrets.token_hex(6)}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return PG_URL.format(name=name)

    try:
        yield make
    finally:
        for name in made:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
