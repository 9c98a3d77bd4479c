"""Load: 32 concurrent SDK clients of 8 tenants train on one server while others sample, and every
future is accounted for: each client's steps exist once in the database, all finished, none failed,
none duplicated; the server logged no error (the SDK would retry a 5xx silently, so the log is
where one would show). The server's RSS is sampled throughout and reported.

Bounded for CI: TWINKLE_LOAD_STEPS (default 2) steps per client; the full form is
TWINKLE_LOAD_STEPS=20 (`TWINKLE_LOAD_STEPS=20 .venv/bin/python -m pytest -s tests/integration/test_load.py`)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa
import tinker
from tinker import types

from server.process import ServerProcess, running_server
from tests.support.data import make_data

BASE = "tiny-qwen3"
TENANTS, CLIENTS, SAMPLERS = 8, 32, 4
STEPS = int(os.environ.get("TWINKLE_LOAD_STEPS", "2"))
# The full form runs for many minutes on a 2-core machine: its timeout grows with the steps.
pytestmark = pytest.mark.timeout(240 + 40 * STEPS)
SAMPLE_PAUSE = 0.1  # between one sampler's requests: sampling alongside training, not instead of it


@pytest.fixture(scope="module")
def loaded_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("load")
    (data_dir / "models").mkdir()
    (data_dir / "models" / BASE).symlink_to(tiny_model_dir)
    with running_server(data_dir, timeout=300) as proc:
        yield proc


def train(base_url: str, client: int, rows: list[list[int]], out: dict, errors: list) -> None:
    try:
        with tinker.ServiceClient(base_url=base_url, api_key=f"tml-load-{client % TENANTS}") as sc:
            tc = sc.create_lora_training_client(BASE, rank=4, seed=client)
            data = make_data(rows[client % len(rows):][:2] or rows[:2])
            losses = []
            for _ in range(STEPS):
                fwd = tc.forward_backward(data, "cross_entropy")
                opt = tc.optim_step(types.AdamParams(learning_rate=1e-3))
                losses.append(fwd.result().metrics["loss:sum"])
                opt.result()
            out[client] = (tc.model_id, losses)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(f"client {client}: {exc!r}")


def sample(base_url: str, who: int, prompt: list[int], stop: threading.Event, counts: Counter, errors: list) -> None:
    try:
        with tinker.ServiceClient(base_url=base_url, api_key=f"tml-load-{who % TENANTS}") as sc:
            sampler = sc.create_sampling_client(base_model=BASE)
            while not stop.is_set():
                got = sampler.sample(types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=4)).result()
                counts[who] += len(got.sequences)
                stop.wait(SAMPLE_PAUSE)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(f"sampler {who}: {exc!r}")


def test_32_clients_of_8_tenants_lose_and_duplicate_nothing(loaded_server: ServerProcess, token_rows) -> None:
    server_process = psutil.Process(loaded_server.process.pid)
    results: dict[int, tuple[str, list[float]]] = {}
    errors: list[str] = []
    samples: Counter = Counter()
    stop = threading.Event()
    rss: list[int] = []
    trainers = [threading.Thread(target=train, args=(loaded_server.base_url, c, token_rows, results, errors))
                for c in range(CLIENTS)]
    samplers = [threading.Thread(target=sample, args=(loaded_server.base_url, s, token_rows[0][:6], stop, samples,
                                                       errors)) for s in range(SAMPLERS)]
    started = time.monotonic()
    for thread in trainers + samplers:
        thread.start()
    while any(t.is_alive() for t in trainers):
        rss.append(server_process.memory_info().rss)
        time.sleep(0.5)
    stop.set()
    for thread in trainers + samplers:
        thread.join(timeout=120)
    elapsed = time.monotonic() - started
    print(f"load: {CLIENTS} clients x {STEPS} steps, {sum(samples.values())} samples in {elapsed:.0f} s; "
          f"server RSS {min(rss) >> 20}..{max(rss) >> 20} MiB over {len(rss)} readings")
    assert not errors, errors
    assert len(results) == CLIENTS and all(len(losses) == STEPS for _, losses in results.values())
    assert all(samples[s] > 0 for s in range(SAMPLERS))

    engine = sa.create_engine(f"sqlite:///{loaded_server.log_path.parent / 'twinkle.db'}")
    with engine.connect() as db:
        rows = db.execute(sa.text("SELECT scope, kind, seq_id, state, error_category FROM futures")).all()
    engine.dispose()
    for model_id, _ in results.values():
        mine = [r for r in rows if r.scope == f"model:{model_id}"]
        kinds = Counter(r.kind for r in mine)
        assert kinds["forward_backward"] == STEPS and kinds["optim_step"] == STEPS, (model_id, kinds)
        assert len({r.seq_id for r in mine}) == len(mine), f"{model_id}: a seq_id twice"
    assert all(r.state == "done" for r in rows), Counter((r.kind, r.state, r.error_category) for r in rows)
    assert '"level": "error"' not in loaded_server.log()
