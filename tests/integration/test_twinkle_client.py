"""The native Twinkle API through ModelScope's own, unmodified `twinkle_client` (twinkle-kit
0.5.1, in .venv-twinkle-ref: `make install-twinkle-ref`), talking HTTP to a real server process.

The client runs as a subprocess of the reference venv's python (tests/support/twinkle_client_flow.py)
and reports what it got back as JSON; these tests assert on that. The service and sampler flows
run in one client process (one session, as a user's program has); the model and data flows each in
its own."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.support.data import make_data
from tests.support.sdk import close
from tests.support.twinkle_ref import require_ref_python

pytestmark = pytest.mark.slow
BASE, KEY = "tiny-qwen3", "tml-twinkle-client"
FLOW = Path(__file__).resolve().parents[1] / "support" / "twinkle_client_flow.py"
MARK = "TWINKLE-FLOW "


def run_flow(server, flows: str, workdir: Path, timeout: float = 420, **config) -> dict:
    """The flows' summary, as the client process printed it."""
    python = require_ref_python()  # skips without the reference venv
    cfg = {"base_url": server.base_url, "api_key": KEY, "base_model": BASE, **config}
    # One torch thread: the server under test is the compute-heavy process. The client makes a
    # .locks/ folder in its working directory.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(python), "-P", str(FLOW), flows, json.dumps(cfg)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0 and lines, f"the client exited {proc.returncode}:\n{output}"
    return json.loads(lines[-1].removeprefix(MARK))


def flow_part(summary: dict, name: str) -> dict:
    part = summary[name]
    assert "error" not in part, f"{part['error']}\n{part.get('traceback', '')}"
    return part


@pytest.fixture(scope="module", autouse=True)
def ref_python() -> Path:
    """Skips the module before anything is trained when the reference venv is missing."""
    return require_ref_python()


