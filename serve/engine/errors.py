"""Typed errors of the engine. The HTTP app maps them to status codes (see docs/ENGINE.md):

| error                    | HTTP |
| ------------------------ | ---- |
| RequestValidationError   | 422  |
| UnknownAdapterError      | 404  |
| AdapterExistsError       | 409  |
| AdapterLoadError         | 422 on register, 500 when a registered adapter fails to load later |
| OverloadedError          | 503 (with Retry-After) |
| RequestTimeoutError      | 504  |
| EngineClosedError        | 503  |
| ConfigError              | process start-up failure |
"""

from __future__ import annotations


class PeftServeError(Exception):
    """Base class of every error the engine raises on purpose; the message says what to fix."""

    user_facing = True


class ConfigError(PeftServeError, ValueError):
    """The engine configuration is invalid or cannot be satisfied (e.g. fp16 without force_fp16)."""


class RequestValidationError(PeftServeError, ValueError):
    """A request field is out of range. `field` names it (e.g. "params.top_p")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownAdapterError(PeftServeError, KeyError):
    """The named adapter is not registered (or was removed)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:  # KeyError would quote the whole message
        return f"unknown adapter {self.name!r}; register it first (GET /adapters lists the registered ones)"


class AdapterLoadError(PeftServeError):
    """A registered adapter could not be inspected or loaded. Wraps the adapters/ error in `__cause__`."""

    def __init__(self, name: str, message: str):
        super().__init__(f"adapter {name!r}: {message}")
        self.name = name


class OverloadedError(PeftServeError):
    """The waiting queue is full; retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(PeftServeError, TimeoutError):
    """The request did not finish within its deadline (queue wait included)."""


class EngineClosedError(PeftServeError):
    """The engine was shut down (or its loop died); no new requests are accepted."""


try:  # adapters/ errors are re-exported so callers catch everything from one module
    from adapters.errors import AdapterError  # noqa: F401
except ImportError:  # adapters/ not built yet or renamed: keep the engine importable

    class AdapterError(PeftServeError):  # type: ignore[no-redef]
        """Placeholder until adapters.errors.AdapterError exists."""


class AdapterExistsError(PeftServeError):
    """An adapter with this name is registered already (pass replace=True for a new version). HTTP 409."""

    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} is already registered; pass replace=True to install a new version")
        self.name = name


class RequestCancelledError(PeftServeError):
    """The request was cancelled (its caller went away) before it finished."""
