"""Run `twinkle serve` as a child process and wait until it answers: for tests and benchmarks
that must talk to a real server over HTTP, exactly as a user's SDK does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

READY = re.compile(r"Twinkle is ready at (http://\S+)")


class ServerStartError(RuntimeError):
    pass


@dataclass
class ServerProcess:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_server(
    data_dir: Path,
    *,
    base_model: str = "tiny-qwen3",
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
    log_name: str = "server.log",
    python: str | None = None,
) -> Iterator[ServerProcess]:
    """Start a server on a free loopback port with its log (stderr) in data_dir/`log_name`
    (`python`: another interpreter than this one, e.g. .venv-vllm's)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / log_name
    cmd = [python or sys.executable, "-m", "server.cli", "serve", "--port", "0", "--host", "127.0.0.1",
           "--base-model", base_model, "--data-dir", str(data_dir), *extra_args]
    child_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=child_env, text=True)
    try:
        yield ServerProcess(_wait_ready(proc, log_path, timeout), proc, log_path)
    finally:
        _stop(proc)


def _wait_ready(proc: subprocess.Popen, log_path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if match := READY.search(line):
            return match.group(1)
        if not line and proc.poll() is not None:
            break
    _stop(proc)
    raise ServerStartError(f"server did not become ready; its log:\n{log_path.read_text(errors='replace')[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
