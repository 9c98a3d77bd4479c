"""`twinkle` command line: model-path and option errors (serve itself is exercised by every
integration test, which starts `python -m server.cli serve`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main


def test_model_path_prints_the_materialised_folder(data_dir: Path, tiny_model_dir: Path, capsys) -> None:
    assert main(["model-path", "tiny-qwen3", "--data-dir", str(data_dir)]) == 0
    assert Path(capsys.readouterr().out.strip()) == tiny_model_dir
    assert (tiny_model_dir / "tokenizer.json").exists()


def test_model_path_of_an_unknown_model_explains_what_was_tried(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TWINKLE_ALLOW_DOWNLOAD", "false")
    assert main(["model-path", "no-such-org/no-such-model", "--data-dir", str(tmp_path)]) == 1
    assert "no-such-org/no-such-model" in capsys.readouterr().err


def test_bad_option_names_the_flag_and_env_var(tmp_path: Path, capsys) -> None:
    assert main(["serve", "--port", "70000", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--port" in err and "TWINKLE_PORT" in err


def test_config_file_values_reach_the_settings(tmp_path: Path, capsys) -> None:
    config = tmp_path / "twinkle.yaml"
    config.write_text("port: -1\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "port" in capsys.readouterr().err


def test_unknown_command_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_a_postgresql_schema_changes_only_by_a_deliberate_upgrade(tmp_path: Path, make_pg_database, capsys) -> None:
    """SQLite is upgraded at start; a shared PostgreSQL only by `twinkle db upgrade` (or
    --db-upgrade): serving or using an empty or older one is refused, saying what to run."""
    where = ["--database-url", make_pg_database(), "--data-dir", str(tmp_path)]
    assert main(["serve", "--port", "0", *where]) == 2
    assert "run `twinkle db upgrade`" in capsys.readouterr().err
    assert main(["tenants", "create", "acme", *where]) == 2
    assert "run `twinkle db upgrade`" in capsys.readouterr().err
    assert main(["db", "status", *where]) == 1
    assert "none (empty database): needs `twinkle db upgrade`" in capsys.readouterr().out
    assert main(["db", "upgrade", *where]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["tenants", "create", "acme", *where]) == 0
    assert main(["db", "status", *where]) == 0
