"""`twinkle runs`, `twinkle checkpoints list` (from the database), the progress bars of `db upgrade`
and `model-path` (stderr, only when asked or on a terminal), and `status` / `checkpoints download`
when no server answers. A real server's answers: tests/integration/test_cli.py."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from server.cli import main
from server.kinds import OpKind
from server.store.database import Database, pending_revisions
from server.store.tables import Checkpoint, Model, RunMetric, Session, Tenant, utcnow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request, tmp_path: Path) -> list[str]:
    """Where (CLI options) a database holds two tenants' runs: acme's with two optimizer steps done,
    one kept checkpoint, one expired and one ephemeral; open-abc's with nothing, its session ended."""
    url = f"sqlite:///{tmp_path / 'twinkle.db'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("make_pg_database")()
    db = Database(url, threads=1)
    db.migrate()
    now = utcnow()

    def fill(s) -> None:
        s.add_all([Tenant(id="t-acme", name="acme"), Tenant(id="open-abc", name="open-abc")])
        s.flush()
        s.add_all([Session(id="s1", tenant_id="t-acme"), Session(id="s2", tenant_id="open-abc", finished_at=now)])
        s.flush()
        s.add_all([
            Model(id="s1:train:0", tenant_id="t-acme", session_id="s1", model_seq_id=0, base_model="tiny-qwen3",
                  lora_rank=8),
            Model(id="s2:train:0", tenant_id="open-abc", session_id="s2", model_seq_id=0, base_model="tiny-llama",
                  lora_rank=4),
        ])
        s.flush()
        s.add_all([
            Checkpoint(id="c1", tenant_id="t-acme", model_id="s1:train:0", kind="training", name="step-2",
                       storage_dir="checkpoints/t-acme/c1", size_bytes=2048, has_optimizer=True),
            Checkpoint(id="c2", tenant_id="t-acme", model_id="s1:train:0", kind="sampler", name="old",
                       storage_dir="checkpoints/t-acme/c2", expires_at=now - timedelta(seconds=1)),
            Checkpoint(id="c3", tenant_id="t-acme", model_id="s1:train:0", kind="sampler", name="eph",
                       storage_dir="checkpoints/t-acme/c3", ephemeral=True),
        ])
        for idx, (kind, step) in enumerate([(OpKind.FORWARD_BACKWARD, 0), (OpKind.OPTIM_STEP, 1),
                                            (OpKind.FORWARD_BACKWARD, 1), (OpKind.OPTIM_STEP, 2)]):
            s.add(RunMetric(model_id="s1:train:0", idx=idx, tenant_id="t-acme", kind=kind, step=step, tokens=4,
                            metrics={}))

    db.call(fill)
    db.close()
    return ["--data-dir", str(tmp_path), "--database-url", url]


