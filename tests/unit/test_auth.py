"""Tenants and keys without HTTP: key generation and display, the key cache, the auth settings,
the refusal to serve open auth beyond loopback, and the `twinkle tenants` / `twinkle keys`
commands on a real database (SQLite; PostgreSQL where the store tests need it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server import ids
from server.cli import main
from server.config import ConfigError, Settings, bind_problem, is_loopback, load_settings
from server.errors import Conflict, InvalidRequest, NotFound
from server.store.database import Database
from server.store.tables import ApiKey
from server.tenancy import keys, tenants

ADMIN_KEY = "admin-key-of-the-unit-tests-0123456789"


# ----- keys ------------------------------------------------------------------------------------
def test_new_keys_are_tml_and_256_random_bits() -> None:
    made = {keys.new_key() for _ in range(100)}
    assert len(made) == 100
    for key in made:
        assert key.startswith("tml-") and len(key) == 4 + 43  # token_urlsafe(32): 43 characters
        assert set(key[4:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_only_long_keys_show_a_prefix_and_only_12_characters() -> None:
    key = keys.new_key()
    assert keys.shown_prefix(key) == key[:12]
    assert keys.shown_prefix("tml-local") is None  # a short key would be shown almost whole
    assert keys.shown_prefix("tml-" + "x" * 31) is None
    assert keys.shown_prefix("tml-" + "x" * 32) == "tml-xxxxxxxx"


def test_key_cache_expires_forgets_and_stays_bounded(monkeypatch) -> None:
    cache = keys.KeyCache(seconds=5.0)
    hit = keys.KeyHit("tn-1", "key-1")
    cache.put("h1", hit, now=100.0)
    assert cache.get("h1", 104.9) == hit
    assert cache.get("h1", 105.0) is None  # expired: the next request asks the database again
    cache.put("h1", hit, now=200.0)
    cache.put("h2", keys.KeyHit("tn-1", "key-2"), now=200.0)
    cache.forget_key("key-1")
    assert cache.get("h1", 200.0) is None and cache.get("h2", 200.0) is not None
    monkeypatch.setattr(keys, "CACHE_MAX_ENTRIES", 3)
    for i in range(10):
        cache.put(f"x{i}", hit, now=300.0)
    assert len(cache._entries) <= 3


def test_a_lookup_that_raced_a_revocation_is_not_cached() -> None:
    cache = keys.KeyCache(seconds=5.0)
    started = cache.generation  # a lookup reads the key from the database...
    cache.forget_key("key-1")  # ...while the key is revoked
    cache.put("h1", keys.KeyHit("tn-1", "key-1"), now=100.0, generation=started)
    assert cache.get("h1", 100.0) is None
    cache.put("h1", keys.KeyHit("tn-1", "key-1"), now=100.0, generation=cache.generation)
    assert cache.get("h1", 100.0) is not None


# ----- settings ----------------------------------------------------------------------------------
def test_auth_defaults_to_open_and_comes_from_env_yaml_and_flags(tmp_path: Path) -> None:
    assert Settings().auth == "open" and Settings().admin_key is None
    assert load_settings(env={"TWINKLE_AUTH": "keys"}).auth == "keys"
    config = tmp_path / "c.yaml"
    config.write_text("auth: keys\n")
    assert load_settings(env={}, config_file=config).auth == "keys"
    assert load_settings(cli={"auth": "open"}, env={"TWINKLE_AUTH": "keys"}).auth == "open"
    with pytest.raises(ConfigError) as exc:
        load_settings(env={"TWINKLE_AUTH": "none"})
    assert "--auth" in str(exc.value) and "TWINKLE_AUTH" in str(exc.value)


def test_admin_key_is_held_only_as_its_hash() -> None:
    settings = load_settings(env={"TWINKLE_ADMIN_KEY": ADMIN_KEY})
    assert settings.admin_key == "sha256:" + ids.hash_key(ADMIN_KEY)
    assert ADMIN_KEY not in settings.to_env() and ADMIN_KEY not in repr(settings)
    # The hash itself may be configured (a config file need not hold the key) and is kept as is,
    # also when the CLI hands the settings to the app through the environment.
    assert Settings(admin_key=settings.admin_key).admin_key == settings.admin_key
    assert Settings.model_validate_json(settings.to_env()).admin_key == settings.admin_key
    assert load_settings(env={"TWINKLE_ADMIN_KEY": ""}).admin_key is None


def test_a_short_admin_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(env={"TWINKLE_ADMIN_KEY": "hunter2"})
    assert "admin_key" in str(exc.value) and "16 characters" in str(exc.value)
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.com", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_open_auth_is_refused_beyond_loopback_and_keys_auth_is_not() -> None:
    assert bind_problem(Settings(host="127.0.0.1")) is None
    assert bind_problem(Settings(host="0.0.0.0", auth="keys")) is None
    problem = bind_problem(Settings(host="0.0.0.0"))
    assert problem is not None and "0.0.0.0" in problem and "--auth keys" in problem and "127.0.0.1" in problem


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_serve_refuses_open_auth_beyond_loopback(host: str, tmp_path: Path, capsys, monkeypatch) -> None:
    # Belt and braces: if the check were missing, the server still could not start (and so never
    # bind): its base model does not exist and may not be downloaded.
    monkeypatch.setenv("TWINKLE_ALLOW_DOWNLOAD", "false")
    argv = ["serve", "--host", host, "--port", "0", "--data-dir", str(tmp_path), "--base-model", str(tmp_path / "none")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"refusing to serve on {host} with --auth open" in err and "--auth keys" in err
    monkeypatch.setenv("TWINKLE_AUTH", "open")
    assert main(argv) == 2


# ----- the store functions ---------------------------------------------------------------------
@pytest.fixture
def db(tmp_path: Path):
    database = Database(f"sqlite:///{tmp_path / 'auth.db'}", threads=1)
    database.migrate()
    yield database
    database.close()


def test_tenant_names_are_unique_and_checked(db: Database) -> None:
    made = db.call(lambda s: tenants.create_tenant(s, "acme", {"max_live_models": 3}))
    assert made.name == "acme" and made.limits == {"max_live_models": 3} and made.active_keys == 0
    with pytest.raises(Conflict):
        db.call(lambda s: tenants.create_tenant(s, "acme"))
    for bad in ("", "-acme", "a b", "a/b", "x" * 65, "ünï"):
        with pytest.raises(InvalidRequest) as exc:
            db.call(lambda s, bad=bad: tenants.create_tenant(s, bad))
        assert exc.value.field == "name"
    with pytest.raises(NotFound):
        db.call(lambda s: tenants.get_tenant(s, "nobody"))


@pytest.mark.parametrize(
    ("limits", "field"),
    [({"max_live_model": 3}, "limits.max_live_model"), ({"max_live_models": 0}, "limits.max_live_models"),
     ({"max_live_models": 1.5}, "limits.max_live_models"), ({"requests_per_second": -1}, "limits.requests_per_second"),
     ({"max_live_models": True}, "limits.max_live_models"), ({"max_live_models": "3"}, "limits.max_live_models")],
)
def test_limits_are_checked_against_the_quota_settings(db: Database, limits: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        db.call(lambda s: tenants.create_tenant(s, "limited", limits))
    assert exc.value.field == field


def test_keys_are_stored_as_hashes_and_resolve_until_revoked(db: Database) -> None:
    db.call(lambda s: tenants.create_tenant(s, "acme"))
    made = db.call(lambda s: tenants.create_key(s, "acme", "ci"))
    assert made.key.startswith("tml-") and made.prefix == made.key[:12] and made.label == "ci"
    row = db.call(lambda s: s.get(ApiKey, made.id))
    assert row.key_hash == ids.hash_key(made.key) and made.key not in (row.key_hash, row.prefix, row.label)
    hit = db.call(lambda s: keys.resolve_key(s, ids.hash_key(made.key)))
    assert hit is not None and hit.key_id == made.id
    assert db.call(lambda s: tenants.get_tenant(s, "acme")).active_keys == 1
    assert db.call(lambda s: s.get(ApiKey, made.id)).last_used_at is not None
    assert db.call(lambda s: keys.resolve_key(s, ids.hash_key("tml-unknown"))) is None

    revoked = db.call(lambda s: tenants.revoke_key(s, made.id))
    assert revoked.revoked_at is not None
    assert db.call(lambda s: tenants.revoke_key(s, made.id)).revoked_at == revoked.revoked_at  # idempotent
    assert db.call(lambda s: keys.resolve_key(s, ids.hash_key(made.key))) is None
    # Open mode does not bring a revoked key back as a new tenant.
    assert db.call(lambda s: keys.resolve_key(s, ids.hash_key(made.key), register=True)) is None
    assert db.call(lambda s: tenants.get_tenant(s, "acme")).active_keys == 0
    with pytest.raises(NotFound):
        db.call(lambda s: tenants.revoke_key(s, "key-nope"))
    with pytest.raises(NotFound):
        db.call(lambda s: tenants.create_key(s, "nobody"))


def test_open_mode_registers_each_new_key_once(db: Database) -> None:
    key_hash = ids.hash_key("tml-open-mode")
    first = db.call(lambda s: keys.resolve_key(s, key_hash, register=True, prefix=None))
    again = db.call(lambda s: keys.resolve_key(s, key_hash, register=True, prefix=None))
    assert first == again
    listed = db.call(lambda s: tenants.list_keys(s))
    assert [(k.id, k.prefix, k.label) for k in listed] == [(first.key_id, None, "open mode")]
    assert listed[0].tenant.startswith("open-")


# ----- the commands ------------------------------------------------------------------------------
def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tenants_and_keys_commands(tmp_path: Path, capsys) -> None:
    where = ("--data-dir", str(tmp_path))
    code, out, _ = run(capsys, "tenants", "create", "acme", "--limit", "max_live_models=3",
                       "--limit", "requests_per_second=2.5", *where)
    assert code == 0
    assert json.loads(out)["limits"] == {"max_live_models": 3, "requests_per_second": 2.5}
    code, _, err = run(capsys, "tenants", "create", "acme", *where)
    assert code == 1 and "exists already" in err

    code, key, err = run(capsys, "keys", "create", "--tenant", "acme", "--label", "laptop", *where)
    key = key.strip()
    assert code == 0 and key.startswith("tml-") and len(key) == 47 and "\n" not in key
    assert "only time" in err and key not in err
    code, _, err = run(capsys, "keys", "create", "--tenant", "nobody", *where)
    assert code == 1 and "no tenant named 'nobody'" in err

    code, out, _ = run(capsys, "keys", "list", *where)
    assert code == 0 and "laptop" in out and key[:12] in out and key not in out
    code, out, _ = run(capsys, "keys", "list", "--json", "--tenant", "acme", *where)
    [listed] = json.loads(out)
    assert listed["tenant"] == "acme" and "key" not in listed and listed["revoked_at"] is None

    code, out, _ = run(capsys, "tenants", "list", *where)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "ID", "KEYS"] and "acme" in out
    code, out, _ = run(capsys, "tenants", "list", "--json", *where)
    assert [t["active_keys"] for t in json.loads(out)] == [1]

    code, out, _ = run(capsys, "tenants", "limits", "acme", *where)
    assert json.loads(out) == {"max_live_models": 3, "requests_per_second": 2.5}
    code, out, _ = run(capsys, "tenants", "limits", "acme", "--unset", "requests_per_second",
                       "--limit", "max_lora_rank=16", *where)
    assert code == 0 and json.loads(out) == {"max_live_models": 3, "max_lora_rank": 16}
    code, _, err = run(capsys, "tenants", "limits", "acme", "--limit", "max_lora_rank=0", *where)
    assert code == 1 and "max_lora_rank" in err
    code, out, _ = run(capsys, "tenants", "limits", "acme", "--clear", *where)
    assert json.loads(out) == {}
    code, out, _ = run(capsys, "tenants", "show", "acme", *where)
    assert json.loads(out)["limits"] == {}

    code, out, _ = run(capsys, "keys", "revoke", listed["id"], *where)
    assert code == 0 and json.loads(out)["revoked_at"] is not None
    code, out, _ = run(capsys, "keys", "list", "--active", *where)
    assert listed["id"] not in out
    code, _, err = run(capsys, "keys", "revoke", "key-nope", *where)
    assert code == 1 and "key-nope" in err

    # The database holds the key's hash, never the key.
    for path in tmp_path.glob("twinkle.db*"):
        assert key.encode() not in path.read_bytes()


@pytest.mark.parametrize(
    "argv",
    [["tenants", "create", "x", "--limit", "max_live_models"], ["tenants", "create", "x", "--limit", "=3"],
     ["tenants", "create", "x", "--limit", "max_live_models=lots"], ["keys", "create"], ["keys", "revoke"],
     ["tenants", "frobnicate"], ["keys"]],
)
def test_bad_command_lines_are_usage_errors(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--data-dir", str(tmp_path)])
    assert exc.value.code == 2


def test_bad_names_and_limits_exit_1_with_the_reason(tmp_path: Path, capsys) -> None:
    where = ("--data-dir", str(tmp_path))
    code, _, err = run(capsys, "tenants", "create", "a b", *where)
    assert code == 1 and "tenant names" in err
    code, _, err = run(capsys, "tenants", "create", "x", "--limit", "nope=1", *where)
    assert code == 1 and "unknown limit 'nope'" in err
    code, _, err = run(capsys, "tenants", "show", "nobody", *where)
    assert code == 1 and "no tenant" in err
    code, _, err = run(capsys, "keys", "list", "--tenant", "nobody", *where)
    assert code == 1 and "no tenant" in err


def test_commands_use_the_database_url_and_config_file(tmp_path: Path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert run(capsys, "tenants", "create", "acme", "--database-url", url)[0] == 0
    config = tmp_path / "twinkle.yaml"
    config.write_text(f"database_url: {url}\n")
    code, out, _ = run(capsys, "tenants", "list", "--json", "--config", str(config))
    assert code == 0 and [t["name"] for t in json.loads(out)] == ["acme"]
