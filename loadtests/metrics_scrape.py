"""Read the server's Prometheus /metrics and summarize what changed between two scrapes.

Only the adapter-swap and request metrics matter here (names from serve/app/metrics.py); label sets are
summed over replicas and kinds, keeping the swap `tier`.
"""

from __future__ import annotations

from collections import defaultdict

SWAP = "peftserve_adapter_swap_seconds"
COUNTERS = {"hits": "peftserve_adapter_cache_hits_total", "misses": "peftserve_adapter_cache_misses_total",
            "evictions": "peftserve_adapter_cache_evictions_total",
            "generated_tokens": "peftserve_generated_tokens_total", "requests": "peftserve_requests_total"}
TTFT = "peftserve_time_to_first_token_seconds"


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Exposition text -> {(sample name, sorted labels without replica): value summed over replicas}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "replica"))
            out[(s.name, labels)] += s.value
    return dict(out)


def scrape(url: str, token: str | None = None) -> dict[tuple[str, tuple], float]:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    r.raise_for_status()
    return parse(r.text)


def _sum(samples: dict, name: str, **match) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and all(dict(labels).get(k) == want for k, want in match.items()))


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style quantile from cumulative (upper bound, count) buckets, linear within a bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            width = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / width if width else 0.0)
        prev_le, prev_count = le, count
    return prev_le


def _buckets(samples: dict, name: str, **match) -> dict[float, float]:
    out: dict[float, float] = defaultdict(float)
    for (n, labels), v in samples.items():
        d = dict(labels)
        if n == f"{name}_bucket" and all(d.get(k) == want for k, want in match.items()):
            out[float(d["le"])] += v
    return out


def delta_summary(before: dict, after: dict) -> dict:
    """What happened on the server between two scrapes: swaps per tier (count, mean, p50, p99),
    cache hits/misses/evictions, requests, generated tokens, mean server TTFT."""
    def d(name, **m):
        return _sum(after, name, **m) - _sum(before, name, **m)

    swaps = {}
    for tier in ("disk_to_host", "host_to_device"):
        count = d(f"{SWAP}_count", tier=tier)
        b0, b1 = _buckets(before, SWAP, tier=tier), _buckets(after, SWAP, tier=tier)
        buckets = [(le, b1[le] - b0.get(le, 0.0)) for le in b1]
        swaps[tier] = {"count": int(count), "mean_s": d(f"{SWAP}_sum", tier=tier) / count if count else None,
                       "p50_s": histogram_quantile(buckets, 0.5), "p99_s": histogram_quantile(buckets, 0.99)}
    ttft_n = d(f"{TTFT}_count")
    return {"swaps": swaps, **{k: d(v) for k, v in COUNTERS.items()},
            "ttft_mean_s": d(f"{TTFT}_sum") / ttft_n if ttft_n else None}
