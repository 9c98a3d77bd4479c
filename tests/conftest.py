"""Shared fixtures. The test process uses one torch thread: the server process under test is the
one compute-heavy process that gets two
(docs/cpu-threads.md, "One compute-heavy process gets two threads").

``--sdk VERSION`` runs the tests marked ``sdk`` against an older tinker SDK: the package alone,
installed by ``make install`` into ``.venv-sdk/overlay/VERSION`` (its dependencies are all in the
main venv), is put first on ``sys.path`` before anything imports ``tinker``. Only test modules
that use the ``sdk`` marker are collected (the others import 0.38-only parts of the SDK), and in
those every test not marked ``sdk`` is deselected. The server child process never imports tinker.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SDK_OVERLAYS = ROOT / ".venv-sdk" / "overlay"
_SDK_MARK = re.compile(r"\bmark\.sdk\b")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sdk", metavar="VERSION", default=None,
        help="run only the tests marked sdk, against tinker==VERSION from .venv-sdk/overlay/VERSION (make install)",
    )


def pytest_configure(config: pytest.Config) -> None:
    version = config.getoption("--sdk")
    if version is None:
        return
    overlay = SDK_OVERLAYS / version
    if not (overlay / "tinker").is_dir():
        raise pytest.UsageError(
            f"--sdk {version}: no overlay at {overlay}; run `make install`, or "
            f"`.venv/bin/pip install --no-deps --target {overlay} tinker=={version}`"
        )
    if "tinker" in sys.modules:
        raise pytest.UsageError(f"--sdk {version}: tinker was imported before the overlay could be put first")
    sys.path.insert(0, str(overlay))
    import tinker

    if tinker.__version__ != version:
        raise pytest.UsageError(f"--sdk {version}: imported tinker {tinker.__version__} from {tinker.__file__}")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # Under --sdk, a test module without any sdk-marked test is not even imported: most of them
    # import parts of the SDK that only 0.38 has.
    if config.getoption("--sdk") and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return not _SDK_MARK.search(collection_path.read_text())
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--sdk"):
        return
    selected = [item for item in items if item.get_closest_marker("sdk")]
    deselected = [item for item in items if not item.get_closest_marker("sdk")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


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
