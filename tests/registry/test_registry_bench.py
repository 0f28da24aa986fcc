"""`peftserve bench --registry` end to end at a small size (starts its own PostgreSQL, moto and two nodes)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.soak
def test_registry_bench_writes_numbers_and_a_plot(tmp_path):
    from loadtests.registry_bench import RegistryBenchConfig, run_registry_bench

    cfg = RegistryBenchConfig(catalog_adapters=500, catalog_reads=50, cold_loads=2, object_bytes=1 << 20,
                              registrations=3, sync_catalog_sizes=(100, 2000), sync_registrations=3)
    results = run_registry_bench(tmp_path, cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["catalog"]["postgres"]["get_s"]["n"] == 50 and saved["cold_load"]["cold_vs_local_ratio"] > 0
    assert results["registration"]["seconds"]["n"] == 3 and results["registration"]["seconds"]["p99"] < 30
    sync = results["sync"]["sizes"]
    assert set(sync) == {"100", "2000"} and sync["2000"]["registration_to_every_replica_s"]["n"] == 3
    assert sync["2000"]["apply_one_change_s"]["n"] == 3 * 2  # one per replica
    assert (tmp_path / "registry.png").stat().st_size > 10_000


@pytest.mark.soak
def test_routing_bench_writes_both_modes(tmp_path):
    from loadtests.routing import RoutingBenchConfig, run_routing_bench

    cfg = RoutingBenchConfig(adapters=40, resident=4, device_slots=2, concurrency=4, warmup_requests=40,
                             requests=80, rounds=1)
    results = run_routing_bench(tmp_path / "out", tmp_path / "work", cfg)
    modes = [c["mode"] for c in results["rounds"]]
    assert modes == ["random", "adapter-aware"]
    for c in results["rounds"]:
        assert c["statuses"] == {"200": 80} and 0 <= c["resident_hit_rate"] <= 1
    assert results["summary"]["throughput_ratio"] > 0 and (tmp_path / "out/routing.png").exists()
