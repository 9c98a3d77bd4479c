"""`twinkle doctor`: a wrong PostgreSQL or Redis URL is reported plainly (which part, the URL with
its password masked, the error on one line, what to fix; no traceback) and fails the exit code; a
reachable one passes; optional parts that are absent are notes. The machine's PostgreSQL
(127.0.0.1:5432) and Redis (127.0.0.1:6379) stand in for the good case."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import main
from server.commands import doctor
from server.commands.output import mask_url
from server.config import load_settings
from workers import base_models
from workers.base_models import probe_base_model

ROOT = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379/0"


def twinkle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a process of its own, none of this machine's TWINKLE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINKLE_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def line_of(out: str, name: str) -> list[str]:
    """A check's line and its fix line."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line[2:].startswith(name + " "):
            return [line, lines[i + 1] if i + 1 < len(lines) and "fix:" in lines[i + 1] else ""]
    raise AssertionError(f"no {name} line in:\n{out}")


def settings(tmp_path: Path, **options):
    return load_settings(cli={"data_dir": tmp_path, "base_model": "tiny-qwen3", "port": 0, **options}, env={})


# ----- as a user sees it (a process, its output and exit code) -----------------------------------
def test_a_wrong_postgresql_and_redis_url_are_reported_clearly(tmp_path: Path) -> None:
    done = twinkle("doctor", "--data-dir", str(tmp_path), "--base-model", "tiny-qwen3", "--port", "0",
                   "--database-url", "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/x",
                   "--redis-url", "redis://:s3cret@127.0.0.1:1/0", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "Traceback" not in out + done.stderr
    assert "hunter2" not in out and "s3cret" not in out

    db, db_fix = line_of(out, "database")
    assert db.startswith("✗")
    assert "postgresql+psycopg://postgres:***@127.0.0.1:1/x" in db and "Connection refused" in db
    assert "fix: start PostgreSQL at 127.0.0.1:1" in db_fix and "--database-url" in db_fix

    redis, redis_fix = line_of(out, "redis")
    assert redis.startswith("✗")
    assert "redis://:***@127.0.0.1:1/0" in redis and "Connection refused" in redis
    assert "fix: start Redis at 127.0.0.1:1" in redis_fix and "--redis-url" in redis_fix

    assert line_of(out, "torch")[0].startswith("✓")  # the rest is still checked
    assert out.splitlines()[-1] == "2 problems to fix: database, redis"


def test_a_reachable_postgresql_and_redis_pass(tmp_path: Path, make_pg_database) -> None:
    url = make_pg_database()
    assert main(["db", "upgrade", "--database-url", url, "--data-dir", str(tmp_path)]) == 0
    done = twinkle("doctor", "--json", "--data-dir", str(tmp_path), "--base-model", "tiny-qwen3", "--port", "0",
                   "--database-url", url, "--redis-url", REDIS, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    checks = {c["name"]: c for c in answer["checks"]}
    assert answer["ok"] is True
    assert checks["database"]["status"] == "ok" and "PostgreSQL" in checks["database"]["detail"]
    assert "newest revision" in checks["database"]["detail"]
    assert checks["redis"]["status"] == "ok" and "PING answered" in checks["redis"]["detail"]
    assert checks["torch"]["status"] == "ok" and "2.13.0" in checks["torch"]["detail"]
    assert checks["base model"]["status"] == "ok"


def test_optional_parts_missing_are_notes_not_failures(tmp_path: Path, capsys) -> None:
    """SQLite in a fresh data dir, no Redis, no vLLM: ready to serve (exit 0)."""
    code = main(["doctor", "--data-dir", str(tmp_path / "data"), "--base-model", "tiny-qwen3", "--port", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert line_of(out, "redis")[0].startswith("·") and "not configured" in out
    assert line_of(out, "database")[0].startswith("✓") and "created (with the newest schema) at first serve" in out
    assert not line_of(out, "vllm")[0].startswith("✗")
    if line_of(out, "vllm")[0].startswith("·"):
        assert "make install-vllm" in line_of(out, "vllm")[1] or ".venv-vllm" in line_of(out, "vllm")[0]
    assert out.splitlines()[-1].startswith("ready to serve")
    assert not (tmp_path / "data").exists()  # the doctor changes nothing


# ----- each check ---------------------------------------------------------------------------------
def test_a_database_that_does_not_exist_says_to_create_it(tmp_path: Path) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/twinkle_no_such_db_doctor"
    check = doctor.check_database(settings(tmp_path, database_url=url))
    assert check.status == "fail"
    assert 'database "twinkle_no_such_db_doctor" does not exist' in check.detail and "\n" not in check.detail
    assert check.fix is not None and "createdb" in check.fix and "twinkle db upgrade" in check.fix


def test_a_postgresql_schema_behind_fails_unless_serving_upgrades_it(tmp_path: Path, make_pg_database) -> None:
    url = make_pg_database()
    behind = doctor.check_database(settings(tmp_path, database_url=url))
    assert behind.status == "fail" and "empty" in behind.detail
    assert behind.fix is not None and "`twinkle db upgrade` with the same --database-url" in behind.fix
    assert url not in behind.fix and "***" not in behind.fix  # nothing to paste with a masked password
    assert doctor.check_database(settings(tmp_path, database_url=url, db_upgrade=True)).status == "ok"


def test_a_missing_sqlite_database_fails_when_serving_would_not_create_its_schema(tmp_path: Path) -> None:
    assert doctor.check_database(settings(tmp_path)).status == "ok"
    check = doctor.check_database(settings(tmp_path, db_upgrade=False))
    assert check.status == "fail" and "does not exist" in check.detail and "twinkle db upgrade" in (check.fix or "")
    assert not (tmp_path / "twinkle.db").exists()


def test_a_schema_newer_than_this_code_fails(tmp_path: Path) -> None:
    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    with sqlite3.connect(tmp_path / "twinkle.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    check = doctor.check_database(settings(tmp_path))
    assert check.status == "fail" and "9999 is not one this Twinkle knows" in check.detail


def test_an_unusable_database_url_or_data_dir_fails(tmp_path: Path) -> None:
    for url in ("mysql+pymysql://root:hunter2@127.0.0.1/x", "nosuchdb://root:hunter2@127.0.0.1/x"):
        check = doctor.check_database(settings(tmp_path, database_url=url))  # drivers Twinkle does not install
        assert check.status == "fail" and "hunter2" not in check.detail, check
        assert "postgresql+psycopg://" in (check.fix or "")
    (tmp_path / "a-file").write_text("")
    checks = doctor.check_data_dir(settings(tmp_path, data_dir=tmp_path / "a-file" / "data"), 5.0)
    assert [c.status for c in checks] == ["fail"] and "not a folder" in checks[0].detail
    low = doctor.check_data_dir(settings(tmp_path), 1e9)  # a billion GiB free: nobody has that
    assert [c.status for c in low] == ["ok", "warn"] and "free some space" in (low[1].fix or "")


def test_a_port_taken_by_another_program_fails(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        check = doctor.check_port(settings(tmp_path, port=port))
    assert check.status == "fail" and "taken by another program" in check.detail and "--port" in (check.fix or "")
    assert doctor.check_port(settings(tmp_path, port=0)).status == "ok"


def test_required_parts_follow_the_settings(tmp_path: Path, monkeypatch) -> None:
    if doctor.importlib.util.find_spec("vllm") is None:
        assert doctor.check_vllm(settings(tmp_path)).status == "note"
        assert doctor.check_vllm(settings(tmp_path, sampler="vllm")).status == "fail"
    monkeypatch.setattr(doctor, "_pinned", lambda _package: "9.9.9")
    torch_check = doctor.check_torch()
    assert torch_check.status == "fail" and "pins torch==9.9.9" in torch_check.detail
    assert doctor.check_auth(settings(tmp_path, host="0.0.0.0")).status == "fail"
    assert doctor.check_redis(settings(tmp_path)).status == "note"


def test_torch_on_a_gpu_names_its_devices(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _index=0: "NVIDIA H200")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    check = doctor.check_torch()
    assert check.status == "ok" and "CUDA 12.8, 2 GPUs (NVIDIA H200)" in check.detail


def test_a_base_model_is_found_offline_without_building_anything(tmp_path: Path, tiny_model_dir: Path,
                                                                   monkeypatch) -> None:
    fresh = probe_base_model("tiny-qwen3", tmp_path)
    assert fresh.available and "at first use" in fresh.detail and not (tmp_path / "models").exists()
    assert probe_base_model("tiny-qwen3", tiny_model_dir.parent.parent).detail == str(tiny_model_dir)
    local = probe_base_model(str(tiny_model_dir), tmp_path)
    assert (local.available, local.source) == (True, "local folder")

    missing = probe_base_model("no-such-org/no-such-model", tmp_path, allow_download=False)
    assert not missing.available and not missing.downloadable
    assert [source for source, _ in missing.tried] == ["local folder", "data dir", "HF cache", "bundled GGUF",
                                                      "hub download"]
    check = doctor.check_base_model("no-such-org/no-such-model", settings(tmp_path, allow_download=False))
    assert check.status == "fail" and "not available offline" in check.detail and "tiny-qwen3" in (check.fix or "")

    monkeypatch.setattr(base_models, "_hub_offline", lambda: False)
    online = probe_base_model("no-such-org/no-such-model", tmp_path)
    assert online.downloadable and not online.available
    assert doctor.check_base_model("no-such-org/no-such-model", settings(tmp_path)).status == "warn"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://user:pw@db:5432/x", "postgresql+psycopg://user:***@db:5432/x"),
    ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://default:p%40ss@[::1]:6380/1", "rediss://default:***@[::1]:6380/1"),
    ("postgresql+psycopg://user@db/x", "postgresql+psycopg://user@db/x"),
    ("sqlite:////tmp/twinkle.db", "sqlite:////tmp/twinkle.db"),
    ("redis://u:pw@host:notaport/0", "redis://u:***@host:notaport/0"),
])
def test_passwords_are_masked_in_urls(url: str, shown: str) -> None:
    assert mask_url(url) == shown
