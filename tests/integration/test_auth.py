"""Registered keys against a real server process (`--auth keys`): the unmodified SDK trains with a
key made by the CLI while the server runs; unknown and revoked keys get tinker.AuthenticationError;
the admin API end to end; a key revoked by the CLI stops working within seconds; no key ever
reaches the log or the database; and open auth refuses to serve beyond loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tinker
from sqlalchemy import MetaData, create_engine, select
from tinker import types

from server import ids
from server.process import running_server
from tests.support.data import make_data

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
ADMIN_KEY = "integration-admin-key-0123456789abcdef"
ADMIN = {"X-Admin-Key": ADMIN_KEY}


def fresh_data_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-qwen3").symlink_to(tiny_model_dir)
    return tmp_path


def cli(data_dir: Path, *argv: str) -> str:
    """`twinkle ...` as its own process (as an operator runs it next to the server); its stdout."""
    done = subprocess.run([sys.executable, "-m", "server.cli", *argv, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def train_step(sc: tinker.ServiceClient, data) -> float:
    tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
    fb = tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    return fb.result().metrics["loss:sum"]


def training_runs(base_url: str, key: str) -> list[str]:
    rest = tinker.ServiceClient(base_url=base_url, api_key=key).create_rest_client()
    return [r.training_run_id for r in rest.list_training_runs().result().training_runs]


def test_registered_keys_admin_api_and_revocation(tmp_path, tiny_model_dir, token_rows) -> None:
    data_dir, data = fresh_data_dir(tmp_path, tiny_model_dir), make_data(token_rows)
    with running_server(data_dir, extra_args=["--auth", "keys"], env={"TWINKLE_ADMIN_KEY": ADMIN_KEY}) as server:
        # The CLI works on the database of the running server.
        cli(data_dir, "tenants", "create", "acme", "--limit", "max_live_models=4")
        key = cli(data_dir, "keys", "create", "--tenant", "acme", "--label", "integration")
        assert key.startswith("tml-")
        with tinker.ServiceClient(base_url=server.base_url, api_key=key) as sc:
            assert train_step(sc, data) > 0

        with pytest.raises(tinker.AuthenticationError) as refused:
            with tinker.ServiceClient(base_url=server.base_url, api_key="tml-" + "n" * 43) as sc:
                sc.create_lora_training_client(BASE, rank=4).result()
        assert "unknown or revoked API key" in str(refused.value)

        # The admin API: a second tenant, with its own key and limits; it sees none of acme's runs.
        admin = httpx.Client(base_url=f"{server.base_url}/twinkle/v1/admin", headers=ADMIN, timeout=30)
        assert httpx.get(f"{server.base_url}/twinkle/v1/admin/tenants").status_code == 401
        beta = admin.post("/tenants", json={"name": "beta", "limits": {"max_lora_rank": 8}})
        assert beta.status_code == 201, beta.text
        assert admin.put("/tenants/beta/limits", json={"max_lora_rank": 16}).json() == {"max_lora_rank": 16}
        made = admin.post("/keys", json={"tenant": "beta"}).json()
        assert training_runs(server.base_url, made["key"]) == []
        assert len(training_runs(server.base_url, key)) == 1
        listed = admin.get("/keys").json()["keys"]
        assert {k["tenant"] for k in listed} == {"acme", "beta"}
        assert key not in str(listed) and made["key"] not in str(listed)
        assert [t["name"] for t in admin.get("/tenants").json()["tenants"]] == ["acme", "beta"]

        # Revoked through the admin API: refused at once.
        assert admin.post(f"/keys/{made['id']}/revoke").status_code == 200
        with pytest.raises(tinker.AuthenticationError):
            training_runs(server.base_url, made["key"])

        # Revoked with the CLI: refused within the server's key cache TTL (5 s).
        acme_key = next(k for k in listed if k["tenant"] == "acme")
        cli(data_dir, "keys", "revoke", acme_key["id"])
        deadline = time.monotonic() + 15
        while True:
            r = httpx.get(f"{server.base_url}/api/v1/training_runs", headers={"X-API-Key": key})
            if r.status_code == 401 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 401 and r.json()["error"].startswith("unknown or revoked API key")
        admin.close()


def test_keys_never_reach_the_log_or_the_database(tmp_path, tiny_model_dir, token_rows) -> None:
    """A short SDK flow at debug log level with a key made through the admin API, plus refused
    requests; then the log, every column of every table and the database files are searched for
    each key. (Hashes of keys are allowed; keys are not.)"""
    data_dir, data = fresh_data_dir(tmp_path, tiny_model_dir), make_data(token_rows)
    unknown = "tml-unknown-" + "z" * 40
    with running_server(data_dir, extra_args=["--auth", "keys", "--log-level", "debug"],
                        env={"TWINKLE_ADMIN_KEY": ADMIN_KEY}) as server:
        admin = f"{server.base_url}/twinkle/v1/admin"
        assert httpx.post(f"{admin}/tenants", json={"name": "leaky"}, headers=ADMIN).status_code == 201
        key = httpx.post(f"{admin}/keys", json={"tenant": "leaky", "label": "leak test"}, headers=ADMIN).json()["key"]
        with tinker.ServiceClient(base_url=server.base_url, api_key=key) as sc:
            tc = sc.create_lora_training_client(BASE, rank=4, seed=1).result()
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            sampler = tc.save_weights_and_get_sampling_client().result()
            sampler.sample(types.ModelInput.from_ints(token_rows[0][:4]), 1, types.SamplingParams(max_tokens=3)).result()
            tc.save_state("leak-check").result()
        # Refusals and bad input, which are where a careless server echoes what it got.
        assert httpx.post(f"{server.base_url}/api/v1/create_session", json={}, headers={"X-API-Key": unknown}).status_code == 401
        bad = httpx.post(f"{server.base_url}/api/v1/create_model", content=b"{oops", headers={"X-API-Key": key})
        assert bad.status_code == 422 and key not in bad.text
        wrong_admin = httpx.get(f"{admin}/tenants", headers={"X-Admin-Key": key})
        assert wrong_admin.status_code == 401 and key not in wrong_admin.text
        log = server.log()
    assert '"event": "api_key_created"' in log  # the log is there

    secrets = {"tenant key": key, "unknown key": unknown, "admin key": ADMIN_KEY}
    for what, secret in secrets.items():
        assert secret not in log, f"the {what} is in the server log"

    engine = create_engine(f"sqlite:///{data_dir / 'twinkle.db'}")
    meta = MetaData()
    meta.reflect(engine)
    cells, hash_seen = 0, False
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                for value in row:
                    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                    cells += 1
                    hash_seen |= text == ids.hash_key(key)
                    for what, secret in secrets.items():
                        assert secret not in text, f"the {what} is in {table.name}"
    engine.dispose()
    assert cells > 50 and hash_seen  # the search did reach the key's row
    for path in data_dir.glob("twinkle.db*"):  # and nowhere in the files (freed pages, the WAL)
        raw = path.read_bytes()
        for what, secret in secrets.items():
            assert secret.encode() not in raw, f"the {what} is in {path.name}"


def test_open_auth_refuses_to_serve_beyond_loopback(tmp_path) -> None:
    # Should the check ever go missing, this server still could not bind: its base model does not
    # exist and may not be downloaded, and uvicorn binds only after the app has started.
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "0.0.0.0", "--port", "0",
           "--data-dir", str(tmp_path), "--base-model", str(tmp_path / "no-model")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINKLE_")} | {"TWINKLE_ALLOW_DOWNLOAD": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert "refusing to serve on 0.0.0.0 with --auth open" in done.stderr
    assert "--auth keys" in done.stderr and "127.0.0.1" in done.stderr
    assert "ready" not in done.stdout
