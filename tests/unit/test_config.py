"""server.config: default < YAML (--config) < env TWINKLE_<NAME> < CLI, and errors that name the option."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from server.config import RESOLVED_ENV, ConfigError, Settings, load_settings, settings_from_env


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "twinkle.yaml"
    path.write_text(text)
    return path


def test_defaults_with_nothing_given() -> None:
    s = load_settings(cli={}, env={})
    assert s == Settings()
    assert s.host == "127.0.0.1" and s.port == 8000 and s.database_url is None


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path, "port: 9001\nhost: 0.0.0.0\nlora_alpha: 8\nlog_level: debug\n")
    env = {"TWINKLE_PORT": "9002", "TWINKLE_HOST": "10.0.0.1", "TWINKLE_LORA_ALPHA": "4"}
    cli = {"port": 9003}

    only_yaml = load_settings(cli={}, env={}, config_file=cfg)
    assert (only_yaml.port, only_yaml.host, only_yaml.lora_alpha, only_yaml.log_level) == (9001, "0.0.0.0", 8.0, "debug")

    yaml_env = load_settings(cli={}, env=env, config_file=cfg)
    assert (yaml_env.port, yaml_env.host, yaml_env.lora_alpha, yaml_env.log_level) == (9002, "10.0.0.1", 4.0, "debug")

    everything = load_settings(cli=cli, env=env, config_file=cfg)
    assert (everything.port, everything.host, everything.lora_alpha, everything.log_level) == (
        9003,
        "10.0.0.1",
        4.0,
        "debug",
    )
    # Untouched options keep their defaults.
    assert everything.max_lora_rank == Settings().max_lora_rank


def test_cli_none_means_not_given(tmp_path: Path) -> None:
    # argparse hands over None for flags that were not on the command line.
    cfg = write_yaml(tmp_path, "port: 9001\n")
    s = load_settings(cli={"port": None, "host": None}, env={"TWINKLE_HOST": "h"}, config_file=cfg)
    assert s.port == 9001 and s.host == "h"


def test_env_strings_are_converted() -> None:
    s = load_settings(
        env={
            "TWINKLE_ALLOW_DOWNLOAD": "false",
            "TWINKLE_TORCH_THREADS": "3",
            "TWINKLE_LONG_POLL_SECONDS": "1.5",
            "TWINKLE_DATA_DIR": "/tmp/somewhere",
        }
    )
    assert s.allow_download is False
    assert s.torch_threads == 3
    assert s.long_poll_seconds == 1.5
    assert s.data_dir == Path("/tmp/somewhere")


def test_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINKLE_PORT", "9555")
    assert load_settings().port == 9555


def test_unrelated_env_is_ignored() -> None:
    s = load_settings(env={"TWINKLE_NOT_AN_OPTION": "x", "PORT": "1", RESOLVED_ENV: "{}"})
    assert s == Settings()


def test_yaml_dashed_keys_are_accepted(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path, "long-poll-seconds: 3\nmax-lora-rank: 16\n")
    s = load_settings(env={}, config_file=cfg)
    assert s.long_poll_seconds == 3.0 and s.max_lora_rank == 16


def test_empty_yaml_is_all_defaults(tmp_path: Path) -> None:
    assert load_settings(env={}, config_file=write_yaml(tmp_path, "")) == Settings()


def test_unknown_yaml_key_names_option_flag_and_env(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path, "port: 9000\nwarp_speed: 9\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, config_file=cfg)
    msg = str(info.value)
    assert "warp_speed" in msg and "--warp-speed" in msg and "TWINKLE_WARP_SPEED" in msg
    assert "--port" not in msg and "TWINKLE_PORT" not in msg  # only the bad option is reported


@pytest.mark.parametrize(
    ("source", "name", "flag", "env_name"),
    [
        ("yaml", "port", "--port", "TWINKLE_PORT"),
        ("env", "port", "--port", "TWINKLE_PORT"),
        ("cli", "port", "--port", "TWINKLE_PORT"),
        ("env", "long_poll_seconds", "--long-poll-seconds", "TWINKLE_LONG_POLL_SECONDS"),
        ("yaml", "torch_threads", "--torch-threads", "TWINKLE_TORCH_THREADS"),
    ],
)
def test_bad_value_names_option_flag_and_env(tmp_path: Path, source: str, name: str, flag: str, env_name: str) -> None:
    bad = {"port": "not-a-port", "long_poll_seconds": "60", "torch_threads": "0"}[name]
    kwargs: dict = {"env": {}}
    if source == "yaml":
        kwargs["config_file"] = write_yaml(tmp_path, f"{name}: {bad!r}\n")
    elif source == "env":
        kwargs["env"] = {env_name: bad}
    else:
        kwargs["cli"] = {name: bad}
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    msg = str(info.value)
    assert name in msg and flag in msg and env_name in msg
    assert "Traceback" not in msg


def test_port_out_of_range_is_rejected() -> None:
    with pytest.raises(ConfigError, match="TWINKLE_PORT"):
        load_settings(env={}, cli={"port": 70000})


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path, "- port\n- 9000\n")
    with pytest.raises(ConfigError, match="--config"):
        load_settings(env={}, config_file=cfg)


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        load_settings(env={}, config_file=write_yaml(tmp_path, "port: [9000\n"))
    with pytest.raises(ConfigError, match="--config"):
        load_settings(env={}, config_file=tmp_path / "missing.yaml")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_resolved_database_url_default_is_sqlite_file_in_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(data_dir=tmp_path / "data")
    url = make_url(s.resolved_database_url)
    assert url.get_backend_name() == "sqlite"
    assert Path(url.database) == (tmp_path / "data" / "twinkle.db").resolve()
    assert Path(url.database).is_absolute()

    # A relative data dir is resolved against the working directory at resolve time.
    monkeypatch.chdir(tmp_path)
    rel = make_url(Settings(data_dir=Path("rel")).resolved_database_url)
    assert Path(rel.database) == (tmp_path / "rel" / "twinkle.db").resolve()


def test_resolved_database_url_prefers_explicit_url() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/twinkle"
    assert Settings(database_url=url).resolved_database_url == url
    assert load_settings(env={"TWINKLE_DATABASE_URL": url}).resolved_database_url == url


def test_settings_from_env_round_trips_resolved_settings(tmp_path: Path) -> None:
    original = load_settings(
        cli={"port": 9123, "allow_download": False},
        env={"TWINKLE_DATA_DIR": str(tmp_path), "TWINKLE_DATABASE_URL": "sqlite:///x.db"},
        config_file=write_yaml(tmp_path, "lora_alpha: 7.5\nlog_level: warning\n"),
    )
    env = {RESOLVED_ENV: original.to_env(), "TWINKLE_PORT": "1"}  # the resolved JSON wins over loose env
    restored = settings_from_env(env)
    assert restored == original
    assert isinstance(restored.data_dir, Path)


def test_settings_from_env_without_resolved_settings_uses_env_and_defaults() -> None:
    s = settings_from_env({"TWINKLE_PORT": "9321"})
    assert s.port == 9321 and s.host == Settings().host


def test_settings_from_env_bad_env_is_config_error() -> None:
    with pytest.raises(ConfigError, match="TWINKLE_PORT"):
        settings_from_env({"TWINKLE_PORT": "x"})


def test_device_dtype_and_pass_budget_follow_the_env_and_config_rule(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("device: cuda:1\ndtype: bfloat16\nmax_tokens_per_pass: 4096\n")
    s = load_settings(cli={"dtype": "float32"}, env={"TWINKLE_MAX_TOKENS_PER_PASS": "2048"}, config_file=config)
    assert (s.device, s.dtype, s.max_tokens_per_pass) == ("cuda:1", "float32", 2048)
    assert (load_settings(env={}).device, load_settings(env={}).dtype) == (None, None)  # chosen for the machine
    for env, name in (({"TWINKLE_DEVICE": "tpu"}, "device"), ({"TWINKLE_DTYPE": "float16"}, "dtype"),
                      ({"TWINKLE_MAX_TOKENS_PER_PASS": "0"}, "max_tokens_per_pass")):
        with pytest.raises(ConfigError, match=name):
            load_settings(env=env)


def test_the_schema_is_upgraded_at_start_on_sqlite_only_unless_told() -> None:
    assert Settings().upgrades_schema
    pg = "postgresql+psycopg://postgres@127.0.0.1/x"
    assert not Settings(database_url=pg).upgrades_schema
    assert Settings(database_url=pg, db_upgrade=True).upgrades_schema
    assert not Settings(db_upgrade=False).upgrades_schema
    assert load_settings(env={"TWINKLE_DB_UPGRADE": "true", "TWINKLE_DATABASE_URL": pg}).upgrades_schema


def test_root_path_is_a_clean_url_path() -> None:
    assert Settings(root_path="/twinkle/v2").root_path == "/twinkle/v2"
    for bad in ("twinkle", "/twinkle/", "/a b", "/../x"):
        with pytest.raises(ConfigError, match="root_path"):
            load_settings(env={"TWINKLE_ROOT_PATH": bad})


def test_several_base_models_by_flag_env_or_yaml(tmp_path: Path) -> None:
    assert Settings(base_model="tiny-qwen3").base_models == ["tiny-qwen3"]
    assert load_settings(env={"TWINKLE_BASE_MODEL": "tiny-qwen3, tiny-llama"}).base_models == ["tiny-qwen3", "tiny-llama"]
    assert load_settings(cli={"base_model": ["tiny-llama", "tiny-qwen3"]}).base_models == ["tiny-llama", "tiny-qwen3"]
    config = tmp_path / "c.yaml"
    config.write_text("base_model: [tiny-qwen3, tiny-llama]\n")
    assert load_settings(env={}, config_file=config).base_models == ["tiny-qwen3", "tiny-llama"]
    for bad in ("tiny-qwen3,tiny-qwen3", " , "):
        with pytest.raises(ConfigError, match="base_model"):
            load_settings(env={"TWINKLE_BASE_MODEL": bad})


def test_redis_url_and_prefix_are_checked() -> None:
    s = load_settings(env={"TWINKLE_REDIS_URL": "redis://127.0.0.1:6379/0", "TWINKLE_REDIS_PREFIX": "prod:eu"})
    assert (s.redis_url, s.redis_prefix) == ("redis://127.0.0.1:6379/0", "prod:eu")
    assert Settings().redis_url is None  # one process, no Redis: as before
    for env, name in (({"TWINKLE_REDIS_URL": "http://x"}, "redis_url"), ({"TWINKLE_REDIS_PREFIX": "a b"}, "redis_prefix")):
        with pytest.raises(ConfigError, match=name):
            load_settings(env=env)
