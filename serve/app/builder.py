"""The Ray Serve application: Ingress (HTTP) -> EngineReplica (one Engine per replica) + MetricsHub, or with
`topology: combined` EngineReplicas that answer HTTP themselves (serve/app/combined.py) + MetricsHub.

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


def build_app(config: AppConfig, deployments: dict[str, dict] | None = None):
    """The application for `config`; `deployments`: per-deployment Ray options ({name: options}, from the YAML's
    `deployments:`, as `serve run` would apply them)."""
    opts = deployments or {}
    check_deployments(config, opts)
    args = config.model_dump(mode="json")
    hub = MetricsHub.options(**opts.get("MetricsHub", {})).bind(*hub_args(config))
    if config.topology == "combined":
        from serve.app.combined import CombinedReplica

        return CombinedReplica.options(**opts.get("EngineReplica", {})).bind(args, hub)
    from serve.app.ingress import Ingress
    from serve.app.replica import EngineReplica

    engine = EngineReplica.options(**opts.get("EngineReplica", {})).bind(args, hub)
    return Ingress.options(**opts.get("Ingress", {})).bind(args, engine, hub)


def check_deployments(config: AppConfig, deployments: dict[str, dict]) -> None:
    """Options for a deployment this topology does not have are a config error, not silently ignored."""
    unknown = sorted(set(deployments) - set(deployment_names(config)))
    if unknown:
        from serve.engine import ConfigError

        raise ConfigError(f"deployments: {', '.join(unknown)} is not part of the app with topology: "
                          f"{config.topology} (its deployments: {', '.join(deployment_names(config))})")


def deployment_names(config: AppConfig) -> list[str]:
    """The app's deployments; the first answers HTTP (the shutdown drain asks it what is in flight)."""
    if config.topology == "combined":
        return ["EngineReplica", "MetricsHub"]
    return ["Ingress", "EngineReplica", "MetricsHub"]


def hub_args(config: AppConfig) -> tuple[float, float]:
    """(metrics stale after, reports fresh for): both scale with the push interval."""
    return max(60.0, 10 * config.metrics_push_interval_s), max(5.0, 4 * config.metrics_push_interval_s)


def app_builder(args: dict | None = None):
    """Entry point for `serve run`/`serve deploy` (import_path: serve.app.builder:app_builder)."""
    return build_app(AppConfig.model_validate(args or {}))
