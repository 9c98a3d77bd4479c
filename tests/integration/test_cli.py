"""The CLI against a real server (the shared `server` fixture): `twinkle status` over HTTP, a
checkpoint saved through the SDK downloaded with `twinkle checkpoints download` (a tar holding the
adapter's files), and the run and its checkpoint in `twinkle runs` / `checkpoints list`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tinker import types

from tests.support.data import make_data
from tests.support.sdk import resolve, service

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEY = "tml-cli-owner"


def twinkle(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TWINKLE_", "TINKER_"))}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**clean, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8", **env})


@pytest.fixture(scope="module")
def trained(server, token_rows) -> Iterator[dict[str, str]]:
    """A run with one optimizer step and a saved state (weights + optimizer), its session still open."""
    with service(server, KEY) as sc:
        tc = resolve(sc.create_lora_training_client("tiny-qwen3", rank=4, seed=0))
        tc.forward_backward(make_data(token_rows[:2]), "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        path = tc.save_state("cli-state").result().path
        yield {"run": tc.model_id, "path": path}


def test_status_shows_the_server_and_the_keys_usage(server, trained) -> None:
    done = twinkle("status", "--url", server.base_url, "--api-key", KEY)
    assert done.returncode == 0, done.stderr
    assert f"Twinkle at {server.base_url}: ok" in done.stdout
    assert "tiny-qwen3" in done.stdout and "Adapters per base model" in done.stdout
    assert "live training runs" in done.stdout

    done = twinkle("status", "--json", "--url", server.base_url, TINKER_API_KEY=KEY)  # the key from the SDK's env var
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert (state["status"], state["base_model"], state["url"]) == ("ok", "tiny-qwen3", server.base_url)
    assert state["capacity"]["pool"]["resident_adapters"] >= 1
    assert state["capacity"]["tenant"]["live_models"] == 1 and state["training_runs"] == 1

    done = twinkle("status", "--url", server.base_url)  # no key: up, and how to see more
    assert done.returncode == 0 and done.stdout == f"Twinkle at {server.base_url}: up\n" and "--api-key" in done.stderr


def test_a_checkpoint_downloads_as_an_archive_of_the_adapter(server, trained, tmp_path: Path) -> None:
    target = tmp_path / "out" / "state.tar"
    done = twinkle("checkpoints", "download", trained["path"], "-o", str(target), "--extract", str(tmp_path / "files"),
                   "--url", server.base_url, "--api-key", KEY)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["file"] == str(target) and answer["bytes"] == target.stat().st_size > 0
    with tarfile.open(target) as tar:
        names = set(tar.getnames())
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert sorted(answer["files"]) == sorted(names)
    assert json.loads((tmp_path / "files" / "adapter_config.json").read_text())["r"] == 4
    assert done.stderr == ""  # no terminal, no --progress: no bar
    assert not list(target.parent.glob(".*.part"))

    done = twinkle("checkpoints", "download", trained["path"], "-o", str(tmp_path / "again.tar"), "--progress",
                   "--url", server.base_url, "--api-key", KEY)
    assert done.returncode == 0 and "again.tar" in done.stderr  # asked for: the bar, drawn once at the end

    # Another tenant cannot download it: the server's 404, said plainly.
    done = twinkle("checkpoints", "download", trained["path"], "-o", str(tmp_path / "stolen.tar"),
                   "--url", server.base_url, "--api-key", "tml-cli-stranger")
    assert done.returncode == 1 and "HTTP 404" in done.stderr and "not found" in done.stderr
    assert not (tmp_path / "stolen.tar").exists()


def listed_run(data_dir: Path, run_id: str) -> dict:
    done = twinkle("runs", "--json", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    [run] = [r for r in json.loads(done.stdout) if r["run_id"] == run_id]
    return run


def test_the_run_and_its_checkpoint_are_listed_from_the_database(server, trained, data_dir: Path) -> None:
    run = listed_run(data_dir, trained["run"])
    deadline = time.monotonic() + 10
    while run["steps"] == 0 and time.monotonic() < deadline:  # the server writes run metrics once a second
        time.sleep(0.5)
        run = listed_run(data_dir, trained["run"])
    assert (run["base_model"], run["lora_rank"], run["steps"], run["checkpoints"], run["session_live"]) == \
        ("tiny-qwen3", 4, 1, 1, True)
    done = twinkle("checkpoints", "list", "--run", trained["run"], "--json", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    [ckpt] = json.loads(done.stdout)
    assert ckpt["path"] == trained["path"] and ckpt["has_optimizer"] is True and ckpt["size_bytes"] > 0
