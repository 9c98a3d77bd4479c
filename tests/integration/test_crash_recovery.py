"""`kill -9` of the server mid-training and mid-checkpoint write, on SQLite and on PostgreSQL.

One data dir (and database) lives through four server processes:
  1. trains, saves checkpoint `good`, trains two more steps (the uninterrupted run's losses), then
     submits a burst of work and is killed (-9) while it runs;
  2. resumes from `good` in a new session and dies writing checkpoint `torn-files`, its files
     under a temp name (failpoint checkpoint.before_rename, workers/failpoints.py);
  3. the same, dying with `torn-row`'s folder renamed and its row not committed
     (checkpoint.before_record);
  4. starts clean and is checked: sessions, runs, checkpoints and finished results are intact;
     what was in flight failed with a `server` error that says to reload; no torn checkpoint is
     listed, loadable or left on disk; `good` resumes with the uninterrupted run's losses.
Raw HTTP while the server dies (an SDK client would go on heartbeating a dead address); the SDK
for the resume."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from server.cli import main
from server.process import running_server
from tests.support.data import fwdbwd_proto, make_data

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
KEY = "tml-crash"
LR = 3e-3
RELOAD = "reload that checkpoint"


class Api:
    """The Tinker wire calls a client makes, over raw HTTP, waiting on each future."""

    def __init__(self, base_url: str) -> None:
        self.api = f"{base_url}/api/v1"
        self.http = httpx.Client(headers={"X-API-Key": KEY}, timeout=60)

    def post(self, route: str, body: dict | bytes) -> str:
        if isinstance(body, bytes):
            answer = self.http.post(f"{self.api}/{route}", content=body,
                                    headers={"Content-Type": "application/x-protobuf"})
        else:
            answer = self.http.post(f"{self.api}/{route}", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json().get("request_id") or answer.json()["session_id"]

    def result(self, request_id: str) -> dict:
        """The future's JSON answer (its result, or its error), waiting while it is pending."""
        while True:
            answer = self.http.post(f"{self.api}/retrieve_future", json={"request_id": request_id},
                                    headers={"Accept": "application/json"}).json()
            if answer.get("type") != "try_again":
                return answer

    def session(self) -> str:
        return self.post("create_session", {"sdk_version": "crash-test"})

    def resume(self, session: str, path: str) -> str:
        """A new training run in `session` from checkpoint `path`, optimizer state included."""
        answer = self.result(self.post("load_weights", {"session_id": session, "model_seq_id": 0, "path": path,
                                                        "optimizer": True}))
        assert "error" not in answer, answer
        return f"{session}:train:0"

    def submit_step(self, model: str, seq: int, data: list) -> tuple[str, str]:
        """forward_backward then optim_step at seq, seq + 1; their request ids."""
        fb = self.post("forward_backward", fwdbwd_proto(model, data, seq_id=seq))
        return fb, self.post("optim_step", {"model_id": model, "seq_id": seq + 1,
                                            "adam_params": {"learning_rate": LR}})

    def step(self, model: str, seq: int, data: list) -> float:
        fb, optim = self.submit_step(model, seq, data)
        assert "error" not in self.result(optim)
        return self.loss(fb)

    def loss(self, request_id: str) -> float:
        answer = self.result(request_id)
        assert "error" not in answer, answer
        return answer["metrics"]["loss:sum"]

    def save(self, model: str, seq: int, name: str) -> str:
        return self.post("save_weights", {"model_id": model, "seq_id": seq, "path": name})


def server_args(tmp_path: Path, tiny_model_dir: Path, database: str, make_pg_database) -> tuple[Path, list[str]]:
    data_dir = tmp_path / "data"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / BASE).symlink_to(tiny_model_dir)
    if database == "sqlite":
        return data_dir, []
    url = make_pg_database()
    assert main(["db", "upgrade", "--database-url", url]) == 0
    return data_dir, ["--database-url", url]


