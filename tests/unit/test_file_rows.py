"""Rows of an uploaded dataset file: JSON Lines, JSON and CSV, and what is refused (with where)."""

from __future__ import annotations

import pytest

from server.errors import InvalidRequest
from server.ops.file_rows import format_of, parse_rows


def rows(text: str, suffix: str, max_rows: int = 100) -> list[dict]:
    return parse_rows(text.encode(), suffix, max_rows=max_rows)


def refused(text: str | bytes, suffix: str, max_rows: int = 100) -> str:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(InvalidRequest) as info:
        parse_rows(data, suffix, max_rows=max_rows)
    assert info.value.field == "file"
    return info.value.message


def test_json_lines_one_object_per_line_blank_lines_skipped() -> None:
    text = '{"a": 1, "b": [1, 2]}\n\n{"a": 2, "b": null}\r\n'
    assert rows(text, ".jsonl") == [{"a": 1, "b": [1, 2]}, {"a": 2, "b": None}]


def test_json_a_list_of_rows_or_an_object_of_columns() -> None:
    assert rows('[{"q": "x"}, {"q": "y"}]', ".json") == [{"q": "x"}, {"q": "y"}]
    assert rows('{"q": ["x", "y"], "n": [1, 2]}', ".json") == [{"q": "x", "n": 1}, {"q": "y", "n": 2}]
    assert rows("{}", ".json") == []


def test_csv_a_header_then_rows_of_strings_quoted_newlines_kept() -> None:
    text = 'question,answer\n"two\nlines",42\nplain,"a, b"\n'
    assert rows(text, ".csv") == [{"question": "two\nlines", "answer": "42"}, {"question": "plain", "answer": "a, b"}]
    assert rows("", ".csv") == []


def test_a_byte_order_mark_is_not_part_of_the_first_column() -> None:
    assert parse_rows("\ufeffq\nx\n".encode(), ".csv", max_rows=10) == [{"q": "x"}]


@pytest.mark.parametrize(("text", "suffix", "where"), [
    ('{"a": 1}\n{"a": 2\n', ".jsonl", "line 2: not JSON"),
    ('{"a": 1}\n[1, 2]\n', ".jsonl", "line 2: a row must be a JSON object"),
    ('{"a": NaN}\n', ".jsonl", "line 1: not JSON (NaN is not allowed"),
    ('[{"a": Infinity}]', ".json", "not JSON (Infinity is not allowed"),
    ('[{"a": 1}, 3]', ".json", "row 1: a row must be a JSON object"),
    ('{"a": [1], "b": [1, 2]}', ".json", "lists of one length"),
    ('"text"', ".json", "a list of rows"),
    ("a,b\n1,2\n3\n", ".csv", "line 3: 1 cells, the header has 2"),
    ("a,a\n1,2\n", ".csv", "line 1: the header must name every column once"),
])
def test_each_problem_names_where_it_is(text: str, suffix: str, where: str) -> None:
    assert where in refused(text, suffix)


def test_text_that_is_not_utf8_is_refused() -> None:
    assert "not UTF-8" in refused(b'{"a": "\xff"}\n', ".jsonl")


def test_parsing_stops_at_the_first_row_over_the_limit() -> None:
    assert len(rows('{"a": 1}\n' * 3, ".jsonl", max_rows=3)) == 3
    assert "more than 3 rows" in refused('{"a": 1}\n' * 4, ".jsonl", max_rows=3)
    assert "more than 2 rows" in refused("a\n1\n2\n3\n", ".csv", max_rows=2)


@pytest.mark.parametrize("name", ["data.parquet", "data", "data.txt", "jsonl"])
def test_a_name_without_a_known_suffix_is_refused(name: str) -> None:
    with pytest.raises(InvalidRequest, match=r"\*\.jsonl, \*\.json or \*\.csv"):
        format_of(name)


def test_the_suffix_is_read_case_blind() -> None:
    assert format_of("Train.JSONL") == ".jsonl"
