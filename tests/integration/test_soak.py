"""The soak benchmark's bounded form (bench/soak.py --minutes 2): a steady RL-style workload through
the SDK, with database size, data-dir size, open files and RSS flat after the warm-up. Its table
is printed and its JSON and PNG kept in the test's temp dir."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def load_soak():  # noqa: ANN201 - the bench script as a module (bench/ is not a package)
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # its dataclasses look their module up
    sys.path.insert(0, str(SOAK.parent))  # its sibling bench/outputs.py, as when it runs as a script
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(600)
def test_two_minute_soak_stays_flat(tmp_path: Path) -> None:
    soak = load_soak()
    report = soak.run(2.0, tmp_path / "data", every=3.0)
    soak.show(report)
    soak.save(report, "soak", tmp_path / "results")
    assert not report.errors, report.errors
    assert report.clients >= 2 and report.steps >= 10  # sessions ended and their state turned over
    assert report.flat, report.verdicts()
