"""Reading a Prometheus exposition (GET /metrics) in the tests: every sample by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    """A sample's value, 0 when absent (a counter not yet touched)."""
    return found.get((name, frozenset(labels.items())), 0.0)
