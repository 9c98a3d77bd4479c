"""Shared fixtures. The test process uses one torch thread: the server process under test is the
one compute-heavy process that gets two (feasibility §7)."""

from __future__ import annotations

import os
from pathlib import Path

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
