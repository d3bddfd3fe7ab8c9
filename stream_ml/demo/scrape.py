"""Read a process's Prometheus /metrics, as the demo's status line and summary need them."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


@dataclass(slots=True)
class Samples:
    """Samples by name, each a list of (labels, value); empty when the process did not answer."""

    by_name: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def total(self, name: str, **match: str) -> float:
        """The sum of ``name`` over the samples whose labels include ``match``."""
        return sum(v for labels, v in self.by_name.get(name, []) if _matches(labels, match))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        return {labels[label]: v for labels, v in self.by_name.get(name, []) if label in labels}


def _matches(labels: dict[str, str], match: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match.items())


def parse(text: str) -> Samples:
    samples = Samples()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.by_name.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return samples


async def scrape(session: aiohttp.ClientSession, url: str, timeout_s: float = 1.0) -> Samples:
    """``url``'s samples; an empty set if it does not answer in ``timeout_s`` (the status line
    must not stall on a busy process)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                return Samples()
            return parse(await response.text())
    except (TimeoutError, aiohttp.ClientError):
        return Samples()
