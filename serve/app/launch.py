"""`peftserve serve`: start local Ray (or join a running cluster) and run the Serve app on HOST:PORT until
Ctrl-C.

    peftserve serve                                         # a local Ray on this machine
    peftserve serve --ray-address HEAD:6379 --replicas 4    # onto a cluster started with `ray start`

Precedence: command-line flags > the config file's `args:` > defaults. `--config` takes a Serve config
YAML (deploy/*.yaml: the first application's `args`, its per-deployment settings and `proxy_location` are
used) or a bare AppConfig mapping. On a cluster, Ctrl-C removes this app and leaves the cluster running.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from serve.app.auth import OPEN_ADMIN_FLAG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None, help="hub id or local T5 directory (default: the embedded base)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default=None,
                        help="base weights: float32 (CPU default), bfloat16 (GPU default), or int8 (CPU: the base's "
                             "linears in int8, adapters float32 per row); overrides the config's engine.dtype")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--config", type=Path, default=None, help="Serve config YAML (deploy/*.yaml)")
    parser.add_argument("--replicas", type=int, default=None, help="engine replicas (overrides the config)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="deploy onto a running Ray cluster (its GCS address, or 'auto'; default: "
                             "$RAY_ADDRESS, else a local Ray). Every node needs this Python environment and "
                             "the registry settings (docs/SERVING.md)")
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


def read_config(path: Path | None) -> tuple[dict, dict[str, dict], str | None]:
    """(app args, {deployment name: options}, proxy location) from a Serve config YAML or a bare args mapping."""
    import yaml

    from serve.engine import ConfigError

    if path is None:
        return {}, {}, None
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if "applications" not in doc:
        return doc, {}, None
    app = doc["applications"][0]
    deployments = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    return app.get("args") or {}, deployments, doc.get("proxy_location")


def _one_line(error: ValueError) -> str:
    """pydantic's multi-line report as `field.path: problem; ...` (a CLI error is one line)."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return " ".join(str(error).split())
    parts = []
    for err in error.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "config"
        parts.append(f"{where}: {str(err.get('msg', 'invalid value')).removeprefix('Value error, ')}")
    return "; ".join(parts)


def build_from_args(args) -> tuple[object, dict]:
    from serve.app.config import AppConfig
    from serve.engine import ConfigError

    app_args, deployments, _ = read_config(args.config)
    if args.base is not None:
        app_args.setdefault("engine", {})["base"] = args.base
    if args.dtype is not None:
        app_args.setdefault("engine", {})["dtype"] = args.dtype
    if args.no_demo_adapters:
        app_args["demo_adapters"] = False
    if args.allow_source_dir:
        app_args["allowed_source_dirs"] = [str(d) for d in args.allow_source_dir]
    if args.insecure_allow_open_admin:
        app_args["insecure_allow_open_admin"] = True
    try:
        config = AppConfig.model_validate(app_args)
    except ValueError as e:
        raise ConfigError(f"invalid configuration: {_one_line(e)}") from None
    from serve.app.builder import check_deployments

    check_deployments(config, deployments)
    if args.replicas is not None:
        if args.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {args.replicas}")
        engine = deployments.setdefault("EngineReplica", {})
        if engine.get("autoscaling_config"):
            raise ConfigError("--replicas conflicts with the config's autoscaling_config for EngineReplica "
                              "(min_replicas/max_replicas); drop one of them")
        engine["num_replicas"] = args.replicas
    return config, deployments


def ray_address(args) -> str | None:
    """The cluster to join: --ray-address, else $RAY_ADDRESS (ray.init would read it anyway), else None."""
    import os

    return getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS") or None


def _registry_label(config) -> str:
    """Where the registry lives, credentials redacted (this line ends up in logs)."""
    from serve.registry import redact_url, resolve_urls

    catalog, store = resolve_urls(config.registry_url, config.store_url)
    if catalog is None and store is None:
        return str(config.registry_path())
    return (f"catalog {redact_url(catalog) if catalog else 'SQLite'}, store {redact_url(store) if store else 'local'}, "
            f"node cache {config.registry_path()}")


def _warn_without_shared_registry(config) -> None:
    """Replicas on several nodes share adapters only through PostgreSQL + S3 (or a registry_dir on shared
    storage); the nodes' own environment may hold the URLs, so this is a warning, not an error."""
    from serve.registry import resolve_urls

    if resolve_urls(config.registry_url, config.store_url) == (None, None) and config.registry_dir is None:
        print("peftserve: warning: no registry_url/store_url here; replicas on other nodes see a shared registry "
              "only if their nodes set PEFTSERVE_REGISTRY_URL and PEFTSERVE_STORE_URL (PostgreSQL + S3)",
              flush=True)


def run(args) -> int:
    import time

    from serve.app import local
    from serve.app.builder import build_app, deployment_names
    from serve.app.preflight import preflight

    config, deployments = build_from_args(args)
    address = ray_address(args)
    # every error knowable before Ray starts, in seconds (on a cluster the proxies bind the port, not we)
    config = preflight(config, args.host, args.port, check_port=address is None)
    if address and args.num_cpus is not None:
        from serve.engine import ConfigError

        raise ConfigError("--num-cpus sizes a local Ray; a cluster's nodes set theirs with `ray start --num-cpus`")
    what = (f"deploying the app onto the Ray cluster at {address}, HTTP port {args.port}" if address else
            f"starting Ray and the app on http://{args.host}:{args.port}")
    print(f"peftserve: {what} (base: {config.engine.base or 'embedded'}; registry: {_registry_label(config)})",
          flush=True)
    if address:
        _warn_without_shared_registry(config)
    # Installed explicitly: a command started as a background job inherits SIGINT ignored.
    stop = threading.Event()

    def on_signal() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    on_signal()
    started = False
    try:
        url = local.start(build_app(config, deployments), args.host, args.port, args.num_cpus,
                          ready_timeout_s=600, stop=stop, address=address,
                          proxy_location=read_config(args.config)[2])
        on_signal()  # ray.init installs its own SIGTERM handler (it aborts the driver): take it back
        started = True
        print(f"peftserve: ready on {url} (API docs: {url}/docs); Ctrl-C stops", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        print(f"peftserve: shutting down (in-flight requests get up to {args.grace_s:g} s)", flush=True)
        t0 = time.monotonic()
        local.stop(grace_s=args.grace_s if started else 0.0, joined=address is not None,
                   front=deployment_names(config)[0])
        print(f"peftserve: stopped in {time.monotonic() - t0:.1f} s", flush=True)
    return 0
