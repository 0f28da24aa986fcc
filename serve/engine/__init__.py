"""The engine: one frozen T5 base, per-row adapters, one continuous batch — pure torch, no Ray, no HTTP.

This module is the engine's public API; everything outside `serve/engine/` (the app, training, load tests)
imports from here, never from the submodules. Names resolve lazily (PEP 562) so that importing an error
class or the config does not pull in torch.

    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest
"""

from __future__ import annotations

import importlib

_EXPORTS: dict[str, str] = {
    # the in-process API
    "Engine": "core",
    "EngineConfig": "config",
    "parse_bytes": "config",
    "GenerationParams": "requests",
    "GenerationRequest": "requests",
    "MergedAdapters": "requests",
    "GenerationResult": "requests",
    "TokenEvent": "requests",
    "SequenceOutput": "requests",
    # metrics hooks
    "EngineObserver": "observer",
    "RecordingObserver": "observer",
    # the base model
    "LoadedBase": "base",
    "BaseLoadError": "base",
    "load_base": "base",
    "check_base_source": "base",
    "ensure_embedded_base": "base",
    "default_home": "base",
    # typed errors
    "PeftServeError": "errors",
    "ConfigError": "errors",
    "RequestValidationError": "errors",
    "UnknownAdapterError": "errors",
    "AdapterLoadError": "errors",
    "AdapterExistsError": "errors",
    "OverloadedError": "errors",
    "RequestTimeoutError": "errors",
    "EngineClosedError": "errors",
    "RequestCancelledError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'serve.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"serve.engine.{module}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return __all__
