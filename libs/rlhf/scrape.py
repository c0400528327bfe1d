"""Read a service's Prometheus /metrics page: for the `make up` view, benchmarks and tests."""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> str:
    """The text of http://host:port/metrics."""
    return scrape_url(f"http://{host}:{port}/metrics", timeout)


def scrape_url(url: str, timeout: float = 5.0) -> str:
    """The text of a /metrics page at `url`."""
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


def samples(text: str) -> list[Sample]:
    """Every sample of a /metrics page."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def sum_by(found: Iterable[Sample], name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """Samples named `name` summed per combination of `labels` (other labels summed over)."""
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for sample in found:
        if sample.name == name:
            sums[tuple(sample.labels.get(label, "") for label in labels)] += sample.value
    return dict(sums)
