"""Read a service's Prometheus /metrics page: for the `make up` view, benchmarks and tests."""

from __future__ import annotations

import ssl
import urllib.request
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from rlhf.auth import ClientSecurity


def scrape(
    port: int,
    host: str = "127.0.0.1",
    timeout: float = 5.0,
    security: ClientSecurity = ClientSecurity(),
) -> str:
    """The text of http(s)://host:port/metrics (https when `security` has a CA)."""
    scheme = "https" if security.ca_file else "http"
    return scrape_url(f"{scheme}://{host}:{port}/metrics", timeout, security)


def scrape_url(url: str, timeout: float = 5.0, security: ClientSecurity = ClientSecurity()) -> str:
    """The text of a /metrics page at `url`, presenting `security.key` (a reader key) and
    checking an https server against `security.ca_file`."""
    headers = {"Authorization": f"Bearer {security.key}"} if security.key else {}
    context = None
    if url.startswith("https:") and security.ca_file:
        context = ssl.create_default_context(cafile=security.ca_file)
        if security.cert_file:
            context.load_cert_chain(security.cert_file, security.key_file)
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as reply:
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
