"""Metrics without Ray: the observer feeds the declared series, snapshots merge per replica, the
Grafana dashboard only queries series that exist, and adapter labels stay bounded."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from serve.app.metrics import Metrics, PrometheusObserver, SnapshotStore

ROOT = Path(__file__).resolve().parents[2]


def _feed(m: Metrics, adapters: list[str]) -> None:
    o = PrometheusObserver(m)
    for a in adapters:
        o.on_request_finished(a, "lora", "eos", 4, 8, 0.2)
    o.on_first_token("x", "ia3", 0.01)
    o.on_step(4, 3, 4, 0.005)
    o.on_swap("disk_to_host", "lora", 0.003, 4096)
    o.on_cache_bytes("device", 8192, 2)
    o.on_merge("ia3", 0.001)
    o.on_device_memory("cuda:0", 1 << 20, 2 << 20)


def test_replicas_merge_into_one_exposition_with_replica_label():
    store = SnapshotStore()
    for replica, n in (("engine-a", 2), ("engine-b", 5)):
        m = Metrics()
        _feed(m, ["x"] * n)
        store.put(replica, m.snapshot())
    families = {f.name: f for f in text_string_to_metric_families(store.render().decode())}
    reqs = {s.labels["replica"]: s.value for s in families["peftserve_requests"].samples}
    assert reqs == {"engine-a": 2.0, "engine-b": 5.0}
    swaps = [s for s in families["peftserve_adapter_swap_seconds"].samples if s.name.endswith("_count")]
    assert {s.labels["tier"] for s in swaps} == {"disk_to_host"}
    assert store.replicas() == ["engine-a", "engine-b"]


def test_stale_replicas_drop_out():
    store = SnapshotStore(stale_after_s=0.0)
    store.put("gone", Metrics().snapshot())
    assert store.replicas() == [] and b"replica=" not in store.render()


def test_adapter_labels_are_bounded_by_the_allow_list():
    m = Metrics(adapter_labels=["hot"])
    _feed(m, ["hot"] + [f"a{i}" for i in range(500)] + [None])
    labels = {s.labels["adapter"] for f in m.registry.collect() if f.name == "peftserve_adapter_requests"
              for s in f.samples}
    assert labels == {"hot", "_other", "_base"}


def test_metric_names_carry_units():
    for f in Metrics().registry.collect():
        if f.name.startswith("peftserve_") and f.type in ("histogram", "gauge"):
            assert re.search(r"_(seconds|bytes|requests|adapters|rows|second)$", f.name), f.name


def test_dashboard_queries_only_declared_series():
    m = Metrics()
    _feed(m, ["x"])
    families = list(m.registry.collect())
    declared = {s.name for f in families for s in f.samples} | {f.name for f in families} | {
        f.name + "_total" for f in families if f.type == "counter"}
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    names = set()
    for panel in dash["panels"]:
        for t in panel["targets"]:
            names |= set(re.findall(r"\b((?:peftserve|process)_[a-z0-9_]+)", t["expr"]))
    missing = {n for n in names if n not in declared and n.removesuffix("_bucket") not in declared}
    assert not missing and len(dash["panels"]) >= 12
