"""`twinkle` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from server.config import RESOLVED_ENV, ConfigError, Settings, load_settings

APP_FACTORY = "gateway.app:create_app_from_env"


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the server (embedded: SQLite + in-process engine)")
    p.add_argument("--config", type=Path, help="YAML file with any of the options below")
    p.add_argument("--host", help="bind address (default 127.0.0.1; env TWINKLE_HOST)")
    p.add_argument("--port", type=int, help="port, 0 picks a free one (default 8000; env TWINKLE_PORT)")
    p.add_argument("--base-model", help="served base model: a name or a local folder (env TWINKLE_BASE_MODEL)")
    p.add_argument("--data-dir", type=Path, help="where the database, models and checkpoints live (env TWINKLE_DATA_DIR)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the data dir; env TWINKLE_DATABASE_URL)")
    p.add_argument("--torch-threads", type=int, help="torch threads of the compute thread (env TWINKLE_TORCH_THREADS)")
    p.add_argument("--log-level", help="debug, info, warning (env TWINKLE_LOG_LEVEL)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twinkle", description="Tinker-compatible LoRA training server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    mp = sub.add_parser("model-path", help="print the local folder (weights + tokenizer) of a base model")
    mp.add_argument("name")
    mp.add_argument("--data-dir", type=Path, help="data dir the model is materialised in (env TWINKLE_DATA_DIR)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    options = {k: v for k, v in vars(args).items() if k not in ("command", "config", "name")}
    try:
        settings = load_settings(cli=options, config_file=getattr(args, "config", None))
    except ConfigError as exc:
        print(f"twinkle: {exc}", file=sys.stderr)
        return 2
    if args.command == "model-path":
        return _model_path(args.name, settings)
    return _serve(settings)


def _model_path(name: str, settings: Settings) -> int:
    from workers.base_models import BaseModelUnavailable, resolve_base_model

    try:
        print(resolve_base_model(name, settings.data_dir.resolve(), allow_download=settings.allow_download))
    except (BaseModelUnavailable, ValueError) as exc:
        print(f"twinkle: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve(settings: Settings) -> int:
    import uvicorn

    from server.logs import setup_logging

    setup_logging(settings.log_level)
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
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after a clean shutdown
        pass
    return 0 if server.started else 1


def _print_ready(settings: Settings, port: int) -> None:
    base_url = f"http://{settings.host}:{port}"
    print(f"Twinkle is ready at {base_url} (base model {settings.base_model})", flush=True)
    print(
        f"  try: TINKER_BASE_URL={base_url} TINKER_API_KEY=tml-local python -c "
        f"\"import tinker; tc = tinker.ServiceClient().create_lora_training_client('{settings.base_model}', rank=8); "
        "print(tc.get_info())\"",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
