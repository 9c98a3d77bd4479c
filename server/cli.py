"""`twinkle` command line: the parser and the dispatch; the newer commands' bodies are in
`server/commands/` (doctor, status, runs, checkpoints).

`twinkle tenants ...`, `keys ...`, `runs` and `checkpoints list` work on the database directly (the
one `serve` would use with the same --data-dir / --database-url / --config), also while a server
runs on it. `status` and `checkpoints download` ask a running server over HTTP (--url, --api-key).
Output is for scripts: one JSON object per answer, tables for lists (or JSON with --json), and
`keys create` prints the new key alone on stdout. `doctor` and `status` print for people (--json
for scripts); progress bars go to stderr, and only on a terminal (or with --progress)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.commands.output import print_json as _print_json
from server.commands.output import print_table as _print_table
from server.commands.output import progress_wanted, steps
from server.commands.output import when as _when
from server.config import RESOLVED_ENV, ConfigError, Settings, bind_problem, bind_socket, load_settings

APP_FACTORY = "gateway.app:create_app_from_env"


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the server (embedded: SQLite + in-process engine)")
    p.add_argument("--config", type=Path, help="YAML file with any of the options below")
    p.add_argument("--host", help="bind address (default 127.0.0.1; env TWINKLE_HOST)")
    p.add_argument("--port", type=int, help="port, 0 picks a free one (default 8000; env TWINKLE_PORT)")
    p.add_argument("--root-path", help="the path the server is reached under behind a proxy, e.g. /twinkle "
                                       "(env TWINKLE_ROOT_PATH)")
    p.add_argument("--base-model", action="append",
                   help="served base model: a name or a local folder; repeat to serve several, the first the "
                        "default (env TWINKLE_BASE_MODEL, comma-separated)")
    p.add_argument("--data-dir", type=Path, help="where the database, models and checkpoints live (env TWINKLE_DATA_DIR)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the data dir; env TWINKLE_DATABASE_URL)")
    p.add_argument("--torch-threads", type=int, help="torch threads of the compute thread (env TWINKLE_TORCH_THREADS)")
    p.add_argument("--redis-url", help="Redis for several server processes on one database, e.g. "
                                       "redis://127.0.0.1:6379/0 (env TWINKLE_REDIS_URL)")
    p.add_argument("--db-upgrade", action="store_true", default=None,
                   help="upgrade the database schema at start (default: on SQLite only; env TWINKLE_DB_UPGRADE)")
    p.add_argument("--engine", choices=("local", "ray"),
                   help="local: compute in this process (default); ray: Ray Serve trainer and sampler deployments "
                        "(env TWINKLE_ENGINE)")
    p.add_argument("--sampler", choices=("hf", "vllm"),
                   help="hf: transformers on the trainer's model (default); vllm: vLLM with runtime LoRA, from "
                        ".venv-vllm on a CPU (make install-vllm; env TWINKLE_SAMPLER)")
    p.add_argument("--ray-address", help="with --engine ray: the Ray cluster to join, 'auto' or host:port (default: "
                                         "start a private local cluster; env TWINKLE_RAY_ADDRESS)")
    p.add_argument("--ray-sampler-replicas", type=int,
                   help="with --engine ray: sampler replicas per base model (default 1; env TWINKLE_RAY_SAMPLER_REPLICAS)")
    for role in ("trainer", "sampler"):
        for unit in ("cpus", "gpus"):
            p.add_argument(f"--ray-{role}-{unit}", type=float,
                           help=f"with --engine ray: {unit.upper()[:-1]}s of each {role} replica "
                                f"(env TWINKLE_RAY_{role.upper()}_{unit.upper()})")
    p.add_argument("--advertise-url", help="where the other server processes of a deployment reach this one "
                                           "(default http://<host>:<port><root-path>; env TWINKLE_ADVERTISE_URL)")
    p.add_argument("--print-serve-config", action="store_true",
                   help="print the Ray Serve config of these settings (for `serve run` or a KubeRay RayService) and exit")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one; env TWINKLE_DEVICE)")
    p.add_argument("--dtype", help="float32 or bfloat16 (default: float32 on a CPU, bfloat16 on a GPU; env TWINKLE_DTYPE)")
    p.add_argument("--pass-memory-mb", type=int,
                   help="activation memory of one forward/backward pass; larger requests run in several "
                        "(default 1024 on a CPU, a quarter of a GPU; env TWINKLE_PASS_MEMORY_MB)")
    p.add_argument("--max-tokens-per-pass", type=int,
                   help="padded tokens in one pass (default: as many as --pass-memory-mb holds; "
                        "env TWINKLE_MAX_TOKENS_PER_PASS)")
    p.add_argument("--log-level", help="debug, info, warning (env TWINKLE_LOG_LEVEL)")
    p.add_argument(
        "--auth", choices=("keys", "open"),
        help="keys: registered API keys only; open: every key is its own tenant, loopback only "
        "(default open; env TWINKLE_AUTH)",
    )
    p.add_argument("--admin-key", help="enables the admin API under /twinkle/v1/admin (env TWINKLE_ADMIN_KEY, "
                   "which keeps it out of the process list; or 'sha256:<hex>' of it)")


def _store_options(p: argparse.ArgumentParser, redis_help: str | None = None) -> None:
    p.add_argument("--config", type=Path, help="YAML file with data_dir / database_url")
    p.add_argument("--data-dir", type=Path, help="the server's data dir (env TWINKLE_DATA_DIR)")
    p.add_argument("--database-url", help="the server's database (env TWINKLE_DATABASE_URL)")
    p.add_argument("--redis-url", help=redis_help or "the servers' Redis, to tell them of a revoked key at once "
                                                     "(env TWINKLE_REDIS_URL)")


def _server_options(p: argparse.ArgumentParser) -> None:
    """For the commands that ask a running server over HTTP."""
    p.add_argument("--url", help="the server (default http://127.0.0.1:8000; env TWINKLE_URL, else TINKER_BASE_URL)")
    p.add_argument("--api-key", help="an API key of the server (env TWINKLE_API_KEY, else TINKER_API_KEY)")


def _progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on stderr (default: only when stderr is a terminal)")


def _doctor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this install (torch, database, Redis, Ray, vLLM, base models, disk, "
                                      "port) and say what to fix; exit 1 if serving would fail")
    _store_options(p, "the servers' Redis, checked with a PING (env TWINKLE_REDIS_URL)")
    p.add_argument("--base-model", action="append", help="base model(s) to look for, as serve takes them "
                                                         "(env TWINKLE_BASE_MODEL)")
    p.add_argument("--host", help="the address serve would bind (env TWINKLE_HOST)")
    p.add_argument("--port", type=int, help="the port serve would bind (env TWINKLE_PORT)")
    p.add_argument("--engine", choices=("local", "ray"), help="as serve's; with ray, Ray is required")
    p.add_argument("--sampler", choices=("hf", "vllm"), help="as serve's; with vllm, vLLM is required")
    p.add_argument("--db-upgrade", action="store_true", default=None,
                   help="as serve's: an older schema is then no failure (env TWINKLE_DB_UPGRADE)")
    p.add_argument("--min-free-gb", type=float, default=5.0, help="warn below this much free disk in the data dir "
                                                                  "(default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")


def _status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a running server's state: base models, adapters resident and paged, queues, "
                                      "your tenant's usage")
    _server_options(p)
    p.add_argument("--json", action="store_true", help="the server's answer as JSON instead of tables")


def _runs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list training runs (from the database)")
    p.add_argument("--tenant", help="only this tenant's (a name, or an id such as open-…)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    _store_options(p)


def _checkpoints_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoints", help="list checkpoints, or download one from a running server")
    cmds = p.add_subparsers(dest="action", required=True)
    ls = cmds.add_parser("list", help="list named checkpoints that have not expired (from the database)")
    ls.add_argument("--tenant", help="only this tenant's (a name, or an id such as open-…)")
    ls.add_argument("--run", help="only this training run's")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    _store_options(ls)
    dl = cmds.add_parser("download", help="download a checkpoint's archive (a tar of its files) from the server")
    dl.add_argument("path", help="the checkpoint, tinker://<run>/<weights|sampler_weights>/<name>")
    dl.add_argument("-o", "--output", type=Path, help="the file to write (default ./<run>_<kind>_<name>.tar)")
    dl.add_argument("--extract", type=Path, metavar="DIR", help="also unpack the files into DIR")
    _server_options(dl)
    _progress_option(dl)


def _limit(text: str) -> tuple[str, int | float]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return name.strip(), kind(raw)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{name}: expected a number, got {raw!r}")


def _tenants_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tenants", help="create and list tenants, set their quota overrides")
    cmds = p.add_subparsers(dest="action", required=True)
    limit_help = "a quota override, e.g. max_live_models=3 (repeatable; see server/tenancy/quotas.py for the names)"
    c = cmds.add_parser("create", help="create a tenant (then give it a key: twinkle keys create --tenant NAME)")
    c.add_argument("name")
    c.add_argument("--limit", type=_limit, action="append", default=[], metavar="NAME=VALUE", help=limit_help)
    ls = cmds.add_parser("list", help="list tenants")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    show = cmds.add_parser("show", help="one tenant, as JSON")
    show.add_argument("name")
    lim = cmds.add_parser("limits", help="print a tenant's quota overrides; with options, change them first")
    lim.add_argument("name")
    lim.add_argument("--limit", type=_limit, action="append", default=[], metavar="NAME=VALUE", help=limit_help)
    lim.add_argument("--unset", action="append", default=[], metavar="NAME", help="drop an override (repeatable)")
    lim.add_argument("--clear", action="store_true", help="drop every override first")
    for q in (c, ls, show, lim):
        _store_options(q)


def _keys_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys")
    cmds = p.add_subparsers(dest="action", required=True)
    c = cmds.add_parser("create", help="make a key for a tenant and print it (it is shown this once)")
    c.add_argument("--tenant", required=True)
    c.add_argument("--label", help="a note on what the key is for")
    ls = cmds.add_parser("list", help="list keys (never the keys themselves)")
    ls.add_argument("--tenant")
    ls.add_argument("--active", action="store_true", help="leave out revoked keys")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    r = cmds.add_parser("revoke", help="revoke a key by its id (key-…); running servers refuse it at once with "
                                       "--redis-url, within seconds without")
    r.add_argument("key_id")
    for q in (c, ls, r):
        _store_options(q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twinkle", description="Tinker-compatible LoRA training server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    mp = sub.add_parser("model-path", help="print the local folder (weights + tokenizer) of a base model")
    mp.add_argument("name")
    mp.add_argument("--data-dir", type=Path, help="data dir the model is materialised in (env TWINKLE_DATA_DIR)")
    _progress_option(mp)
    _tenants_parser(sub)
    _keys_parser(sub)
    db = sub.add_parser("db", help="the database schema: upgrade it, or show its revision")
    db.add_argument("action", choices=("upgrade", "status"))
    _store_options(db)
    _progress_option(db)
    _doctor_parser(sub)
    _status_parser(sub)
    _runs_parser(sub)
    _checkpoints_parser(sub)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "status" or (args.command == "checkpoints" and args.action == "download"):
        return _remote_command(args)
    options = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        settings = load_settings(cli=options, config_file=getattr(args, "config", None))
    except ConfigError as exc:
        print(f"twinkle: {exc}", file=sys.stderr)
        return 2
    if args.command == "model-path":
        return _model_path(args.name, settings, progress_wanted(args.progress))
    if args.command == "doctor":
        from server.commands import doctor

        return doctor.run(settings, min_free_gb=args.min_free_gb, as_json=args.json)
    if args.command == "runs":
        from server.commands.listings import runs_action

        return _store_command(settings, runs_action(args.tenant, args.json), read_only=True)
    if args.command == "checkpoints":  # list
        from server.commands.listings import checkpoints_action

        return _store_command(settings, checkpoints_action(args.tenant, args.run, args.json), read_only=True)
    if args.command == "tenants":
        return _store_command(settings, _tenants_action(args))
    if args.command == "keys":
        code = _store_command(settings, _keys_action(args))
        if code == 0 and args.action == "revoke" and settings.redis_url:
            _announce_revocation(settings, args.key_id)
        return code
    if args.command == "db":
        return _db_command(settings, args.action, progress_wanted(args.progress))
    if getattr(args, "print_serve_config", False):
        return _print_serve_config(settings)
    if problem := bind_problem(settings):
        print(f"twinkle: {problem}", file=sys.stderr)
        return 2
    if problem := _schema_problem(settings):
        print(f"twinkle: {problem}", file=sys.stderr)
        return 2
    return _serve(settings)


def _remote_command(args: argparse.Namespace) -> int:
    from server.commands import remote

    url, key = remote.server_url(args.url), remote.api_key(args.api_key)
    try:
        if args.command == "status":
            return remote.status(url, key, as_json=args.json)
        return remote.download(url, key, args.path, args.output, args.extract, progress=progress_wanted(args.progress))
    except remote.CommandFailed as exc:
        print(f"twinkle: {exc}", file=sys.stderr)
        return 1


def _print_serve_config(settings: Settings) -> int:
    import yaml

    from server.engine.ray_serve_app import serve_config

    print("# Ray Serve config of Twinkle's trainer and sampler applications (twinkle serve --print-serve-config).\n"
          "# Run it with `serve deploy` / `serve run`, or put it in a RayService's serveConfigV2; then start\n"
          "# gateways with `twinkle serve --engine ray --ray-address auto` on the same settings.")
    print(yaml.safe_dump(serve_config(settings), sort_keys=False), end="")
    return 0


def _schema_problem(settings: Settings) -> str | None:
    """Why the database cannot be served as it is (a schema this server may not upgrade), or None."""
    if settings.upgrades_schema:
        return None
    from server.store.database import Database, SchemaOutOfDate

    db = Database(settings.resolved_database_url, threads=1)
    try:
        db.ensure_schema(upgrade=False)
    except SchemaOutOfDate as exc:
        return str(exc)
    finally:
        db.close()
    return None


# ----- tenants and keys --------------------------------------------------------------------------
def _store_command(settings: Settings, action: Callable[[Any], None], *, read_only: bool = False) -> int:
    """`action` in one transaction on the server's database. A command that only reads (`read_only`)
    creates and upgrades nothing: a SQLite file that is not there is an error (a mistyped --data-dir)."""
    from server.errors import TwinkleError
    from server.store.database import Database, SchemaOutOfDate, sqlite_file

    url = settings.resolved_database_url
    if read_only and (file := sqlite_file(url)) is not None and not file.is_file():
        print(f"twinkle: no database at {file}: check --data-dir / --database-url (a server creates it at "
              "its first start)", file=sys.stderr)
        return 1
    db = Database(url, threads=1)
    try:
        db.ensure_schema(upgrade=settings.upgrades_schema and not read_only)
        db.call(action)
    except TwinkleError as exc:
        print(f"twinkle: {exc.message}", file=sys.stderr)
        return 1
    except SchemaOutOfDate as exc:
        print(f"twinkle: {exc}", file=sys.stderr)
        return 2
    finally:
        db.close()
    return 0


def _db_command(settings: Settings, action: str, progress: bool = False) -> int:
    """`twinkle db upgrade`: the schema to the newest revision; `twinkle db status`: where it is."""
    from server.store.database import Database, pending_revisions, schema_revisions

    db = Database(settings.resolved_database_url, threads=1)
    try:
        if action == "upgrade":
            pending = pending_revisions(db.engine) if progress else []
            with steps(bool(pending)) as report:  # inert when there is nothing to show
                done = itertools.count(1)
                db.migrate(lambda revision, title: report(f"schema {revision}: {title}", next(done), len(pending)))
        current, head = schema_revisions(db.engine)
    finally:
        db.close()
    state = "up to date" if current == head else f"needs `twinkle db upgrade` to {head}"
    print(f"schema revision {current or 'none (empty database)'}: {state}")
    return 0 if current == head else 1


def _tenants_action(args: argparse.Namespace) -> Callable[[Any], None]:
    from server.tenancy import tenants

    def run(s: Any) -> None:
        if args.action == "create":
            _print_json(tenants.create_tenant(s, args.name, dict(args.limit)))
        elif args.action == "list":
            rows = tenants.list_tenants(s)
            if args.json:
                _print_json(rows)
            else:
                _print_table(["NAME", "ID", "KEYS", "LIMITS", "CREATED"], [
                    [t.name, t.id, t.active_keys, json.dumps(t.limits) if t.limits else "-", _when(t.created_at)]
                    for t in rows
                ])
        elif args.action == "show":
            _print_json(tenants.get_tenant(s, args.name))
        else:  # limits
            limits = {} if args.clear else dict(tenants.get_tenant(s, args.name).limits)
            if args.clear or args.limit or args.unset:
                for name in args.unset:
                    limits.pop(name, None)
                limits = tenants.set_limits(s, args.name, {**limits, **dict(args.limit)}).limits
            _print_json(limits)

    return run


def _announce_revocation(settings: Settings, key_id: str) -> None:
    """After the revocation is committed: servers sharing Redis drop the key from their caches now."""
    from server.queue.bus import publish_revocation

    assert settings.redis_url is not None
    if not publish_revocation(settings.redis_url, settings.redis_prefix, key_id):
        print("twinkle: Redis could not be reached; running servers refuse the key within seconds", file=sys.stderr)


def _keys_action(args: argparse.Namespace) -> Callable[[Any], None]:
    from server.tenancy import tenants

    def run(s: Any) -> None:
        if args.action == "create":
            made = tenants.create_key(s, args.tenant, args.label)
            print(made.key)
            print(f"created {made.id} for tenant {made.tenant}; this is the only time the key is shown",
                  file=sys.stderr)
        elif args.action == "list":
            rows = tenants.list_keys(s, args.tenant, include_revoked=not args.active)
            if args.json:
                _print_json(rows)
            else:
                _print_table(["ID", "TENANT", "PREFIX", "LABEL", "CREATED", "LAST USED", "STATUS"], [
                    [k.id, k.tenant, k.prefix or "-", k.label or "-", _when(k.created_at), _when(k.last_used_at),
                     "revoked " + _when(k.revoked_at) if k.revoked_at else "active"]
                    for k in rows
                ])
        else:  # revoke
            _print_json(tenants.revoke_key(s, args.key_id))

    return run


def _model_path(name: str, settings: Settings, progress: bool = False) -> int:
    from workers.base_models import BaseModelUnavailable, builds_locally, resolve_base_model

    if progress and not builds_locally(name):
        # The slow part, if any, is a hub download: huggingface_hub's own bars show its bytes, and
        # ours (a step of 0/1) would only draw over them.
        progress = False
    else:
        # tqdm bars (transformers' during a conversion): ours replace them, and none in a pipe or a
        # log. Set before huggingface_hub (and with it tqdm) is first imported, which reads it then.
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        with steps(progress) as report:  # a build or a conversion shows its steps on a terminal
            path = resolve_base_model(name, settings.data_dir.resolve(), allow_download=settings.allow_download,
                                      progress=report)
        print(path)
    except (BaseModelUnavailable, ValueError) as exc:
        print(f"twinkle: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve(settings: Settings) -> int:
    import uvicorn

    from server.logs import setup_logging

    setup_logging(settings.log_level)
    sockets = None
    if settings.port == 0:
        # Bound here, so the port is known before the app starts: it is part of the URL the other
        # server processes reach this one at (Settings.instance_url).
        sock = bind_socket(settings.host, 0)
        settings = settings.model_copy(update={"port": sock.getsockname()[1]})
        sockets = [sock]
    os.environ[RESOLVED_ENV] = settings.to_env()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the log is JSON lines; no progress bars in it

    class Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1]
                _print_ready(settings, port)

    config = uvicorn.Config(
        APP_FACTORY, factory=True, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = Server(config)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after a clean shutdown
        pass
    return 0 if server.started else 1


def _print_ready(settings: Settings, port: int) -> None:
    base_url = f"http://{settings.host}:{port}{settings.root_path}"
    models = ", ".join(settings.base_models)
    print(f"Twinkle is ready at {base_url} (base model {models}, auth {settings.auth})", flush=True)
    key = "tml-local" if settings.auth == "open" else "$(twinkle keys create --tenant NAME)"
    print(
        f"  try: TINKER_BASE_URL={base_url} TINKER_API_KEY={key} python -c "
        f"\"import tinker; tc = tinker.ServiceClient().create_lora_training_client('{settings.base_models[0]}', rank=8); "
        "print(tc.get_info())\"",
        flush=True,
    )
    print(f"  dashboard: {base_url}/dashboard#key={key if settings.auth == 'open' else '<your key>'}   "
          f"tokenizers offline: HF_ENDPOINT={base_url}/hf", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
