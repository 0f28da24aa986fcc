"""ASGI pieces shared by the routes: the body-size cap, request metrics, SSE framing."""

from __future__ import annotations

import json
import time

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from serve.app.metrics import Metrics


class BodyTooLarge(HTTPException):
    """An HTTPException so FastAPI's body parsing re-raises it as is (it turns other errors into 400s)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the {limit}-byte limit")
        self.limit = limit


class BodyLimitMiddleware:
    """413 before the body is read: at once from Content-Length, else as soon as the streamed bytes pass
    the cap (the receive wrapper raises; nothing downstream sees a truncated body)."""

    def __init__(self, app, default_limit: int, upload_limit: int, upload_path: str = "/adapters"):
        self.app, self.default_limit, self.upload_limit, self.upload_path = app, default_limit, upload_limit, upload_path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"].rstrip("/") == self.upload_path else self.default_limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _too_large(limit, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return await self.app(scope, counting_receive, send)


async def _too_large(limit: int, send) -> None:
    resp = JSONResponse({"error": f"request body is larger than the {limit}-byte limit", "error_type": "too_large"},
                        status_code=413, headers={"Connection": "close"})
    await send({"type": "http.response.start", "status": 413, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


class HTTPMetricsMiddleware:
    """Counts requests by route *template* (bounded label set) and status; times to the last body byte.
    `in_flight` (a one-element list shared with the backend) counts HTTP requests not yet answered, which
    the shutdown drain waits on."""

    def __init__(self, app, metrics: Metrics, in_flight: list[int] | None = None):
        self.app, self.metrics = app, metrics
        self.in_flight = in_flight if in_flight is not None else [0]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.in_flight[0] += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.in_flight[0] -= 1
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(template, scope.get("method", ""), str(status)).inc()
            self.metrics.http_seconds.labels(template).observe(time.perf_counter() - start)


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
