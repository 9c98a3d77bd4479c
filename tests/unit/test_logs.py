"""Structured logging: one JSON object per line, and no event field that collides with a LogRecord
attribute (logging raises KeyError for those — at the moment the event happens)."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

from server.logs import JsonFormatter

ROOT = Path(__file__).resolve().parents[2]
RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def extra_keys() -> list[tuple[str, int, str]]:
    found = []
    for package in ("gateway", "server", "workers", "schemas"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.keyword) and node.arg == "extra" and isinstance(node.value, ast.Dict):
                    found += [(str(path.relative_to(ROOT)), node.lineno, k.value)
                              for k in node.value.keys if isinstance(k, ast.Constant)]
    return found


def test_no_log_call_uses_a_reserved_field_name() -> None:
    keys = extra_keys()
    assert len(keys) > 20  # the scan does find the log calls
    clashes = [k for k in keys if k[2] in RESERVED]
    assert not clashes, f"these extra= keys collide with LogRecord attributes: {clashes}"


def test_formatter_writes_one_json_object_per_event() -> None:
    record = logging.LogRecord("server.x", logging.INFO, __file__, 1, "op_done", None, None)
    record.request_id, record.ms = "req-1", 12.5
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["event"] == "op_done" and entry["request_id"] == "req-1" and entry["ms"] == 12.5
    assert entry["level"] == "info" and entry["logger"] == "server.x"
