"""/metrics parsing and before/after deltas of the server's swap metrics (real prometheus-client output)."""

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from loadtests.metrics_scrape import delta_summary, histogram_quantile, parse


def exposition(swaps: dict[str, list[float]], hits: int, tokens: int) -> str:
    r = CollectorRegistry()
    h = Histogram("peftserve_adapter_swap_seconds", "swap", ["tier", "kind", "replica"],
                  buckets=(0.001, 0.005, 0.01, 0.05, 0.1), registry=r)
    c = Counter("peftserve_adapter_cache_hits_total", "hits", ["tier", "kind", "replica"], registry=r)
    g = Counter("peftserve_generated_tokens_total", "tokens", ["replica"], registry=r)
    for tier, values in swaps.items():
        for i, v in enumerate(values):
            h.labels(tier, "lora", f"r{i % 2}").observe(v)  # two replicas: summed
    c.labels("device", "lora", "r0").inc(hits)
    g.labels("r0").inc(tokens)
    return generate_latest(r).decode()


def test_delta_counts_only_what_happened_between_scrapes():
    before = parse(exposition({"disk_to_host": [0.02] * 4, "host_to_device": [0.002] * 4}, hits=10, tokens=100))
    after = parse(exposition({"disk_to_host": [0.02] * 4 + [0.03] * 6, "host_to_device": [0.002] * 20},
                             hits=25, tokens=400))
    d = delta_summary(before, after)
    assert d["swaps"]["disk_to_host"]["count"] == 6
    assert d["swaps"]["disk_to_host"]["mean_s"] == pytest.approx(0.03)
    assert 0.01 < d["swaps"]["disk_to_host"]["p99_s"] <= 0.05  # inside the bucket that holds 0.03
    assert d["swaps"]["host_to_device"]["count"] == 16
    assert d["hits"] == 15 and d["generated_tokens"] == 300
    assert d["ttft_mean_s"] is None  # not exported by this fake server: reported as unknown, not 0


def test_histogram_quantile_interpolates_within_buckets():
    buckets = [(0.01, 0.0), (0.02, 50.0), (0.04, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.02)
    assert histogram_quantile(buckets, 0.75) == pytest.approx(0.03)
    assert histogram_quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None
