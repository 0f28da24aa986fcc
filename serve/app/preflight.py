"""Checks `peftserve serve` runs before Ray starts: every error that can be known up front is one line.

Without them a bad base crash-loops the engine replica inside Ray (hundreds of log lines, ~40 s) before
the command gives up. Each check raises ConfigError with what to fix.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from serve.app.auth import OPEN_ADMIN_FLAG, is_loopback, resolve_token
from serve.app.config import AppConfig
from serve.engine import BaseLoadError, ConfigError, check_base_source


def preflight(config: AppConfig, host: str, port: int, check_port: bool = True) -> AppConfig:
    """Validate `config` for a server on host:port; returns it with loopback-dependent defaults applied.
    `check_port=False` on a cluster: Serve's proxies bind the port on the nodes, not this process."""
    if not is_loopback(host):
        config = _secure_defaults(config, host)
    _check_engine(config)
    try:
        check_base_source(config.engine.base)
    except BaseLoadError as e:
        raise ConfigError(str(e)) from None
    _check_registry(config.registry_path())
    _check_backends(config)
    for d in config.allowed_source_dirs or []:
        if not Path(d).is_dir():
            raise ConfigError(f"allowed source directory {d} does not exist or is not a directory")
    if check_port:
        _check_port(host, port)
    return config


def _secure_defaults(config: AppConfig, host: str) -> AppConfig:
    token = resolve_token(config.admin_token, "PEFTSERVE_ADMIN_TOKEN")
    if token is None and not config.insecure_allow_open_admin:
        raise ConfigError(f"refusing to bind {host} with adapter registration and deletion open to the network: "
                          "set PEFTSERVE_ADMIN_TOKEN (or admin_token in the config), bind 127.0.0.1, or pass "
                          f"{OPEN_ADMIN_FLAG}")
    if config.allowed_source_dirs is None:  # beyond loopback, server paths are opt-in
        config = config.model_copy(update={"allowed_source_dirs": []})
    return config


def _check_engine(config: AppConfig) -> None:
    engine = config.engine
    engine.torch_dtype()  # fp16 refusal
    if engine.uses_cuda():
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"the engine is configured for CUDA (device={engine.device!r}) but torch sees no "
                              "GPU; set engine.device to cpu or run on a GPU node")


def _check_registry(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the registry directory {root}: {e.strerror}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"the registry directory {root} is not writable by this user")


def _check_backends(config: AppConfig) -> None:
    from serve.registry import BackendConfigError, resolve_urls
    from serve.registry.backends import check_urls

    try:
        check_urls(*resolve_urls(config.registry_url, config.store_url))
    except BackendConfigError as e:
        raise ConfigError(str(e)) from None


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror} (another server on that port? "
                              "pass --port)") from None
