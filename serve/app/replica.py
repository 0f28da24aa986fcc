"""EngineReplica: the Ray Serve deployment that owns one Engine (one continuous batch) per replica.

Requests arrive from the ingress as plain dicts and leave as plain dicts (`{"result"}`, `{"token"}`,
`{"error"}`), so nothing but data crosses the Ray boundary.

Adapter-aware routing (Ray Serve model multiplexing): the ingress sends each request with
`multiplexed_model_id=<adapter>`; Ray's router sends it to a replica that reports that id, else to the
replica reporting the fewest ids, else to any. A replica reports the adapters it served last (an LRU of
names, `resident_adapters_hint` long: size it to what the engine keeps resident), so an adapter's requests
keep landing where its weights already are. Every replica can still serve every adapter, the engine's own
cache decides what stays resident, and one batch mixes any adapters (the names' LRU unloads nothing).

Each replica reports itself (node, sync state, cache counters) to the MetricsHub with its metrics; the
ingress lists those reports in /info.
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


def routing_key(request: dict) -> str | None:
    """The adapter a request is routed by: its adapter, or the first of a combination (None: the base)."""
    merged = request.get("merged_adapters")
    return request.get("adapter") or (merged["ids"][0] if merged else None)


def node_of_this_process() -> tuple[str, str]:
    """(Ray node id, node IP) of this replica: which machine serves, in /info and in fault tests."""
    import ray

    try:
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (tests)
        return "local", "127.0.0.1"


class MetricsPusher:
    """Ships this process's metric snapshot (and its `report()`, if any) to the MetricsHub every `interval_s`
    (best effort)."""

    def __init__(self, metrics: Metrics, hub, name: str, interval_s: float, report=None):
        self.metrics, self.hub, self.name, self.interval_s, self.report = metrics, hub, name, interval_s, report
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def push(self) -> None:
        await self.hub.push.remote(self.name, self.metrics.snapshot(), self.report() if self.report else None)

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
        self.detokenizer = self.engine.detokenizer  # token texts read once per id, not per generated token
        base = self.engine.base
        self.registry = self.config.open_registry().for_base(base.fingerprint, base.name)
        self.metrics.observe_store(self.registry.store)
        self.sync = RegistrySync(self.registry, self.engine, self.metrics)
        self.sync.start()
        self.id, (self.node_id, self.node_ip) = replica_id(), node_of_this_process()
        self._advertise = None
        if self.config.residency_routing:  # built here: its LRU length is a config value
            async def advertise(adapter: str) -> str:
                return adapter  # a name, not a model: "unloading" it from the LRU frees nothing

            self._advertise = ray_serve.multiplexed(
                max_num_models_per_replica=self.config.resident_adapters_hint)(advertise)
        self.pusher = MetricsPusher(self.metrics, hub, f"engine-{self.id}", self.config.metrics_push_interval_s,
                                    report=self.report)
        self.pusher.start()

    async def _prepare(self, request: dict):
        from serve.engine import GenerationParams, GenerationRequest, MergedAdapters

        merged = request.get("merged_adapters")
        key = routing_key(request)
        if key and self._advertise is not None:
            await self._advertise(key)
        names = [request["adapter"]] if request.get("adapter") else list(merged["ids"]) if merged else []
        versions = request.get("versions") or {}
        wanted = {name: versions.get(name) for name in names}
        if not self.sync.satisfied(wanted):  # a catalog read only for what this replica does not hold yet
            await asyncio.to_thread(self.sync.ensure_current, wanted)
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
                    yield {"token": self._token(ev.token_id, ev.text, ev.logprob), "sequence": ev.sequence,
                           "top": self._alternatives(ev.top)}
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
        info["replica"] = self.id
        info["pid"] = os.getpid()  # which process serves: fault tests and operators match it to logs
        return {"base": self.engine.base_desc, "limits": self.engine.limits, "info": info}

    def report(self) -> dict:
        """This replica in /info: where it runs, what it holds, how far its registry sync is."""
        info = self.engine.info()
        node_cache = getattr(self.registry.store, "cache", None)
        return {"replica": self.id, "node_id": self.node_id, "node_ip": self.node_ip, "pid": os.getpid(),
                "sync": self.sync.report(), "adapters": info["adapters"]["registered"],
                "cache": {k: info["cache"][k] for k in ("hits", "misses", "device_entries", "host_entries")},
                "queue": info["queue"], "node_cache": None if node_cache is None else str(node_cache.root)}

    async def check_health(self) -> None:
        if getattr(self.engine, "_closed", False):
            raise RuntimeError("engine is closed")
        if _fault_injected("unhealthy"):
            raise RuntimeError("fault injected: health check fails (test hook)")

    def __del__(self):
        sync = getattr(self, "sync", None)
        if sync is not None:
            sync.close()
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
                "special": int(token_id) in self.detokenizer.special}

    def _alternatives(self, top) -> list[dict] | None:
        """One token's most likely alternatives (top_n_tokens), each as a token dict."""
        text = self.detokenizer.token_text
        return None if top is None else [self._token(t, text(t), lp) for t, lp in top]

    def _tokens(self, token_ids, logprobs) -> list[dict]:
        logprobs = logprobs or [None] * len(token_ids)
        text = self.detokenizer.token_text
        return [self._token(t, text(t), lp) for t, lp in zip(token_ids, logprobs, strict=False)]

    def _result(self, r) -> dict:
        tops = [self._alternatives(top) for top in r.top_tokens] if r.top_tokens is not None else None
        sequences = None if r.sequences is None else [
            {"text": s.text, "finish_reason": s.finish_reason, "generated_tokens": len(s.token_ids),
             "tokens": self._tokens(s.token_ids, s.logprobs), "score": s.score,
             "top_tokens": None if s.top_tokens is None else [self._alternatives(t) for t in s.top_tokens]}
            for s in r.sequences]
        return {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                "generated_tokens": r.generated_tokens, "seed": r.seed, "tokens": self._tokens(r.token_ids, r.logprobs),
                "top_tokens": tops, "sequences": sequences, "score": r.score,
                "timings": dict(r.timings), "adapters": r.adapters, "merge_strategy": r.merge_strategy,
                "served_by": {"replica": self.id, "node_id": self.node_id}}
