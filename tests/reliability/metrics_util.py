"""Reading the server's Prometheus exposition (one scrape shows every replica)."""

from __future__ import annotations

import re
import time

import httpx

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or m.group(1) != name:
            continue
        if all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            total += float(m.group(3))
    return total


def scrape(http: httpx.Client) -> str:
    return http.get("/metrics").text


def wait_metric(http: httpx.Client, name: str, at_least: float, timeout_s: float = 15.0, **labels) -> float:
    """Engines push every 0.5 s: poll until the summed series reaches `at_least`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = metric_sum(scrape(http), name, **labels)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.3)