def die_saving(data_dir: Path, args: list[str], failpoint: str, good: str, name: str) -> tuple[str, str]:
    """A server that resumes `good` in a new session and is killed by `failpoint` while saving
    checkpoint `name`; (the save's request id, the session)."""
    with running_server(data_dir, extra_args=args, env={"TWINKLE_FAILPOINTS": f"{failpoint}=kill"}) as server:
        api = Api(server.base_url)
        session = api.session()
        request_id = api.save(api.resume(session, good), 1, name)
        assert server.process.wait(timeout=60) == -9  # the failpoint's SIGKILL, mid-save
    return request_id, session


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_kill_9_mid_training_and_mid_checkpoint(tmp_path, tiny_model_dir, token_rows, make_pg_database,
                                                database) -> None:
    data_dir, args = server_args(tmp_path, tiny_model_dir, database, make_pg_database)
    data = make_data(token_rows)
    env = {"TWINKLE_SEQ_GAP_GRACE_SECONDS": "600"}  # seq_id 500 below waits: in flight for sure
    with running_server(data_dir, extra_args=args, env=env) as server:
        api = Api(server.base_url)
        session = api.session()
        model = api.result(api.post("create_model", {"session_id": session, "model_seq_id": 0, "base_model": BASE,
                                                      "lora_config": {"rank": 4, "seed": 3}}))["model_id"]
        api.step(model, 1, data)
        good_request = api.save(model, 3, "good")
        good = api.result(good_request)["path"]
        expected = [api.step(model, 4, data), api.step(model, 6, data)]
        burst = [request for seq in range(8, 20, 2) for request in api.submit_step(model, seq, data)]
        burst += [api.save(model, 20, "burst"), api.post("forward_backward", fwdbwd_proto(model, data, seq_id=500))]
        server.process.kill()
        server.process.wait()
    torn_files, session_2 = die_saving(data_dir, args, "checkpoint.before_rename", good, "torn-files")
    torn_row, session_3 = die_saving(data_dir, args, "checkpoint.before_record", good, "torn-row")

    with running_server(data_dir, extra_args=args, env={"TWINKLE_ORPHAN_GRACE_SECONDS": "0"}) as server:
        api = Api(server.base_url)
        # Sessions, the run and its checkpoint `good` are there; the finished save still answers.
        listed = api.http.get(f"{api.api}/sessions", params={"limit": 100}).json()["sessions"]
        assert {session, session_2, session_3} <= set(listed)
        runs = api.http.get(f"{api.api}/training_runs").json()["training_runs"]
        assert model in {run["training_run_id"] for run in runs}
        assert api.result(good_request)["path"] == good
        # Everything submitted before the kill either finished or failed saying to reload;
        # nothing is left pending, nothing was lost.
        answers = [api.result(request_id) for request_id in [*burst, torn_files, torn_row]]
        for answer in answers:
            assert "error" not in answer or (answer["category"] == "server" and RELOAD in answer["error"]), answer
        assert "error" in answers[len(burst) - 1] and all("error" in a for a in answers[-2:])
        # Listed checkpoints are complete: `good`, and `burst` if its save finished before the kill.
        checkpoints = api.http.get(f"{api.api}/training_runs/{model}/checkpoints").json()["checkpoints"]
        names = {c["checkpoint_id"] for c in checkpoints}
        assert names == {"weights/good"} | ({"weights/burst"} if "error" not in answers[len(burst) - 2] else set())
        for torn_session, name in [(session_2, "torn-files"), (session_3, "torn-row")]:
            torn = f"tinker://{torn_session}:train:0/weights/{name}"
            assert api.http.get(f"{api.api}/training_runs/{torn_session}:train:0/checkpoints").json()["checkpoints"] == []
            load = api.http.post(f"{api.api}/load_weights", json={"session_id": api.session(), "model_seq_id": 0,
                                                                   "path": torn, "optimizer": True})
            assert load.status_code == 404 and load.json()["field"] == "path", load.text
        assert_no_orphans(data_dir, recorded=len(names))
        # `good` continues exactly as the uninterrupted run did.
        with tinker.ServiceClient(base_url=server.base_url, api_key=KEY) as sc:
            resumed = sc.create_training_client_from_state_with_optimizer(good).result()
            losses = []
            for _ in expected:
                fb = resumed.forward_backward(data, "cross_entropy")
                resumed.optim_step(types.AdamParams(learning_rate=LR)).result()
                losses.append(fb.result().metrics["loss:sum"])
        assert losses == pytest.approx(expected, abs=1e-5)


def assert_no_orphans(data_dir: Path, recorded: int) -> None:
    """The restarted server's sweep (grace 0 here) leaves only the folders rows point at: no temp
    folder, no unrecorded one."""
    deadline = time.monotonic() + 30
    while (left := sorted(p.name for p in (data_dir / "checkpoints").glob("*/*"))) and len(left) != recorded:
        assert time.monotonic() < deadline, f"orphaned checkpoint folders were not removed: {left}"
        time.sleep(0.2)
    assert not any(name.startswith(".tmp-") for name in left)
