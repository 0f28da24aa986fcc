"""The Ray Serve application: Ingress (HTTP) -> EngineReplica (one Engine per replica) + MetricsHub.

    serve run deploy/local.yaml                 # or: peftserve serve [--config FILE]

`app_builder(args)` is the import path the Serve config names (`serve.app.builder:app_builder`); `args` is the
config's `args:` mapping, validated as AppConfig.
"""

from __future__ import annotations

import time

from ray import serve as ray_serve

from serve.app.config import AppConfig
from serve.app.metrics import SnapshotStore


@ray_serve.deployment(name="MetricsHub", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      logging_config={"enable_access_log": False})
class MetricsHub:
    """Latest metric snapshot of every replica; renders them as one exposition (label `replica`). Engine
    replicas also push a report (node, sync state, cache) that /info lists while it is fresh.

    A Ray actor is reachable from every node, so one scrape of any ingress shows the whole cluster.
    """

    def __init__(self, stale_after_s: float = 60.0, report_fresh_s: float = 5.0):
        self.store = SnapshotStore(stale_after_s)
        self.report_fresh_s = report_fresh_s  # a replica silent this long is gone from /info (dead, scaled down)
        self._reports: dict[str, tuple[float, dict]] = {}

    def push(self, replica: str, snapshot: list[tuple], report: dict | None = None) -> None:
        self.store.put(replica, snapshot)
        if report is not None:
            self._reports[replica] = (time.monotonic(), report)

    def reports(self) -> list[dict]:
        now = time.monotonic()
        for name in [n for n, (t, _) in self._reports.items() if now - t > self.report_fresh_s]:
            del self._reports[name]
        return sorted((r for _, r in self._reports.values()), key=lambda r: (r.get("node_id", ""), r["replica"]))

    def render(self) -> bytes:
        return self.store.render()

    def replicas(self) -> list[str]:
        return self.store.replicas()


def build_app(config: AppConfig):
    from serve.app.ingress import Ingress
    from serve.app.replica import EngineReplica

    args = config.model_dump(mode="json")
    hub = MetricsHub.bind(*hub_args(config))
    return Ingress.bind(args, EngineReplica.bind(args, hub), hub)


def hub_args(config: AppConfig) -> tuple[float, float]:
    """(metrics stale after, reports fresh for): both scale with the push interval."""
    return max(60.0, 10 * config.metrics_push_interval_s), max(5.0, 4 * config.metrics_push_interval_s)


def app_builder(args: dict | None = None):
    """Entry point for `serve run`/`serve deploy` (import_path: serve.app.builder:app_builder)."""
    return build_app(AppConfig.model_validate(args or {}))
