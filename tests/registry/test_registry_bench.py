"""`peftserve bench --registry` end to end at a small size (starts its own PostgreSQL, moto and two nodes)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.soak
def test_registry_bench_writes_numbers_and_a_plot(tmp_path):
    from loadtests.registry_bench import RegistryBenchConfig, run_registry_bench

    cfg = RegistryBenchConfig(catalog_adapters=500, catalog_reads=50, cold_loads=2, object_bytes=1 << 20,
                              registrations=3)
    results = run_registry_bench(tmp_path, cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["catalog"]["postgres"]["get_s"]["n"] == 50 and saved["cold_load"]["cold_vs_local_ratio"] > 0
    assert results["registration"]["seconds"]["n"] == 3 and results["registration"]["seconds"]["p99"] < 30
    assert (tmp_path / "registry.png").stat().st_size > 10_000
