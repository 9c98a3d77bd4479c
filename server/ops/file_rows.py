"""Rows of a dataset file a tenant uploaded (`POST /v1/files`), by its name's suffix: JSON Lines
(one object per line), JSON (a list of objects, or an object of equal-length columns) or CSV (a
header row; every cell is a string). What Hugging Face's json and csv loaders read, less their
type guessing: a number in a CSV stays the string it was.

Parsing is strict in the ways that matter to training: no NaN or Infinity, every row an object,
and at most `max_rows` rows (the parser stops at the first row over it, so a huge file costs no
more memory than the limit). Each problem names the line (or row) it is on.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from server.errors import InvalidRequest

Row = dict[str, Any]
FORMATS = (".jsonl", ".json", ".csv")
MAX_ROWS = 100_000  # the most rows a dataset may hold (a file's, and a tenant's datasets together)
# CSV cells may be long (a whole conversation); the csv module's default cap is 128 KiB.
CSV_FIELD_LIMIT = 16 * 2**20


def format_of(filename: str, field: str = "file") -> str:
    """The format a file name says (its suffix, lower-cased), or a 400 naming the allowed ones."""
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in FORMATS:
        raise InvalidRequest(f"a dataset file must be named *.jsonl, *.json or *.csv (got {filename!r})", field=field)
    return suffix


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constant)


def parse_rows(data: bytes, suffix: str, *, max_rows: int, field: str = "file") -> list[Row]:
    """The rows of a file's bytes, or a 400 naming the field and where in the file the problem is."""
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"not UTF-8 text (byte {exc.start})", field=field) from None
    reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv}[suffix]
    rows: list[Row] = []
    for row in reader(content, field):
        if len(rows) == max_rows:
            raise InvalidRequest(f"more than {max_rows} rows, the most a dataset may hold", field=field)
        rows.append(row)
    return rows


def _jsonl(content: str, field: str) -> Iterator[Row]:
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = _loads(line)
        except ValueError as exc:
            raise InvalidRequest(f"line {number}: not JSON ({exc})", field=field) from None
        if not isinstance(row, dict):
            raise InvalidRequest(f"line {number}: a row must be a JSON object", field=field)
        yield row


def _json(content: str, field: str) -> Iterator[Row]:
    try:
        data = _loads(content)
    except ValueError as exc:
        raise InvalidRequest(f"not JSON ({exc})", field=field) from None
    if isinstance(data, dict):
        columns = list(data.values())
        if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) > 1:
            raise InvalidRequest("an object of columns must hold lists of one length", field=field)
        for i in range(len(columns[0]) if columns else 0):
            yield {name: values[i] for name, values in data.items()}
        return
    if not isinstance(data, list):
        raise InvalidRequest("a list of rows (objects) or an object of columns", field=field)
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise InvalidRequest(f"row {i}: a row must be a JSON object", field=field)
        yield row


def _csv(content: str, field: str) -> Iterator[Row]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(content, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header) or not all(header):
            raise InvalidRequest("line 1: the header must name every column once", field=field)
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise InvalidRequest(f"line {reader.line_num}: {len(row)} cells, the header has {len(header)}",
                                     field=field)
            yield dict(zip(header, row, strict=True))
    except csv.Error as exc:
        raise InvalidRequest(f"line {reader.line_num}: not CSV ({exc})", field=field) from None
