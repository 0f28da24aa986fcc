"""`peftserve serve`: start local Ray and run the Serve app on HOST:PORT until Ctrl-C.

Precedence: command-line flags > the config file's `args:` > defaults. `--config` takes a Serve config
YAML (deploy/*.yaml: the first application's `args` and per-deployment settings are used) or a bare
AppConfig mapping.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from serve.app.auth import OPEN_ADMIN_FLAG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None, help="hub id or local T5 directory (default: the embedded base)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--config", type=Path, default=None, help="Serve config YAML (deploy/*.yaml)")
    parser.add_argument("--replicas", type=int, default=None, help="engine replicas (overrides the config)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--no-demo-adapters", action="store_true",
                        help="do not register the demo adapters `peftserve train demo` trained (embedded base "
                             "only)")
    parser.add_argument("--allow-source-dir", action="append", type=Path, default=None, metavar="DIR",
                        help="a directory POST /adapters may read server-path sources from (repeatable); "
                             "default: any, from loopback clients only; none when bound beyond loopback")
    parser.add_argument(OPEN_ADMIN_FLAG, dest="insecure_allow_open_admin", action="store_true",
                        help="allow registry writes from the network without an admin token (unsafe)")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="on Ctrl-C/SIGTERM, seconds in-flight requests get to finish (default 30)")


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
    if args.allow_source_dir:
        app_args["allowed_source_dirs"] = [str(d) for d in args.allow_source_dir]
    if args.insecure_allow_open_admin:
        app_args["insecure_allow_open_admin"] = True
    try:
        config = AppConfig.model_validate(app_args)
    except ValueError as e:
        raise ConfigError(f"invalid configuration: {e}") from None
    if args.replicas is not None:
        deployments.setdefault("EngineReplica", {})["num_replicas"] = args.replicas
    return config, deployments


def build_application(config, deployments: dict[str, dict]):
    from serve.app.builder import MetricsHub, build_app, hub_args
    from serve.app.ingress import Ingress
    from serve.app.replica import EngineReplica

    if not deployments:
        return build_app(config)
    # Per-deployment options from the YAML, as `serve run` would apply them.
    args = config.model_dump(mode="json")
    opts = {name: {k: v for k, v in o.items()} for name, o in deployments.items()}
    hub = MetricsHub.options(**opts.get("MetricsHub", {})).bind(*hub_args(config))
    engine = EngineReplica.options(**opts.get("EngineReplica", {})).bind(args, hub)
    return Ingress.options(**opts.get("Ingress", {})).bind(args, engine, hub)


def _registry_label(config) -> str:
    """Where the registry lives, credentials redacted (this line ends up in logs)."""
    from serve.registry import redact_url, resolve_urls

    catalog, store = resolve_urls(config.registry_url, config.store_url)
    if catalog is None and store is None:
        return str(config.registry_path())
    return (f"catalog {redact_url(catalog) if catalog else 'SQLite'}, store {redact_url(store) if store else 'local'}, "
            f"node cache {config.registry_path()}")


def run(args) -> int:
    import time

    from serve.app import local
    from serve.app.preflight import preflight

    config, deployments = build_from_args(args)
    config = preflight(config, args.host, args.port)  # every error knowable before Ray starts, in seconds
    print(f"peftserve: starting Ray and the app on http://{args.host}:{args.port} "
          f"(base: {config.engine.base or 'embedded'}; registry: {_registry_label(config)})", flush=True)
    # Installed explicitly: a command started as a background job inherits SIGINT ignored.
    stop = threading.Event()

    def on_signal() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    on_signal()
    started = False
    try:
        url = local.start(build_application(config, deployments), args.host, args.port, args.num_cpus,
                          ready_timeout_s=600, stop=stop)
        on_signal()  # ray.init installs its own SIGTERM handler (it aborts the driver): take it back
        started = True
        print(f"peftserve: ready on {url} (API docs: {url}/docs); Ctrl-C stops", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        print(f"peftserve: shutting down (in-flight requests get up to {args.grace_s:g} s)", flush=True)
        t0 = time.monotonic()
        local.stop(grace_s=args.grace_s if started else 0.0)
        print(f"peftserve: stopped in {time.monotonic() - t0:.1f} s", flush=True)
    return 0
