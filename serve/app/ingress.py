"""Ingress: the HTTP deployment of the split topology. Parses and validates, authenticates, writes the registry,
and forwards generation to the EngineReplica deployment through a handle (routing key: the adapter name, see
replica.py). `HttpFront` is what answering HTTP needs in whichever process does it: the Ingress here, or each
EngineReplica itself in the combined topology (serve/app/combined.py).

The ingress holds no model; it can run on CPU-only nodes with its own replica count.

Faults: any Ray failure between here and an engine replica (its process or node died, it is unreachable,
the deployment has no healthy replica, back-pressure) is a 503 with Retry-After and a JSON body, never a
500: the request did not run to completion there and a retry lands on a live replica. A stream that
already sent tokens ends with an error event instead.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve as ray_serve

from serve.app.auth import resolve_token
from serve.app.config import AppConfig
from serve.app.http_errors import ErrorReply, HTTPProblem, reply_for
from serve.app.metrics import Metrics
from serve.app.replica import MetricsPusher, replica_id, routing_key
from serve.registry import AdapterRegistry

log = logging.getLogger("peftserve.app")
DESCRIBE_TTL_S = 5.0  # /info and /health freshness; base description never changes


class HttpFront:
    """The HTTP side of a deployment (serve/app/routes.py is its API): bearer tokens, the in-flight count the
    shutdown drain waits on, /info's replica list, /metrics, and the demo adapters at start. The class that
    mixes it in sets `config`, `metrics`, `registry`, `pusher` and implements generate/stream/describe/
    adapters (routes.Backend), then calls `_start_http(hub)` at the end of its __init__."""

    config: AppConfig
    metrics: Metrics
    pusher: MetricsPusher

    def _start_http(self, hub) -> None:
        self.hub = hub
        self.admin_token = resolve_token(self.config.admin_token, "PEFTSERVE_ADMIN_TOKEN")
        self.api_token = resolve_token(self.config.api_token, "PEFTSERVE_API_TOKEN")
        self.http_in_flight = [0]
        if self.config.wants_demo_adapters():
            asyncio.get_running_loop().create_task(self._register_demo_adapters())

    def __serve_build_asgi_app__(self):
        from serve.app.routes import build_api

        return build_api(self)

    async def replicas(self) -> list[dict]:
        """What every live engine replica last reported (node, sync state, cache): /info's `replicas`."""
        try:
            return await self.hub.reports.remote()
        except Exception as e:  # noqa: BLE001 - the hub is being restarted: /info still answers
            log.warning("replica reports unavailable: %r", e)
            return []

    async def in_flight(self) -> int:
        """HTTP requests this replica has not answered yet (the shutdown drain waits for 0)."""
        return self.http_in_flight[0]

    async def metrics_exposition(self) -> bytes:
        from adapters.kinds import METHODS

        # the label is the PEFT method (dora, adalora, p_tuning...), counted by the catalog: no snapshot
        methods = await asyncio.to_thread((await self.adapters()).counts)
        for method in METHODS:
            self.metrics.registered_adapters.labels(method).set(methods.get(method, 0))
        try:
            await self.pusher.push()  # this replica's HTTP counters are fresh; engines push every interval
            return await self.hub.render.remote()
        except Exception as e:  # noqa: BLE001 - the hub is being restarted
            raise HTTPProblem(ErrorReply(**ray_failure(e))) from None

    async def _register_demo_adapters(self) -> None:
        """Register the demo adapters `peftserve train demo` trained for this base (serve/app/demo.py)."""
        try:
            from serve.app.admin_routes import make_validator
            from serve.app.demo import register_demo_adapters

            described = await self.describe()
            validate = make_validator(described["base"], described["limits"])
            registry = await self.adapters()
            await asyncio.to_thread(register_demo_adapters, registry, validate, described["base"].fingerprint)
        except Exception as e:  # noqa: BLE001 - demo adapters are a convenience, never a start-up failure
            log.warning("demo adapters not registered: %r", e)


@ray_serve.deployment(name="Ingress", max_ongoing_requests=2048, ray_actor_options={"num_cpus": 0.5})
@ray_serve.ingress()
class Ingress(HttpFront):
    async def __init__(self, config: dict, engine, hub):
        self.config = AppConfig.model_validate(config)
        self.engine = engine
        self.metrics = Metrics(self.config.adapter_metric_labels)
        self.registry = self.config.open_registry()
        self.metrics.observe_store(self.registry.store)
        self.pusher = MetricsPusher(self.metrics, hub, f"ingress-{replica_id()}", self.config.metrics_push_interval_s)
        self.pusher.start()
        self._described: tuple[float, dict] | None = None
        self._bound: AdapterRegistry | None = None
        self._start_http(hub)

    # ---- Backend (serve/app/routes.py) ------------------------------------------------------------------
    def _handle(self, request: dict, stream: bool = False):
        opts = {"stream": stream}
        key = routing_key(request)
        if key and self.config.residency_routing:
            opts["multiplexed_model_id"] = key
        return self.engine.options(**opts)

    async def generate(self, request: dict) -> dict:
        try:
            return await self._handle(request).generate.remote(request)
        except Exception as e:  # noqa: BLE001 - Ray back-pressure, dead replica: typed replies
            return {"error": ray_failure(e)}

    async def stream(self, request: dict):
        gen = self._handle(request, stream=True).stream.remote(request)
        try:
            async for event in gen:
                yield event
        except Exception as e:  # noqa: BLE001
            yield {"error": ray_failure(e)}
        finally:
            gen.cancel()  # no-op when finished; frees the engine row when the client went away

    async def describe(self) -> dict:
        now = time.monotonic()
        if self._described is None or now - self._described[0] > DESCRIBE_TTL_S:
            try:
                self._described = (now, await self.engine.describe.remote())
            except Exception as e:  # noqa: BLE001 - no engine replica answers: 503, not 500
                raise HTTPProblem(ErrorReply(**ray_failure(e))) from None
        return self._described[1]

    async def adapters(self) -> AdapterRegistry:
        """The registry bound to the engine's base (known once an engine replica answers)."""
        if self._bound is None:
            base = (await self.describe())["base"]
            self._bound = self.registry.for_base(base.fingerprint, base.name)
        return self._bound


def ray_failure(e: BaseException) -> dict:
    """The reply for an exception raised by a call to an engine replica: Ray's failures are 503s."""
    from ray.exceptions import RayError, RayTaskError
    from ray.serve.exceptions import BackPressureError, RayServeException

    if isinstance(e, BackPressureError):
        return _unavailable("all replicas are at their request limit; retry later", 1.0)
    if isinstance(e, RayTaskError) and not isinstance(e.cause, RayError | RayServeException):
        return reply_for(e.cause if isinstance(e.cause, Exception) else e).to_dict()  # a bug in the replica
    if isinstance(e, RayError | RayServeException):
        # the replica's process or node died, it cannot be reached, or the deployment has no healthy replica:
        # the request did not finish there, and Serve is replacing the replica
        return _unavailable(f"the engine replica for this request is unavailable ({type(e).__name__}); "
                            "it is being replaced, retry", 2.0)
    return reply_for(e).to_dict()


def _unavailable(message: str, retry_after_s: float) -> dict:
    return ErrorReply(503, "overloaded", message, retry_after_s=retry_after_s).to_dict()