def test_runs_lists_every_tenants_runs_with_steps_and_checkpoints(catalog: list[str], capsys) -> None:
    assert main(["runs", *catalog]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "TENANT", "BASE", "MODEL", "RANK", "CREATED", "LAST", "REQUEST", "STEPS",
                                "CHECKPOINTS", "SESSION"]
    assert [line.split()[:4] for line in lines[1:]] == [["s1:train:0", "acme", "tiny-qwen3", "8"],
                                                        ["s2:train:0", "open-abc", "tiny-llama", "4"]]
    assert lines[1].split()[-3:] == ["2", "1", "live"] and lines[2].split()[-3:] == ["0", "0", "ended"]

    assert main(["runs", *catalog, "--tenant", "acme", "--json"]) == 0
    [run] = json.loads(capsys.readouterr().out)
    assert (run["run_id"], run["tenant"], run["steps"], run["checkpoints"], run["session_live"]) == \
        ("s1:train:0", "acme", 2, 1, True)
    assert main(["runs", *catalog, "--tenant", "open-abc", "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == ["s2:train:0"]
    assert main(["runs", *catalog, "--tenant", "t-acme", "--json"]) == 0  # a tenant's id, as well as its name
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == ["s1:train:0"]

    assert main(["runs", *catalog, "--tenant", "nobody"]) == 1
    assert "no tenant named 'nobody'" in capsys.readouterr().err


def test_checkpoints_list_shows_kept_named_checkpoints(catalog: list[str], capsys) -> None:
    assert main(["checkpoints", "list", *catalog]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["PATH", "TENANT", "SIZE"]
    assert [line.split()[:4] for line in lines[1:]] == [["tinker://s1:train:0/weights/step-2", "acme", "2.0", "KiB"]]
    assert main(["checkpoints", "list", *catalog, "--run", "s1:train:0", "--json"]) == 0
    [ckpt] = json.loads(capsys.readouterr().out)
    assert (ckpt["path"], ckpt["size_bytes"], ckpt["has_optimizer"]) == ("tinker://s1:train:0/weights/step-2", 2048, True)
    assert main(["checkpoints", "list", *catalog, "--tenant", "open-abc", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["checkpoints", "list", *catalog, "--tenant", "t-acme", "--json"]) == 0
    assert [c["name"] for c in json.loads(capsys.readouterr().out)] == ["step-2"]


@pytest.mark.parametrize("command", [["runs"], ["checkpoints", "list"]])
def test_listings_create_and_upgrade_nothing(command: list[str], tmp_path: Path, capsys) -> None:
    """A mistyped --data-dir is an error naming the database it looked for, not an empty table; a
    database without the schema is not upgraded by a command that only reads."""
    typo = tmp_path / "no-such-dir"
    assert main([*command, "--data-dir", str(typo)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"twinkle: no database at {typo / 'twinkle.db'}: check --data-dir / --database-url " \
                                "(a server creates it at its first start)\n"
    assert not typo.exists()

    file = tmp_path / "twinkle.db"
    with sqlite3.connect(file) as conn:  # a database, without Twinkle's schema
        conn.execute("CREATE TABLE other (x)")
    assert main([*command, "--data-dir", str(tmp_path)]) == 2
    assert "run `twinkle db upgrade`" in capsys.readouterr().err
    with sqlite3.connect(file) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [("other",)]


def test_progress_goes_to_stderr_only_when_asked_or_on_a_terminal(tmp_path: Path, capsys) -> None:
    """Captured output is no terminal: no bar unless --progress, and stdout stays the answer alone."""
    assert main(["db", "upgrade", "--data-dir", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "up to date" in out and err == ""
    fresh = Database(f"sqlite:///{tmp_path / 'empty.db'}", threads=1)
    try:
        revisions = pending_revisions(fresh.engine)
    finally:
        fresh.close()
    assert main(["db", "upgrade", "--data-dir", str(tmp_path / "b"), "--progress"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("schema revision") and "schema 0001" not in out
    n = len(revisions)  # the last step, drawn once, no terminal codes
    assert f"schema {revisions[-1]}:" in err and f" {n}/{n} " in err and "\x1b[" not in err

    assert main(["model-path", "tiny-qwen3", "--data-dir", str(tmp_path / "c"), "--progress"]) == 0
    out, err = capsys.readouterr()
    assert Path(out.strip()) == tmp_path / "c" / "models" / "tiny-qwen3"
    assert "building tiny-qwen3" in err and "1/1" in err
    assert main(["model-path", "tiny-qwen3", "--data-dir", str(tmp_path / "c"), "--progress"]) == 0
    assert capsys.readouterr().err == ""  # already built: nothing to show


def test_resolving_a_model_reports_its_build_steps(tmp_path: Path) -> None:
    from workers.base_models import resolve_base_model

    heard: list[tuple[str, int, int]] = []
    resolve_base_model("tiny-qwen3", tmp_path, allow_download=False, progress=lambda *a: heard.append(a))
    assert heard == [("building tiny-qwen3", 0, 1), ("building tiny-qwen3", 1, 1)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWINKLE_", "TINKER_"))}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHONPATH": str(ROOT)})


def test_status_and_download_say_plainly_that_no_server_answers(tmp_path: Path) -> None:
    done = run_cli("status", "--url", "http://127.0.0.1:1", "--api-key", "tml-x")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("twinkle: no server answers at http://127.0.0.1:1")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1

    done = run_cli("checkpoints", "download", "tinker://run/weights/x", "--url", "http://127.0.0.1:1",
                   "--api-key", "tml-x", "-o", str(tmp_path / "x.tar"))
    assert done.returncode == 1 and "no server answers" in done.stderr and not (tmp_path / "x.tar").exists()

    done = run_cli("checkpoints", "download", "not-a-path", "--api-key", "tml-x")
    assert done.returncode == 1 and "expected a tinker:// path" in done.stderr