@pytest.fixture(scope="module")
def tinker_checkpoint(server, token_rows) -> tuple[str, list[int]]:
    """Sampler weights trained two steps through the tinker SDK, and their greedy tokens there."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=KEY)
    tc = sc.create_lora_training_client(BASE, rank=8, seed=3).result()
    for _ in range(2):
        tc.forward_backward(make_data(token_rows), "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_weights_for_sampler("twinkle-client").result().path
    sampler = sc.create_sampling_client(model_path=path).result()
    params = types.SamplingParams(max_tokens=8, temperature=0.0)
    greedy = sampler.sample(types.ModelInput.from_ints(token_rows[0]), 1, params).result().sequences[0].tokens
    close(sc)
    return path, list(greedy)


@pytest.fixture(scope="module")
def flows(server, token_rows, tinker_checkpoint, tmp_path_factory) -> dict:
    uri = tinker_checkpoint[0].replace("tinker://", "twinkle://")
    return run_flow(server, "service,sampler", tmp_path_factory.mktemp("twinkle-client"), prompt=token_rows[0],
                    adapter_uri=uri)


def test_the_client_opens_a_session_and_reads_the_service(flows, tinker_checkpoint) -> None:
    s = flow_part(flows, "service")
    assert s["session_id"].startswith("sess-") and s["heartbeat"] == 200
    assert s["unknown_session"].startswith("HTTPError: 404") and "sess-nope" in s["unknown_session"]
    assert s["capabilities"] == [BASE] and s["health"] is True
    assert s["capacity"]["max_loras"] == s["capacity"]["used_loras"] + s["capacity"]["free_loras"]
    assert 0 <= s["capacity"]["used_loras"] <= s["capacity"]["max_loras"]
    run_id = tinker_checkpoint[0].removeprefix("tinker://").split("/")[0]
    assert run_id in s["runs"]  # a run trained through the Tinker API is listed here too
    assert s["cursor"]["limit"] == 5 and s["first_page"] <= 5 and s["cursor"]["total_count"] >= 1
    assert "401" in s["bad_key"] and "no-such-run" in s["unknown_run"] and "404" in s["unknown_run"]


def test_the_sampler_wrapper_samples_the_base_model(flows, token_rows) -> None:
    s = flow_part(flows, "sampler")
    prompt = token_rows[0]
    [seqs] = s["base"]
    assert len(seqs) == 2
    for seq in seqs:
        assert [pairs[0][0] for pairs in seq["logprobs"]] == seq["tokens"]
        f = seq["new_input_feature"]
        assert f["input_ids"] == prompt + seq["tokens"]
        assert f["labels"] == [-100] * (len(prompt) - 1) + seq["tokens"] + [-100]
        assert f["length"] == len(f["input_ids"]) == len(f["attention_mask"]) == len(f["position_ids"])
    assert s["prompt_logprobs"][0] is None and len(s["prompt_logprobs"]) == len(prompt)
    assert all(len(pairs) == 2 for pairs in s["topk_prompt_logprobs"][1:])
    assert s["chat"][0][0]["tokens"] and s["chat"][0][0]["decoded"] is not None


def test_the_sampler_wrapper_reports_refusals(flows) -> None:
    s = flow_part(flows, "sampler")
    assert s["unknown_base"].startswith("HTTPError: 404") and "Nobody/no-model" in s["unknown_base"]
    assert "400" in s["bad_labels"] and "inputs[0].labels" in s["bad_labels"]
    assert "400" in s["apply_patch"] and "never" in s["apply_patch"]


def test_adapter_uri_samples_what_the_tinker_sdk_samples(flows, tinker_checkpoint) -> None:
    [seqs] = flow_part(flows, "sampler")["adapter"]
    assert seqs[0]["tokens"] == tinker_checkpoint[1]  # twinkle:// and tinker:// name the same weights


def test_the_model_flow_trains_saves_and_samples_an_adapter(server, token_rows, tmp_path_factory) -> None:
    summary = run_flow(server, "model", tmp_path_factory.mktemp("twinkle-model"), prompt=token_rows[0],
                       rows=token_rows)
    m = flow_part(summary, "model")
    losses = m["losses"]
    assert len(losses) == 5 and all(np.isfinite(losses)) and all(b < a for a, b in zip(losses, losses[1:]))
    assert isinstance(m["metric"], dict) and m["metric"]
    assert m["capacity"]["used_loras"] >= 1  # the adapter, while its session lives
    assert m["final"] == f"twinkle://{m['run_id']}/weights/final" and m["run_id"].endswith("-A")
    assert m["sampler"].startswith(f"twinkle://{m['run_id']}/sampler_weights/")
    [seqs] = m["sampled"]
    assert len(seqs) == 2 and all(seq["logprobs"] and seq["new_input_feature"] for seq in seqs)
    assert {c["twinkle_path"] for c in m["checkpoints"]} >= {m["final"], m["sampler"]}
    assert m["checkpoint_path"]["path"] == "" and m["checkpoint_path"]["twinkle_path"] == m["final"]
    assert m["weights_info"]["training_run_id"] == m["run_id"] and m["weights_info"]["base_model"] == BASE
    assert m["deleted"]["success"] is True and "weights/final" not in m["after_delete"]
    p = m["primitives"]
    assert float(p["grad_norm"]) > 0 and p["forward_only"] == len(token_rows)
    assert len(p["lrs"]) == 2 and all(isinstance(lr, str) for lr in p["lrs"]) and p["lrs"][0] != p["lrs"][1]
    assert np.isfinite(p["split_loss"]) and "optimizer=AdamW" in p["configs"]
    # 5 + 2 forward_backward + 1 split backward: eight backward passes before the save.
    assert p["resumed"] == {"cur_step": 8, "consumed_train_samples": 8, "gradient_accumulation_steps": 1}
    assert p["upload"].startswith("HTTPError: 501") and "no model hub" in p["upload"]
    # The dashboard draws the native run's curve: its forward_backward losses, in order, and its steps.
    curve = dashboard_curve(server, m["run_id"], passes=len(losses))
    drawn = [point["metrics"]["loss"] for point in curve if point["kind"] == "forward_backward"]
    np.testing.assert_allclose(drawn[:5], losses, rtol=1e-6)
    assert any(point["kind"] == "optim_step" for point in curve)
    # Interop: the adapter trained natively, read through the Tinker SDK, gives the logprobs the
    # native sampler reported for its own sampled tokens (one implementation, one set of weights).
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=KEY)
    try:
        tinker_sampler = sc.create_sampling_client(model_path=m["sampler"].replace("twinkle://", "tinker://")).result()
        prompt = token_rows[0]
        for seq in seqs:
            full = types.ModelInput.from_ints(prompt + seq["tokens"])
            scored = tinker_sampler.compute_logprobs(full).result()[len(prompt):]
            np.testing.assert_allclose([pairs[0][1] for pairs in seq["logprobs"]], scored, atol=1e-5, rtol=0)
    finally:
        close(sc)


def dashboard_curve(server, run_id: str, passes: int) -> list[dict]:
    """The run's points on the dashboard once it has `passes` forward_backwards (written once a second)."""
    deadline = time.monotonic() + 10
    while True:
        answer = httpx.get(f"{server.base_url}/twinkle/v1/dashboard/runs/{run_id}/curve",
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert answer.status_code == 200, answer.text
        points = answer.json()["points"]
        if sum(p["kind"] == "forward_backward" for p in points) >= passes or time.monotonic() > deadline:
            return points
        time.sleep(0.3)


def test_server_side_data_feeds_training_until_stop_iteration(server, tiny_model_dir, tmp_path_factory) -> None:
    """Rows sent in a DatasetMeta (and the same rows uploaded as a file), encoded by the server as Twinkle's own Template encodes them (run in
    the client process as the reference), a DataLoader iterated until the 410 became StopIteration,
    each batch trained."""
    summary = run_flow(server, "data", tmp_path_factory.mktemp("twinkle-data"), model_dir=str(tiny_model_dir))
    d = flow_part(summary, "data")
    assert d["length"] == 4 and d["encoded"] == d["reference"]  # input_ids, labels, masks, positions, lengths
    trained = [sum(label != -100 for label in row["labels"]) for row in d["encoded"]]
    assert all(trained) and trained[1] > trained[0]  # the two-turn chat trains both assistant turns
    assert d["cognition"] == d["cognition_reference"]
    assert d["cognition_messages"][2]["content"] == "I am Twinkle, trained by ModelScope."
    assert d["lazy"] == d["encoded"][:1]
    assert d["from_file"] == d["encoded"]  # the same rows, uploaded as a JSON Lines file
    assert d["loader_len"] == 2 and d["sizes"] == [2, 2] and d["state"] == {"consumed_train_samples": 4}
    assert len(d["losses"]) == 2 and all(np.isfinite(d["losses"]))
    assert "400" in d["hub_dataset"] and "dataset_meta.dataset_id" in d["hub_dataset"]
    assert "400" in d["save_as"] and "no server paths" in d["save_as"]
    assert "400" in d["unknown_preprocessor"] and "SelfCognitionProcessor" in d["unknown_preprocessor"]
