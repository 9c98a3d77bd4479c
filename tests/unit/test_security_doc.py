"""SECURITY.md points every claim at a test: each test file and test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_security_md_names_exists() -> None:
    text = (ROOT / "SECURITY.md").read_text()
    last_file: Path | None = None
    named = 0
    for match in re.finditer(r"`(tests/[\w/]+\.py)?(?:::)?(\w+)?`|`::(\w+)`", text):
        path, name, only_name = match.groups()
        if path:
            last_file = ROOT / path
            assert last_file.is_file(), path
        name = name or only_name
        if name and name.startswith("test_"):
            assert last_file is not None and re.search(rf"^(async )?def {name}\(", last_file.read_text(), re.M), \
                f"{name} not in {last_file}"
            named += 1
    assert named >= 25
