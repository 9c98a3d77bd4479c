"""A real `twinkle serve` process (tiny-qwen3, SQLite, local engine), shared by the SDK tests.

TWINKLE_TEST_SERVER_ARGS adds flags to that server: scripts/ray-suite.sh runs the SDK suite
against `--engine ray --database-url postgresql+psycopg://… --redis-url …` with it."""

from __future__ import annotations

import importlib.util
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.process import ServerProcess, running_server

# The vLLM sampler's tests run where vLLM is: .venv-vllm (make test-vllm, which CI runs after make
# test). In the main venv there is nothing for them to test, so they are not collected at all.
if importlib.util.find_spec("vllm") is None:
    collect_ignore = ["test_vllm_sampler.py"]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())",
    "for i in range(10):\n    print(i)",
]


@pytest.fixture(scope="session")
def server(data_dir: Path, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    extra = shlex.split(os.environ.get("TWINKLE_TEST_SERVER_ARGS", ""))
    with running_server(data_dir, extra_args=extra, timeout=300.0) as proc:
        yield proc


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def token_rows(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS]
