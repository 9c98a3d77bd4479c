"""A real `twinkle serve` process (tiny-qwen3, SQLite, local engine), shared by the SDK tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.process import ServerProcess, running_server

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())",
    "for i in range(10):\n    print(i)",
]


@pytest.fixture(scope="session")
def server(data_dir: Path, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    with running_server(data_dir) as proc:
        yield proc


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def token_rows(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS]
