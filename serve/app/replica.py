"""EngineReplica: the Ray Serve deployment that owns one Engine (one continuous batch) per replica.

Requests arrive from the ingress as plain dicts and leave as plain dicts (`{"result"}`, `{"token"}`,
`{"error"}`), so nothing but data crosses the Ray boundary.

Residency routing: the ingress sends each request with `multiplexed_model_id=<adapter>`. Ray's router
prefers replicas that report that id; a replica reports the ids that went through `_route_hint`, an LRU
of names only. It is a hint: every replica can serve every adapter, the engine's own cache decides what
stays resident, and one batch still mixes any adapters (Ray's multiplexing LRU never unloads anything).
"""

from __future__ import annotations

import asyncio
import logging
import os

from ray import serve as ray_serve

from serve.app.config import AppConfig
from serve.app.http_errors import reply_for
from serve.app.metrics import Metrics, PrometheusObserver
from serve.app.sync import RegistrySync

log = logging.getLogger("peftserve.app")
# Adapter names a replica advertises for routing (not a residency limit: the engine's cache is).
ROUTING_HINT_ADAPTERS = int(os.environ.get("PEFTSERVE_ROUTING_HINT_ADAPTERS", "64"))


def _fault_injected(fault: str) -> bool:
    """Test hook, off unless PEFTSERVE_FAULT_DIR is set in the replica's environment: the file
    `<dir>/<fault>-<pid>` makes this replica process report that fault (tests/reliability)."""
    fault_dir = os.environ.get("PEFTSERVE_FAULT_DIR")
    return bool(fault_dir) and os.path.exists(os.path.join(fault_dir, f"{fault}-{os.getpid()}"))


def replica_id() -> str:
    try:
        return ray_serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests): one process, one replica
        return f"pid{os.getpid()}"


class MetricsPusher:
    """Ships this process's metric snapshot to the MetricsHub every `interval_s` (best effort)."""

    def __init__(self, metrics: Metrics, hub, name: str, interval_s: float):
        self.metrics, self.hub, self.name, self.interval_s = metrics, hub, name, interval_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def push(self) -> None:
        await self.hub.push.remote(self.name, self.metrics.snapshot())

    async def _run(self) -> None:
        while True:
            try:
                await self.push()
            except Exception as e:  # noqa: BLE001 - a hub restart must not kill serving
                log.debug("metrics push failed: %r", e)
            await asyncio.sleep(self.interval_s)


# Access logs come from the ingress (one line per HTTP request); engine calls would double them.
@ray_serve.deployment(name="EngineReplica", max_ongoing_requests=1024, health_check_period_s=10,
                      logging_config={"enable_access_log": False})
class EngineReplica:
    async def __init__(self, config: dict, hub):
        from serve.engine import Engine

        self.config = AppConfig.model_validate(config)
        self.metrics = Metrics(self.config.adapter_metric_labels)
        self.engine = Engine.from_config(self.config.engine, observer=PrometheusObserver(self.metrics))
        self.tokenizer = self.engine.tokenizer
        self._special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        base = self.engine.base
        self.registry = self.config.open_registry().for_base(base.fingerprint, base.name)
        self.metrics.observe_store(self.registry.store)
        self.sync = RegistrySync(self.registry, self.engine)
        self.sync.ensure_current()
        self.pusher = MetricsPusher(self.metrics, hub, f"engine-{replica_id()}", self.config.metrics_push_interval_s)
        self.pusher.start()

    # ---- routing hint --------------------------------------------------------------------------------
    @ray_serve.multiplexed(max_num_models_per_replica=ROUTING_HINT_ADAPTERS)
    async def _route_hint(self, adapter: str) -> str:
        return adapter  # a name, not a model: "unloading" it from the LRU frees nothing

    async def _prepare(self, request: dict):
        from serve.engine import GenerationParams, GenerationRequest, MergedAdapters

        merged = request.get("merged_adapters")
        hint = request.get("adapter") or (merged["ids"][0] if merged else None)
        if hint:
            await self._route_hint(hint)
        self.sync.ensure_current()
        return GenerationRequest(inputs=request["inputs"], adapter=request.get("adapter"),
                                 params=GenerationParams(**request["params"]), request_id=request.get("request_id"),
                                 merged_adapters=None if merged is None else MergedAdapters(**merged))

    # ---- requests --------------------------------------------------------------------------------
    async def generate(self, request: dict) -> dict:
        try:
            result = await self.engine.submit(await self._prepare(request))
        except Exception as e:  # noqa: BLE001 - every failure becomes a typed reply
            return {"error": self._reply(e)}
        return {"result": self._result(result)}

    async def stream(self, request: dict):
        from serve.engine import TokenEvent

        events = None
        try:
            events = self.engine.stream(await self._prepare(request))
            async for ev in events:
                if isinstance(ev, TokenEvent):
                    yield {"token": self._token(ev.token_id, ev.text, ev.logprob)}
                else:
                    yield {"result": self._result(ev)}
        except Exception as e:  # noqa: BLE001
            yield {"error": self._reply(e)}
        finally:
            if events is not None:
                await events.aclose()

    async def describe(self) -> dict:
        """What the ingress validates registrations against, plus /info."""
        info = self.engine.info()
        info["base_name"] = info.get("base")
        info["replica"] = replica_id()
        info["pid"] = os.getpid()  # which process serves: fault tests and operators match it to logs
        return {"base": self.engine.base_desc, "limits": self.engine.limits, "info": info}

    async def check_health(self) -> None:
        if getattr(self.engine, "_closed", False):
            raise RuntimeError("engine is closed")
        if _fault_injected("unhealthy"):
            raise RuntimeError("fault injected: health check fails (test hook)")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    # ---- formatting ------------------------------------------------------------------------------
    def _reply(self, e: Exception) -> dict:
        from serve.engine import UnknownAdapterError

        reply = reply_for(e)
        if isinstance(e, UnknownAdapterError):  # say which base it belongs to, if it is another's
            reply.message = self.registry.not_here(e.name)
        return reply.to_dict()

    def _token(self, token_id: int, text: str, logprob: float | None) -> dict:
        return {"id": int(token_id), "text": text, "logprob": None if logprob is None else float(logprob),
                "special": int(token_id) in self._special}

    def _result(self, r) -> dict:
        logprobs = r.logprobs or [None] * len(r.token_ids)
        tokens = [self._token(t, self.tokenizer.decode([t]), lp) for t, lp in zip(r.token_ids, logprobs, strict=False)]
        return {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                "generated_tokens": r.generated_tokens, "seed": r.seed, "tokens": tokens,
                "timings": dict(r.timings), "adapters": r.adapters, "merge_strategy": r.merge_strategy}
