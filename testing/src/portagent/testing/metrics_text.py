"""Prometheus text expositions read back in tests (agent and broker scrapes alike)."""

from __future__ import annotations

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (name, labels), parsed by
    prometheus_client's own parser (Debian's 0.16 and PyPI's releases alike)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)  # type: ignore[no-untyped-call, unused-ignore]
        for sample in family.samples
    }


def sample_value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels (KeyError when absent)."""
    return samples[(name, frozenset(labels.items()))]


__all__ = ["Samples", "parse_samples", "sample_value"]
