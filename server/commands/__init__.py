"""The bodies of the friendlier `twinkle` commands; `server/cli.py` keeps the parser and dispatch.

- `output`: JSON, tables, rich consoles, progress bars (stderr, a terminal only), masked URLs, errors on one line;
- `doctor`: `twinkle doctor`, the install's checks;
- `listings`: `twinkle runs` and `twinkle checkpoints list`, from the database;
- `remote`: `twinkle status` and `twinkle checkpoints download`, from a running server over HTTP.

Same layer as `server.cli` (it imports these, never the other way)."""
