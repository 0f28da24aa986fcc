"""Ingress: the HTTP deployment. Parses and validates, authenticates, writes the registry, and forwards
generation to the EngineReplica deployment through a handle (routing hint: the adapter name).

The ingress holds no model; it can run on CPU-only nodes with its own replica count.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve as ray_serve

from serve.app.auth import resolve_token
from serve.app.config import AppConfig
from serve.app.http_errors import reply_for
from serve.app.metrics import Metrics
from serve.app.replica import MetricsPusher, replica_id
from serve.registry import AdapterRegistry

log = logging.getLogger("peftserve.app")
DESCRIBE_TTL_S = 5.0  # /info and /health freshness; base description never changes


@ray_serve.deployment(name="Ingress", max_ongoing_requests=2048, ray_actor_options={"num_cpus": 0.5})
@ray_serve.ingress()
class Ingress:
    async def __init__(self, config: dict, engine, hub):
        self.config = AppConfig.model_validate(config)
        self.engine, self.hub = engine, hub
        self.admin_token = resolve_token(self.config.admin_token, "PEFTSERVE_ADMIN_TOKEN")
        self.api_token = resolve_token(self.config.api_token, "PEFTSERVE_API_TOKEN")
        self.metrics = Metrics(self.config.adapter_metric_labels)
        self.registry = self.config.open_registry()
        self.metrics.observe_store(self.registry.store)
        self.pusher = MetricsPusher(self.metrics, hub, f"ingress-{replica_id()}", self.config.metrics_push_interval_s)
        self.pusher.start()
        self._described: tuple[float, dict] | None = None
        self._bound: AdapterRegistry | None = None
        self.http_in_flight = [0]
        if self.config.wants_demo_adapters():
            asyncio.get_running_loop().create_task(self._register_demo_adapters())

    def __serve_build_asgi_app__(self):
        from serve.app.routes import build_api

        return build_api(self)

    # ---- Backend (serve/app/routes.py) ------------------------------------------------------------------
    def _handle(self, adapter: str | None, stream: bool = False):
        opts = {"stream": stream}
        if adapter and self.config.residency_routing:
            opts["multiplexed_model_id"] = adapter
        return self.engine.options(**opts)

    async def generate(self, request: dict) -> dict:
        try:
            return await self._handle(request.get("adapter")).generate.remote(request)
        except Exception as e:  # noqa: BLE001 - Ray back-pressure, dead replica: typed replies
            return {"error": _ray_failure(e)}

    async def stream(self, request: dict):
        gen = self._handle(request.get("adapter"), stream=True).stream.remote(request)
        try:
            async for event in gen:
                yield event
        except Exception as e:  # noqa: BLE001
            yield {"error": _ray_failure(e)}
        finally:
            gen.cancel()  # no-op when finished; frees the engine row when the client went away

    async def describe(self) -> dict:
        now = time.monotonic()
        if self._described is None or now - self._described[0] > DESCRIBE_TTL_S:
            self._described = (now, await self.engine.describe.remote())
        return self._described[1]

    async def adapters(self) -> AdapterRegistry:
        """The registry bound to the engine's base (known once an engine replica answers)."""
        if self._bound is None:
            base = (await self.describe())["base"]
            self._bound = self.registry.for_base(base.fingerprint, base.name)
        return self._bound

    async def in_flight(self) -> int:
        """HTTP requests this ingress replica has not answered yet (the shutdown drain waits for 0)."""
        return self.http_in_flight[0]

    async def metrics_exposition(self) -> bytes:
        from adapters.kinds import METHODS

        methods: dict[str, int] = {}
        for r in (await self.adapters()).list():
            method = r.spec.get("method") or r.kind  # the label is the PEFT method (dora, adalora, p_tuning...)
            methods[method] = methods.get(method, 0) + 1
        for method in METHODS:
            self.metrics.registered_adapters.labels(method).set(methods.get(method, 0))
        await self.pusher.push()  # this replica's HTTP counters are fresh; engines push every interval
        return await self.hub.render.remote()

    # ---- startup ---------------------------------------------------------------------------------
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


def _ray_failure(e: Exception) -> dict:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    if isinstance(e, BackPressureError):
        return {"status": 503, "error_type": "overloaded", "message": "all replicas are at their request "
                "limit; retry later", "field": None, "retry_after_s": 1.0}
    if isinstance(e, RayActorError):  # the engine replica died mid-request (crash, OOM kill); Serve replaces it
        return {"status": 503, "error_type": "overloaded", "message": "the engine replica serving this request "
                "died; it is being replaced, retry", "field": None, "retry_after_s": 2.0}
    return reply_for(e).to_dict()
