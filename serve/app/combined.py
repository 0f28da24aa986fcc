"""The combined topology (`topology: combined`): each EngineReplica answers HTTP itself.

    client -> Ray proxy -> EngineReplica (routes + Engine)          combined: one Ray hop per request
    client -> Ray proxy -> Ingress -> EngineReplica (Engine)        split (default, serve/app/ingress.py)

Why it exists: on a CPU host the serving stack shares cores with the engine, and every Ray hop costs a few
milliseconds of CPU per request in two processes (the caller's router and serialization, the callee's task
handling). Dropping the Ingress hop removes one process and one handle call per request; the routes, the
validation and the replies are the same code (serve/app/routes.py over `HttpFront`), and the engine calls are
plain method calls on this replica.

What it gives up, against split: Ray's proxy, not peftserve, picks the replica, by queue length, or by
Serve's `serve_multiplexed_model_id` header where the client sends one (the replica still advertises its
recent adapters, so such clients get adapter-aware routing); and a replica that dies mid-request is the
proxy's error, not peftserve's 503 with Retry-After (measured with a single replica SIGKILLed under load: its
in-flight requests got Ray's plain-text 500, and the next request waited ~13 s for the replacement, then 200). The deployment keeps the name EngineReplica, so the
YAML's `deployments: - name: EngineReplica` options and `--replicas` apply in both topologies.
"""

from __future__ import annotations

from ray import serve as ray_serve

from serve.app.ingress import HttpFront
from serve.app.replica import EngineReplica
from serve.registry import AdapterRegistry


# Access logs on (the default): this replica is where HTTP is answered. Its request limit is the split
# Ingress's, since HTTP requests now queue here.
@ray_serve.deployment(name="EngineReplica", max_ongoing_requests=2048, health_check_period_s=10)
@ray_serve.ingress()
class CombinedReplica(EngineReplica.func_or_class, HttpFront):
    async def __init__(self, config: dict, hub):
        await super().__init__(config, hub)  # EngineReplica: engine, bound registry, sync, metrics pusher
        self._start_http(hub)

    # generate / stream / describe: EngineReplica's own methods already speak routes.Backend's replies

    async def adapters(self) -> AdapterRegistry:
        """The registry bound to this replica's base."""
        return self.registry
