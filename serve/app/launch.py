"""`peftserve serve`: start local Ray and run the Serve app on HOST:PORT until Ctrl-C.

Precedence: command-line flags > the config file's `args:` > defaults. `--config` takes a Serve config
YAML (deploy/*.yaml: the first application's `args` and per-deployment settings are used) or a bare
AppConfig mapping.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None, help="hub id or local T5 directory (default: the embedded base)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--config", type=Path, default=None, help="Serve config YAML (deploy/*.yaml)")
    parser.add_argument("--replicas", type=int, default=None, help="engine replicas (overrides the config)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--no-demo-adapters", action="store_true",
                        help="do not register the demo adapters (embedded base only)")


def read_config(path: Path | None) -> tuple[dict, dict[str, dict]]:
    """(app args, {deployment name: options}) from a Serve config YAML or a bare args mapping."""
    import yaml

    from serve.engine import ConfigError

    if path is None:
        return {}, {}
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if "applications" not in doc:
        return doc, {}
    app = doc["applications"][0]
    deployments = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    return app.get("args") or {}, deployments


def build_from_args(args) -> tuple[object, dict]:
    from serve.app.config import AppConfig
    from serve.engine import ConfigError

    app_args, deployments = read_config(args.config)
    if args.base is not None:
        app_args.setdefault("engine", {})["base"] = args.base
    if args.no_demo_adapters:
        app_args["demo_adapters"] = False
    try:
        config = AppConfig.model_validate(app_args)
    except ValueError as e:
        raise ConfigError(f"invalid configuration: {e}") from None
    if args.replicas is not None:
        deployments.setdefault("EngineReplica", {})["num_replicas"] = args.replicas
    return config, deployments


def build_application(config, deployments: dict[str, dict]):
    from serve.app.builder import MetricsHub, build_app
    from serve.app.ingress import Ingress
    from serve.app.replica import EngineReplica

    if not deployments:
        return build_app(config)
    # Per-deployment options from the YAML, as `serve run` would apply them.
    args = config.model_dump(mode="json")
    opts = {name: {k: v for k, v in o.items()} for name, o in deployments.items()}
    hub = MetricsHub.options(**opts.get("MetricsHub", {})).bind(max(60.0, 10 * config.metrics_push_interval_s))
    engine = EngineReplica.options(**opts.get("EngineReplica", {})).bind(args, hub)
    return Ingress.options(**opts.get("Ingress", {})).bind(args, engine, hub)


def run(args) -> int:
    import signal
    import time

    from serve.app import local

    config, deployments = build_from_args(args)
    print(f"peftserve: starting Ray and the app on http://{args.host}:{args.port} "
          f"(base: {config.engine.base or 'embedded'}; registry: {config.registry_path()})", flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        url = local.start(build_application(config, deployments), args.host, args.port, args.num_cpus,
                          ready_timeout_s=600)
        print(f"peftserve: ready on {url} (API docs: {url}/docs); Ctrl-C stops", flush=True)
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("peftserve: shutting down", flush=True)
        local.stop()
    return 0
