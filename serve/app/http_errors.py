"""One mapping from every error the server raises on purpose to an HTTP status and a JSON body.

Engine replicas turn exceptions into plain `ErrorReply` dicts (they cross a Ray boundary, and typed
exceptions with custom constructors do not survive it reliably); the ingress turns them into responses.
Bodies follow TGI/LoRAX (`{"error", "error_type"}`), which the lorax/text-generation clients parse, plus
`field` for 422s. OpenAI routes wrap the same facts as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from serve import engine as engine_errors
from serve.app.auth import AuthError
from serve.registry import RegistryError

log = logging.getLogger("peftserve.app")


@dataclass
class ErrorReply:
    status: int
    error_type: str  # validation | not_found | overloaded | timeout | conflict | auth | too_large | internal
    message: str
    field: str | None = None
    retry_after_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class HTTPProblem(Exception):
    """Raised by route code; rendered by the app's exception handler."""

    def __init__(self, reply: ErrorReply):
        super().__init__(reply.message)
        self.reply = reply


_TYPE_BY_STATUS = {400: "validation", 401: "auth", 403: "auth", 404: "not_found", 408: "timeout",
                   409: "conflict", 413: "too_large", 422: "validation", 503: "overloaded",
                   507: "storage_full"}


def reply_for(exc: BaseException) -> ErrorReply:
    """Status and message for any exception; unknown ones are 500s (a server bug, logged with traceback)."""
    try:
        from adapters.errors import AdapterError, AdapterLimitError
    except ImportError:  # pragma: no cover - adapters/ is part of the package
        AdapterError = AdapterLimitError = ()  # type: ignore[assignment]  # noqa: N806

    if isinstance(exc, HTTPProblem):
        return exc.reply
    if isinstance(exc, engine_errors.RequestValidationError):
        return ErrorReply(422, "validation", str(exc), field=exc.field)
    if isinstance(exc, engine_errors.UnknownAdapterError):
        return ErrorReply(404, "not_found", str(exc))
    if isinstance(exc, engine_errors.OverloadedError):
        return ErrorReply(503, "overloaded", str(exc), retry_after_s=max(1.0, exc.retry_after_s))
    if isinstance(exc, engine_errors.RequestTimeoutError):
        return ErrorReply(408, "timeout", str(exc) or "the request did not finish within its deadline")
    if isinstance(exc, engine_errors.EngineClosedError):
        return ErrorReply(503, "overloaded", str(exc), retry_after_s=5.0)
    if AdapterLimitError and isinstance(exc, AdapterLimitError) and "bytes" in str(exc):
        return ErrorReply(413, "too_large", str(exc))
    if AdapterError and isinstance(exc, AdapterError):
        return ErrorReply(400, "validation", str(exc))
    if isinstance(exc, RegistryError):  # a 503 is a backend outage: retry
        return ErrorReply(exc.status, _TYPE_BY_STATUS.get(exc.status, "validation"), str(exc),
                          retry_after_s=1.0 if exc.status == 503 else None)
    if isinstance(exc, AuthError):
        return ErrorReply(exc.status, "auth", str(exc))
    if isinstance(exc, engine_errors.AdapterLoadError):
        log.error("registered adapter failed to load: %s", exc)
        return ErrorReply(500, "generation", str(exc))
    log.exception("unexpected error", exc_info=exc)
    return ErrorReply(500, "internal", f"internal server error ({type(exc).__name__}); see the server log")


def problem(status: int, message: str, field: str | None = None) -> HTTPProblem:
    return HTTPProblem(ErrorReply(status, _TYPE_BY_STATUS.get(status, "internal"), message, field=field))


def tgi_body(r: ErrorReply) -> dict:
    body = {"error": r.message, "error_type": r.error_type}
    if r.field:
        body["field"] = r.field
    return body


def openai_body(r: ErrorReply) -> dict:
    return {"error": {"message": r.message, "type": r.error_type, "param": r.field, "code": r.status}}


def headers_for(r: ErrorReply) -> dict[str, str]:
    return {"Retry-After": str(int(round(r.retry_after_s)))} if r.retry_after_s else {}
